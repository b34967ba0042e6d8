"""Sign-in with an OpenID Connect provider (``[oidc]``): the authorization code flow.

:class:`OIDCLogin` runs the flow for the registration page (:mod:`cli.register_web`):

1. :meth:`OIDCLogin.begin` makes a login: an unguessable ``state``, a ``nonce`` and a
   PKCE verifier (S256 by default), kept here with the pending request it is for and
   the hash of a secret given to the browser as a cookie; it returns the provider's
   authorization URL (read from the issuer's discovery document).
2. The provider sends the browser back to ``/oidc/callback``;
   :meth:`OIDCLogin.finish` takes the login out of the table (a state is used once:
   a replayed callback is refused), checks that the same browser finished it (the
   cookie), that the answer is from our issuer (RFC 9207 ``iss``, against mix-ups),
   exchanges the code with the verifier, and checks the ID token: signature against
   the provider's keys, ``iss``, ``aud``, ``exp``, ``iat``, ``nonce``, ``azp``,
   ``at_hash`` (authlib's :class:`~authlib.oidc.core.CodeIDToken`).
3. :func:`check_access` applies ``allowed_domains`` / ``allowed_users`` /
   ``allowed_groups`` and ``email_verified_required``; :func:`decide_login_user`
   creates or updates the user from the claims.

A refusal is a :class:`LoginRefused`: its ``reason`` goes to the server's log, its
``message`` to the browser; nothing is appended to the event log.

The provider's TLS certificate is verified (against ``ca_file`` when given) unless
``tls_insecure_skip_verify`` is set. The client secret is sent to the token endpoint
only; it is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from eventlog import Actor, ActorKind
from projections import TailnetState
from projections import commands as c
from projections.errors import CommandError

from .config import OIDCConfig, read_client_secret

__all__ = [
    "Identity",
    "LoginRefused",
    "OIDCLogin",
    "PendingLogin",
    "check_access",
    "decide_login_user",
    "identity_from_claims",
    "user_name_for",
]

log = logging.getLogger(__name__)

#: How long a started login may take at the provider.
LOGIN_TTL = timedelta(minutes=10)
#: Most logins in flight at once (each is a few hundred bytes; anyone can start one).
MAX_LOGINS = 4096
#: How long discovery and keys are trusted before they are read again.
METADATA_TTL = 3600.0
#: Signature algorithms accepted on ID tokens (never "none", never HMAC with the secret).
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


class LoginRefused(Exception):
    """A sign-in that is not accepted.

    Attributes:
        reason: for the server's log (may name the claims).
        message: for the person in the browser.
        status: the HTTP status of the page.
    """

    def __init__(self, reason: str, message: str | None = None, *, status: int = 403) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message or reason
        self.status = status


@dataclass(frozen=True)
class Identity:
    """Who signed in, from the ID token and the userinfo answer."""

    issuer: str
    subject: str
    email: str = ""
    email_verified: bool = False
    name: str = ""
    preferred_username: str = ""
    picture: str = ""
    groups: tuple[str, ...] = ()
    #: The ID token's expiry.
    expires: datetime | None = None

    @property
    def actor(self) -> Actor:
        """``oidc:<issuer>#<sub>``: the actor of every event this sign-in causes."""
        return Actor(kind=ActorKind.OIDC, id=f"{self.issuer}#{self.subject}")


@dataclass(frozen=True)
class PendingLogin:
    """A login in progress at the provider."""

    state: str
    nonce: str
    verifier: str
    #: The pending registration it is for ("" for an admin's sign-in from no request).
    auth_id: str
    #: ``register`` (the machine joins as the user who signs in) or ``admin`` (an
    #: admin signs in to approve requests for others).
    purpose: str
    browser_hash: str
    created: float


def _describe(exc: BaseException) -> str:
    """An exception and its causes (httpx hides the TLS error in the chain)."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 4:
        text = str(seen) or type(seen).__name__
        if text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    return ": ".join(parts)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def identity_from_claims(issuer: str, claims: Mapping[str, Any], groups_claim: str) -> Identity:
    """An :class:`Identity` from verified claims.

    Raises:
        LoginRefused: there is no subject.
    """
    sub = _text(claims.get("sub"))
    if not sub:
        raise LoginRefused("the ID token has no subject", "The identity provider did not say who you are.")
    raw_groups = claims.get(groups_claim)
    if isinstance(raw_groups, str):
        raw_groups = [raw_groups]
    groups = tuple(g for g in raw_groups if isinstance(g, str)) if isinstance(raw_groups, list) else ()
    verified = claims.get("email_verified")
    if isinstance(verified, str):  # some providers send "true"
        verified = verified.lower() == "true"
    exp = claims.get("exp")
    return Identity(
        issuer=issuer,
        subject=sub,
        email=_text(claims.get("email")).strip(),
        email_verified=verified is True,
        name=_text(claims.get("name")).strip(),
        preferred_username=_text(claims.get("preferred_username")).strip(),
        picture=_text(claims.get("picture")).strip(),
        groups=groups,
        expires=datetime.fromtimestamp(exp, UTC) if isinstance(exp, int | float) else None,
    )


def check_access(config: OIDCConfig, who: Identity) -> None:
    """Whether ``who`` may sign in, by ``[oidc]``.

    Raises:
        LoginRefused: with the reason (unverified e-mail, domain, user or group).
    """
    email = who.email.lower()
    if config.email_verified_required and not who.email_verified:
        raise LoginRefused(
            f"e-mail {who.email or '(none)'} of {who.subject} is not verified",
            "Your identity provider has not verified your e-mail address, and this tailnet requires it.",
        )
    if config.allowed_domains:
        domain = email.rpartition("@")[2] if "@" in email else ""
        if domain not in {d.lower() for d in config.allowed_domains}:
            raise LoginRefused(
                f"e-mail domain {domain or '(none)'} of {who.subject} is not in oidc.allowed_domains",
                "Accounts of your e-mail domain may not join this tailnet.",
            )
    if config.allowed_users and email not in {u.lower() for u in config.allowed_users}:
        raise LoginRefused(
            f"user {who.email or who.subject} is not in oidc.allowed_users",
            "Your account may not join this tailnet.",
        )
    if config.allowed_groups and not set(who.groups) & set(config.allowed_groups):
        raise LoginRefused(
            f"none of the groups of {who.email or who.subject} ({', '.join(who.groups) or 'none'}) "
            "is in oidc.allowed_groups",
            "None of your groups may join this tailnet.",
        )


def user_name_for(config: OIDCConfig, who: Identity) -> str:
    """The tailnet user name of ``who``: the e-mail (its local part with
    ``strip_email_domain``), else ``preferred_username``, else the subject."""
    if who.email:
        return who.email.partition("@")[0] if config.strip_email_domain else who.email
    return who.preferred_username or who.subject


def _is_admin(state: TailnetState, user_id: int) -> bool:
    user = state.users.get(user_id)
    return bool(user is not None and user.is_admin)


def decide_login_user(state: TailnetState, config: OIDCConfig, who: Identity) -> c.Decision[int]:
    """Create or update the user ``who`` signs in as; the user's id.

    The user is the one already linked to the subject; else a user an admin made
    with the same name and no provider link (linked now, if the e-mail is verified);
    else a new one. Unchanged claims append nothing. Members of ``admin_groups`` are
    made admins (never demoted here: ``users set-role`` does that).

    Raises:
        LoginRefused: the name belongs to another identity.
    """
    display = who.name or who.preferred_username or who.email or who.subject
    user = next(
        (u for u in state.users.values() if u.provider == "oidc" and u.provider_id == who.subject),
        None,
    )
    name = user_name_for(config, who)
    if user is None:
        same_name = state.user_named(name)
        if same_name is not None:
            if same_name.provider_id or not who.email_verified:
                raise LoginRefused(
                    f"user name {name!r} of {who.subject} is taken by user {same_name.id} "
                    f"({same_name.provider}:{same_name.provider_id or 'no link'})",
                    "Another account already uses your user name on this tailnet; ask an administrator.",
                )
            user = same_name
    make_admin = bool(set(who.groups) & set(config.admin_groups))
    if user is None:
        try:
            created = c.decide_create_user(
                state,
                name,
                display_name=display,
                email=who.email,
                provider="oidc",
                provider_id=who.subject,
                profile_pic_url=who.picture,
                role="admin" if make_admin and state.users else None,
            )
        except CommandError as exc:
            raise LoginRefused(
                f"cannot create user {name!r} for {who.subject}: {exc}",
                "Your account cannot be made a user of this tailnet; ask an administrator.",
            ) from None
        return created
    updated = c.decide_update_user_profile(
        state,
        user.id,
        display_name=display,
        email=who.email,
        provider="oidc",
        provider_id=who.subject,
        profile_pic_url=who.picture,
    )
    events = updated.events
    if make_admin and not user.is_admin:
        events += c.decide_set_role(state, str(user.id), "admin").events
    return c.Decision(events, user.id)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class OIDCLogin:
    """The OIDC client of one server.

    Args:
        config: ``[oidc]``.
        redirect_uri: this server's ``/oidc/callback`` URL, as registered at the provider.
        key_expiry: ``oidc.expiry`` as the configuration parsed it
            (``Config.durations.oidc_expiry``); None: ``node_key_expiry``.
        monotonic: the clock of login lifetimes (a test's).
    """

    def __init__(
        self,
        config: OIDCConfig,
        redirect_uri: str,
        *,
        key_expiry: timedelta | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.issuer = config.issuer.rstrip("/")
        self.redirect_uri = redirect_uri
        self._secret = read_client_secret(config)
        self._monotonic = monotonic
        self._logins: dict[str, PendingLogin] = {}
        self._metadata: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._fetched = 0.0
        self._key_expiry = key_expiry

    # -- HTTP ----------------------------------------------------------------------------

    def _verify(self) -> ssl.SSLContext | bool:
        if self.config.tls_insecure_skip_verify:
            return False
        if self.config.ca_file:
            return ssl.create_default_context(cafile=self.config.ca_file)
        return True

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(verify=self._verify(), timeout=15.0, follow_redirects=False)

    async def _get_json(self, client: httpx.AsyncClient, url: str, **kw: Any) -> dict[str, Any]:
        try:
            response = await client.get(url, **kw)
        except httpx.HTTPError as exc:
            raise LoginRefused(
                f"cannot reach the identity provider at {url}: {_describe(exc)}",
                "The identity provider cannot be reached; try again later.",
                status=502,
            ) from None
        if response.status_code != 200:
            raise LoginRefused(
                f"{url} answered HTTP {response.status_code}",
                "The identity provider answered with an error; try again later.",
                status=502,
            )
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise LoginRefused(f"{url} did not answer a JSON object", "The identity provider answered nonsense.", status=502)
        return data

    async def metadata(self, *, refresh: bool = False) -> dict[str, Any]:
        """The issuer's discovery document (cached for :data:`METADATA_TTL`).

        Raises:
            LoginRefused: unreachable, not TLS-verified, or for another issuer.
        """
        now = self._monotonic()
        if self._metadata is not None and not refresh and now - self._fetched < METADATA_TTL:
            return self._metadata
        async with self._client() as client:
            meta = await self._get_json(client, f"{self.issuer}/.well-known/openid-configuration")
            if _text(meta.get("issuer")).rstrip("/") != self.issuer:
                raise LoginRefused(
                    f"the discovery document names issuer {meta.get('issuer')!r}, not {self.issuer!r}",
                    "The identity provider is misconfigured.",
                    status=502,
                )
            for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not _text(meta.get(field)):
                    raise LoginRefused(f"the discovery document has no {field}", "The identity provider is misconfigured.", status=502)
            jwks = await self._get_json(client, meta["jwks_uri"])
        try:
            keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise LoginRefused(f"the provider's keys are unusable: {exc}", "The identity provider is misconfigured.", status=502) from None
        self._metadata, self._keys, self._fetched = meta, keys, now
        return meta

    # -- the flow ------------------------------------------------------------------------

    def _sweep(self) -> None:
        limit = self._monotonic() - LOGIN_TTL.total_seconds()
        for state in [s for s, login in self._logins.items() if login.created < limit]:
            del self._logins[state]

    async def begin(self, auth_id: str, purpose: str) -> tuple[str, str]:
        """Start a login; returns the provider's authorization URL and the secret the
        browser must present at the callback (a cookie).

        Raises:
            LoginRefused: the provider is unreachable, or too many logins are in flight.
        """
        meta = await self.metadata()
        self._sweep()
        if len(self._logins) >= MAX_LOGINS:
            raise LoginRefused("too many sign-ins in progress", "Too many sign-ins are in progress; try again later.", status=503)
        browser = secrets.token_urlsafe(32)
        login = PendingLogin(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            verifier=secrets.token_urlsafe(48),
            auth_id=auth_id,
            purpose=purpose,
            browser_hash=_hash(browser),
            created=self._monotonic(),
        )
        self._logins[login.state] = login
        params: dict[str, str] = dict(self.config.extra_params)
        params["nonce"] = login.nonce
        if self.config.pkce.enabled:
            params["code_challenge_method"] = self.config.pkce.method
            params["code_challenge"] = (
                create_s256_code_challenge(login.verifier) if self.config.pkce.method == "S256" else login.verifier
            )
        url = prepare_grant_uri(
            meta["authorization_endpoint"],
            self.config.client_id,
            "code",
            redirect_uri=self.redirect_uri,
            scope=" ".join(self.config.scope),
            state=login.state,
            **params,
        )
        return str(url), browser

    async def finish(self, params: Mapping[str, str], browser: str | None) -> tuple[PendingLogin, Identity]:
        """Complete the login the provider sent the browser back with.

        Raises:
            LoginRefused: anything amiss (see the module's documentation).
        """
        state = params.get("state", "")
        login = self._logins.pop(state, None)
        if login is None:
            raise LoginRefused(
                "unknown, expired or already used login state",
                "This sign-in link is not valid (it was already used, has expired, or was altered). Start again from the machine's link.",
                status=400,
            )
        if browser is None or not hmac.compare_digest(_hash(browser), login.browser_hash):
            raise LoginRefused(
                "the callback came from another browser than the one that started the login",
                "This sign-in was started in another browser. Start again from the machine's link.",
                status=400,
            )
        if self._monotonic() - login.created > LOGIN_TTL.total_seconds():
            raise LoginRefused("the login took too long", "This sign-in took too long. Start again from the machine's link.", status=400)
        iss = params.get("iss")
        if iss is not None and iss.rstrip("/") != self.issuer:
            raise LoginRefused(f"the callback names issuer {iss!r}, not ours", "This answer came from another identity provider.", status=400)
        if "error" in params:
            raise LoginRefused(
                f"the provider refused: {params['error']} {params.get('error_description', '')}".strip(),
                "The identity provider did not sign you in.",
            )
        code = params.get("code", "")
        if not code:
            raise LoginRefused("the callback has no code", "The identity provider's answer is incomplete.", status=400)
        meta = await self.metadata()
        token = await self._exchange(meta, code, login)
        claims = await self._id_token_claims(token, login)
        userinfo_url = _text(meta.get("userinfo_endpoint"))
        access = _text(token.get("access_token"))
        if userinfo_url and access:
            async with self._client() as client:
                info = await self._get_json(client, userinfo_url, headers={"Authorization": f"Bearer {access}"})
            if info.get("sub") != claims.get("sub"):
                raise LoginRefused("the userinfo subject differs from the ID token's", "The identity provider's answer is inconsistent.", status=502)
            # The ID token's own claims win (they are signed); userinfo fills the rest.
            claims = {**info, **{k: v for k, v in claims.items() if v not in (None, "")}}
        who = identity_from_claims(self.issuer, claims, self.config.groups_claim)
        return login, who

    async def _exchange(self, meta: Mapping[str, Any], code: str, login: PendingLogin) -> dict[str, Any]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
        }
        if self.config.pkce.enabled:
            form["code_verifier"] = login.verifier
        methods = meta.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        kwargs: dict[str, Any] = {}
        if "client_secret_basic" in methods:
            from urllib.parse import quote

            kwargs["auth"] = httpx.BasicAuth(quote(self.config.client_id, safe=""), quote(self._secret, safe=""))
        else:
            form["client_id"] = self.config.client_id
            form["client_secret"] = self._secret
        async with self._client() as client:
            try:
                response = await client.post(meta["token_endpoint"], data=form, **kwargs)
            except httpx.HTTPError as exc:
                raise LoginRefused(
                    f"cannot reach the token endpoint: {_describe(exc)}", "The identity provider cannot be reached; try again later.", status=502
                ) from None
        try:
            token = response.json()
        except ValueError:
            token = None
        if response.status_code != 200 or not isinstance(token, dict):
            error = token.get("error", "") if isinstance(token, dict) else ""
            raise LoginRefused(
                f"the token endpoint refused the code: HTTP {response.status_code} {error}".strip(),
                "The identity provider did not confirm the sign-in. Start again from the machine's link.",
                status=400,
            )
        return token

    async def _id_token_claims(self, token: Mapping[str, Any], login: PendingLogin) -> dict[str, Any]:
        raw = _text(token.get("id_token"))
        if not raw:
            raise LoginRefused("the token answer has no ID token (is 'openid' in the scope?)", "The identity provider's answer is incomplete.", status=502)
        decoded = None
        for refresh in (False, True):  # the provider may have rotated its keys
            if refresh:
                await self.metadata(refresh=True)
            assert self._keys is not None
            try:
                decoded = jwt.decode(raw, self._keys, algorithms=ID_TOKEN_ALGORITHMS)
                break
            except JoseError as exc:
                if refresh:
                    raise LoginRefused(f"the ID token's signature does not verify: {exc}", "The identity provider's answer could not be verified.", status=400) from None
        assert decoded is not None
        claims = CodeIDToken(
            decoded.claims,
            decoded.header,
            options={
                "iss": {"essential": True, "value": self.issuer},
                "aud": {"essential": True, "value": self.config.client_id},
                "sub": {"essential": True},
            },
            params={"nonce": login.nonce, "client_id": self.config.client_id, "access_token": token.get("access_token")},
        )
        # Compare issuers without a trailing slash (providers differ in how they print it).
        if _text(decoded.claims.get("iss")).rstrip("/") == self.issuer:
            claims["iss"] = self.issuer
        try:
            claims.validate(leeway=60)
        except Exception as exc:  # authlib's JoseError family; its message names the claim
            raise LoginRefused(f"the ID token is not valid: {exc}", "The identity provider's answer could not be verified.", status=400) from None
        if not hmac.compare_digest(_text(decoded.claims.get("nonce")), login.nonce):
            raise LoginRefused("the ID token's nonce is not this login's", "The identity provider's answer could not be verified.", status=400)
        return dict(decoded.claims)

    # -- node key expiry -----------------------------------------------------------------

    def node_expiry(self, who: Identity, now: datetime) -> datetime | Literal["default"] | None:
        """The key expiry of a node registered by ``who``: the ID token's with
        ``use_expiry_from_token``, else ``oidc.expiry``, else ``"default"``
        (``node_key_expiry``)."""
        if self.config.use_expiry_from_token and who.expires is not None:
            return who.expires
        if self._key_expiry is not None:
            return now + self._key_expiry
        return "default"


def same_origin(url: str, origin: str) -> bool:
    """Whether ``origin`` (an Origin header) is the scheme, host and port of ``url``."""
    a, b = urlsplit(url), urlsplit(origin)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)
