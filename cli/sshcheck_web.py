"""The SSH check page, ``/ssh/check/<id>`` (see :mod:`protocol.sshcheck`).

The SSH user is shown this URL while the connection is held. The page says which
connection waits; an administrator signed in to this server's pages (OIDC, see
:mod:`cli.register_web`) approves or rejects it there (CSRF-protected forms, recorded
with the administrator as actor), anyone else is told the CLI command.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from quart import Response

from projections.errors import CommandError
from protocol.sshcheck import PendingCheck

from .register_web import RegisterPages, _page

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from protocol.sshcheck import SshChecks

__all__ = ["install_ssh_check_routes"]


def install_ssh_check_routes(app: QuartTrio, *, checks: SshChecks, pages: RegisterPages) -> None:
    def open_check(check_id: str) -> Response | PendingCheck:
        check = checks.pending.get(check_id)
        if check is None or check.outcome is not None:
            return _page("SSH check not found", "<p>This SSH check is unknown, decided or expired.</p>", 404)
        return check

    async def check_page(check_id: str) -> Response:
        found = open_check(check_id)
        if isinstance(found, Response):
            return found
        view = checks.view(found)
        rows = "".join(
            f"<tr><th>{label}</th><td id=\"{key}\">{html.escape(str(view[key]))}</td></tr>"
            for key, label in (("from", "From"), ("to", "To"), ("local_user", "As user"))
        )
        body = f"<p>An SSH connection waits for an additional check:</p><table>{rows}</table>"
        session = pages._session()
        if session is not None:
            cid = html.escape(check_id)
            csrf = html.escape(session.csrf)
            body += (
                f'<form method="post" action="/ssh/check/{cid}/approve"><input type="hidden" name="csrf" '
                f'value="{csrf}"><button id="approve">Approve</button></form>'
                f'<form method="post" action="/ssh/check/{cid}/reject"><input type="hidden" name="csrf" '
                f'value="{csrf}"><input name="reason" placeholder="reason"><button id="reject">Reject</button></form>'
            )
        else:
            body += (
                "<p>An administrator of this tailnet approves it with:</p>"
                f"<p><code>tailledger ssh approve {html.escape(check_id)}</code></p>"
            )
        return _page("SSH check", body)

    async def decide(check_id: str, approve: bool) -> Response:
        posted = await pages.signed_in_form()
        if isinstance(posted, Response):
            return posted
        session, form = posted
        found = open_check(check_id)
        if isinstance(found, Response):
            return found
        try:
            await checks.decide(
                found, approve=approve, actor=session.actor, reason=form.get("reason", "").strip()
            )
        except CommandError as exc:
            return _page("Not done", f"<p>{html.escape(str(exc))}</p>", 409)
        return _page("SSH check decided", f'<p id="done">The connection was {"approved" if approve else "refused"}.</p>')

    async def approve(check_id: str) -> Response:
        return await decide(check_id, True)

    async def reject(check_id: str) -> Response:
        return await decide(check_id, False)

    app.add_url_rule("/ssh/check/<check_id>", "ssh_check_page", check_page, methods=["GET"])
    app.add_url_rule("/ssh/check/<check_id>/approve", "ssh_check_approve", approve, methods=["POST"])
    app.add_url_rule("/ssh/check/<check_id>/reject", "ssh_check_reject", reject, methods=["POST"])
