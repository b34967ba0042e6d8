"""The registration page of a client's AuthURL, and the OIDC sign-in behind it.

Routes (server-rendered HTML, no JavaScript):

* ``GET /register/<id>`` — what asks to join (hostname, OS, requested tags). Without
  ``[oidc]``: the CLI command an admin runs, as before. With it: a button to sign in
  (the machine joins as the person who signs in), and one for an administrator to sign
  in and then approve the machine for a chosen user, or reject it.
* ``GET /oidc/login/<id>[?purpose=admin]`` — starts the sign-in at the provider
  (:class:`cli.oidc.OIDCLogin`).
* ``GET /oidc/callback`` — the provider's answer. For ``register``: the user is created
  or updated from the claims and the machine registered to them, each with the actor
  ``oidc:<issuer>#<sub>``. For ``admin``: an admin web session (a cookie) for an
  existing admin or owner (or a member of ``oidc.admin_groups``).
* ``POST /register/<id>/approve`` / ``…/reject`` — an admin's decision, recorded with
  the admin's OIDC actor (``auth = "web"``).
* ``POST /oidc/logout`` — ends the admin session.

How an admin authenticates here: by signing in with the same provider; the session is
accepted only while the user's role in the log is admin or owner. Sessions live in
this process (a restart signs admins out) and end after :data:`SESSION_TTL`.

Forms carry a per-session CSRF token and are refused when the Origin header names
another site. Cookies are HttpOnly, SameSite=Lax, and Secure when the server URL is
https. A refused sign-in shows why, is logged with its reason, and appends nothing.
"""

from __future__ import annotations

import hmac
import html
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quart import Response, request

from eventlog import Actor, caused_by
from eventlog.sidetables import PendingRegistration
from projections.errors import CommandError

from .oidc import Identity, LoginRefused, OIDCLogin, check_access, decide_login_user, same_origin

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from projections import Tailnet
    from protocol.control import Control

    from .config import Config

__all__ = ["SESSION_TTL", "install_register_routes"]

log = logging.getLogger(__name__)

#: How long an admin's web session lasts.
SESSION_TTL = 3600.0
LOGIN_COOKIE = "tailledger_login"
SESSION_COOKIE = "tailledger_session"
MAX_SESSIONS = 1024

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:42em;margin:3em auto;padding:0 1em}"
    "code{background:#eee;padding:.2em .4em;border-radius:.2em}"
    "table{border-collapse:collapse}td,th{padding:.2em .8em .2em 0;text-align:left}"
    "form{display:inline-block;margin:.5em 1em .5em 0}button{font-size:1em;padding:.4em 1em}"
)
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
}


def _page(title: str, body: str, status: int = 200) -> Response:
    text = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>tailledger: {html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    response = Response(text, status=status, content_type="text/html; charset=utf-8")
    for name, value in _HEADERS.items():
        response.headers[name] = value
    return response


def _redirect(location: str, status: int) -> Response:
    response = Response("", status=status)
    response.headers["Location"] = location
    response.headers["Cache-Control"] = "no-store"
    return response


def _machine(pending: PendingRegistration) -> str:
    rows = [
        ("Hostname", html.escape(pending.hostname or "(none)")),
        ("Operating system", html.escape(pending.os or "(unknown)")),
        (
            "Requested tags",
            ", ".join(f"<code>{html.escape(t)}</code>" for t in pending.request_tags) or "none",
        ),
    ]
    cells = "".join(f"<tr><th>{k}</th><td id=\"{k.split()[0].lower()}\">{v}</td></tr>" for k, v in rows)
    return f"<p>A machine asks to join this tailnet:</p><table>{cells}</table>"


def _cli_hint(auth_id: str) -> str:
    return (
        "<p>An administrator of this tailnet approves it with:</p>"
        f"<p><code>tailledger nodes register --key {html.escape(auth_id)} --user USERNAME</code></p>"
    )


@dataclass
class _Session:
    user_id: int
    actor: Actor
    csrf: str
    created: float


class RegisterPages:
    """The routes of this module, over the command side and the control logic.

    Raises:
        ConfigError: the OIDC client secret file cannot be read.
    """

    def __init__(self, config: Config, tailnet: Tailnet, control: Control) -> None:
        self.tailnet = tailnet
        self.control = control
        self.oidc = (
            OIDCLogin(
                config.oidc, f"{config.public_url}/oidc/callback", key_expiry=config.durations.oidc_expiry
            )
            if config.oidc.enabled
            else None
        )
        self._sessions: dict[str, _Session] = {}

    # -- helpers -------------------------------------------------------------------------

    @property
    def public_url(self) -> str:
        """The server's URL (with the bound port when the configuration said port 0)."""
        return self.control.public_url

    @property
    def secure(self) -> bool:
        return self.public_url.startswith("https://")

    def _set_cookie(self, response: Response, name: str, value: str, *, path: str, max_age: int) -> None:
        response.set_cookie(
            name, value, max_age=max_age, path=path, secure=self.secure, httponly=True, samesite="Lax"
        )

    def _session(self) -> _Session | None:
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        if time.monotonic() - session.created > SESSION_TTL:
            del self._sessions[sid]
            return None
        user = self.tailnet.state.users.get(session.user_id)
        if user is None or not user.is_admin:  # demoted or deleted since
            del self._sessions[sid]
            return None
        return session

    async def _pending(self, auth_id: str) -> PendingRegistration | Response:
        pending = await self.control.pending.get(auth_id)
        if pending is None:
            return _page(
                "Registration link expired",
                "<p>This registration link is unknown or has expired. Run the login on the machine again.</p>",
                404,
            )
        if pending.rejected_reason is not None:
            why = f": {html.escape(pending.rejected_reason)}" if pending.rejected_reason else "."
            return _page("Registration rejected", f"<p>An administrator rejected this registration{why}</p>", 410)
        return pending

    def _refused(self, exc: LoginRefused) -> Response:
        log.warning("sign-in refused (%s): %s", request.remote_addr, exc.reason)
        return _page("Sign-in refused", f"<p id=\"refused\">{html.escape(exc.message)}</p>", exc.status)

    def _check_form(self, session: _Session | None, form: dict[str, str]) -> Response | None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null" and not same_origin(self.public_url, origin):
            return _page("Refused", "<p>This form was sent from another site.</p>", 403)
        if session is None:
            return _page("Sign in first", "<p>Your administrator session has ended; sign in again.</p>", 403)
        if not hmac.compare_digest(form.get("csrf", ""), session.csrf):
            return _page("Refused", "<p>This form is stale or forged (CSRF check failed). Reload the page.</p>", 403)
        return None

    # -- pages ---------------------------------------------------------------------------

    async def register_page(self, auth_id: str) -> Response:
        pending = await self._pending(auth_id)
        if isinstance(pending, Response):
            return pending
        body = _machine(pending)
        key = html.escape(auth_id)
        if self.oidc is None:
            return _page("Machine waiting for approval", body + _cli_hint(auth_id) + "<p>The client connects by itself once approved.</p>")
        session = self._session()
        if session is None:
            body += (
                f'<p><a id="signin" href="/oidc/login/{key}"><button>Sign in to add it to your account</button></a></p>'
                f'<p>Administrators can <a id="admin-signin" href="/oidc/login/{key}?purpose=admin">sign in</a>'
                " to approve it for another user, or reject it.</p>"
            )
            return _page("Add this machine", body)
        state = self.tailnet.state
        admin = state.users[session.user_id]
        options = "".join(
            f'<option value="{u.id}">{html.escape(u.name)}</option>'
            for u in sorted(state.users.values(), key=lambda u: u.name)
        )
        csrf = html.escape(session.csrf)
        body += (
            f"<p>Signed in as <b>{html.escape(admin.name)}</b> ({html.escape(admin.role)}).</p>"
            f'<form id="approve" method="post" action="/register/{key}/approve">'
            f'<input type="hidden" name="csrf" value="{csrf}">'
            f'<label>Register it for <select name="user" id="user">{options}</select></label> '
            '<button type="submit">Approve</button></form>'
            f'<form id="reject" method="post" action="/register/{key}/reject">'
            f'<input type="hidden" name="csrf" value="{csrf}">'
            '<label>Reason <input name="reason" id="reason" maxlength="200"></label> '
            '<button type="submit">Reject</button></form>'
            f'<form method="post" action="/oidc/logout"><input type="hidden" name="csrf" value="{csrf}">'
            '<button type="submit">Sign out</button></form>'
        )
        return _page("Approve this machine", body)

    async def login(self, auth_id: str) -> Response:
        if self.oidc is None:
            return _page("Not available", "<p>Sign-in is not configured on this server.</p>", 404)
        pending = await self._pending(auth_id)
        if isinstance(pending, Response):
            return pending
        purpose = "admin" if request.args.get("purpose") == "admin" else "register"
        self.oidc.redirect_uri = f"{self.public_url}/oidc/callback"
        try:
            url, browser = await self.oidc.begin(auth_id, purpose)
        except LoginRefused as exc:
            return self._refused(exc)
        response = _redirect(url, 302)
        self._set_cookie(response, LOGIN_COOKIE, browser, path="/oidc/callback", max_age=600)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def callback(self) -> Response:
        if self.oidc is None:
            return _page("Not available", "<p>Sign-in is not configured on this server.</p>", 404)
        params = {k: v for k, v in request.args.items()}
        try:
            login, who = await self.oidc.finish(params, request.cookies.get(LOGIN_COOKIE))
            response = await self._signed_in(login.auth_id, login.purpose, who)
        except LoginRefused as exc:
            response = self._refused(exc)
        response.delete_cookie(LOGIN_COOKIE, path="/oidc/callback", secure=self.secure, httponly=True, samesite="Lax")
        return response

    async def _signed_in(self, auth_id: str, purpose: str, who: Identity) -> Response:
        assert self.oidc is not None
        pending = await self._pending(auth_id)
        if isinstance(pending, Response):
            log.warning("sign-in of %s for registration %s refused: the request expired or was rejected", who.actor, auth_id)
            return pending
        check_access(self.oidc.config, who)
        tailnet = self.tailnet
        if purpose == "admin":
            # Decide before appending anything: a non-admin's attempt leaves no trace in the log.
            decision = decide_login_user(tailnet.runner.state, self.oidc.config, who)
            state = tailnet.runner.state
            existing = state.users.get(decision.result)
            in_admin_group = bool(set(who.groups) & set(self.oidc.config.admin_groups))
            if not in_admin_group and (existing is None or not existing.is_admin):
                raise LoginRefused(
                    f"{who.actor} is not an admin of this tailnet",
                    "You are not an administrator of this tailnet. To add this machine to your own account, use the other sign-in.",
                )
        config = self.oidc.config
        try:
            user_id, _ = await tailnet.execute(lambda s: decide_login_user(s, config, who), actor=who.actor)
        except CommandError as exc:
            raise LoginRefused(f"recording the sign-in of {who.actor} failed: {exc}", str(exc), status=409) from None
        user = tailnet.runner.state.users[user_id]
        if purpose == "admin":
            if not user.is_admin:
                raise LoginRefused(f"{who.actor} is not an admin of this tailnet", "You are not an administrator of this tailnet.")
            self._sessions = {k: v for k, v in self._sessions.items() if time.monotonic() - v.created <= SESSION_TTL}
            if len(self._sessions) >= MAX_SESSIONS:
                raise LoginRefused("too many admin sessions", "Too many administrators are signed in; try again later.", status=503)
            sid = secrets.token_urlsafe(32)
            self._sessions[sid] = _Session(user.id, who.actor, secrets.token_urlsafe(32), time.monotonic())
            log.info("admin %s (%s) signed in on the web", user.name, who.actor)
            response = _redirect(f"/register/{auth_id}", 303)
            self._set_cookie(response, SESSION_COOKIE, sid, path="/", max_age=int(SESSION_TTL))
            return response
        control = self.control
        expiry = self.oidc.node_expiry(who, tailnet.clock())
        try:
            node_id = await control.registration.approve_pending(
                auth_id, str(user.id), who.actor, auth="oidc", expiry=expiry
            )
        except CommandError as exc:
            raise LoginRefused(f"registering {auth_id} for {who.actor} failed: {exc}", str(exc), status=409) from None
        node = tailnet.runner.state.nodes[node_id]
        log.info("node %s registered to %s by sign-in (%s)", node.given_name, user.name, who.actor)
        return _page(
            "Machine added",
            f'<p id="done">The machine <b>{html.escape(node.given_name)}</b> is now in the tailnet as '
            f"<b>{html.escape(user.name)}</b>. You can close this page; it connects by itself.</p>",
        )

    async def signed_in_form(self) -> tuple[_Session, dict[str, str]] | Response:
        """The form posted by a signed-in admin with its session, or the page that
        refuses it (not signed in, or a bad CSRF token)."""
        form = {k: v for k, v in (await request.form).items()}
        session = self._session()
        refused = self._check_form(session, form)
        if refused is not None:
            return refused
        assert session is not None
        return session, form

    async def decide(self, auth_id: str, action: str) -> Response:
        posted = await self.signed_in_form()
        if isinstance(posted, Response):
            return posted
        session, form = posted
        pending = await self._pending(auth_id)
        if isinstance(pending, Response):
            return pending
        control = self.control
        try:
            if action == "approve":
                node_id = await control.registration.approve_pending(auth_id, form.get("user", ""), session.actor, auth="web")
                node = self.tailnet.state.nodes[node_id]
                owner = self.tailnet.state.users[node.user_id]
                return _page(
                    "Machine approved",
                    f'<p id="done">The machine <b>{html.escape(node.given_name)}</b> is now in the tailnet as '
                    f"<b>{html.escape(owner.name)}</b>.</p>",
                )
            reason = form.get("reason", "").strip()
            with caused_by(reason=reason):
                await control.pending.reject(auth_id, session.actor)
            return _page("Machine rejected", '<p id="done">The machine was told that it was rejected.</p>')
        except (CommandError, ValueError) as exc:
            return _page("Not done", f"<p>{html.escape(str(exc))}</p>", 409)

    async def logout(self) -> Response:
        posted = await self.signed_in_form()
        if isinstance(posted, Response):
            return posted
        self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response = _page("Signed out", "<p>You are signed out.</p>")
        response.delete_cookie(SESSION_COOKIE, path="/", secure=self.secure, httponly=True, samesite="Lax")
        return response


def install_register_routes(app: QuartTrio, *, pages: RegisterPages) -> None:
    """Add the routes of ``pages`` to ``app``."""
    app.add_url_rule("/register/<auth_id>", "register_page", pages.register_page, methods=["GET"])
    app.add_url_rule("/oidc/login/<auth_id>", "oidc_login", pages.login, methods=["GET"])
    app.add_url_rule("/oidc/callback", "oidc_callback", pages.callback, methods=["GET"])

    async def approve(auth_id: str) -> Response:
        return await pages.decide(auth_id, "approve")

    async def reject(auth_id: str) -> Response:
        return await pages.decide(auth_id, "reject")

    app.add_url_rule("/register/<auth_id>/approve", "register_approve", approve, methods=["POST"])
    app.add_url_rule("/register/<auth_id>/reject", "register_reject", reject, methods=["POST"])
    app.add_url_rule("/oidc/logout", "oidc_logout", pages.logout, methods=["POST"])
