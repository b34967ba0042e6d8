"""``/machine/register``: the order in which a registration is decided.

The decisions themselves are pure functions of :mod:`projections.commands`
(``decide_logout_node``, ``decide_login_known``, ``decide_login_with_key``,
``decide_login_approved``), appended by :class:`~protocol.control.decisions.Decisions`
with the node (identified by its machine key) or the approving admin as the actor.
:class:`Registration` only picks which one applies, in Headscale's ``handleRegister``
order (control-protocol.md §7):

1. an ``Expiry`` in the past is a logout (checked first, even with an auth key);
2. a known node key without an auth key is a daemon restart: answer the current state
   (re-recording the Hostinfo it brought, rate-limited);
3. ``Followup`` waits for an interactive approval (``tailledger nodes register``, or
   :meth:`Registration.approve_pending` from the web sign-in) or rejection
   (``nodes reject``), answered as a streamed body that keeps nothing of the request
   (see :mod:`protocol.registrations`);
4. an auth key registers a new node, or re-keys the machine's existing node
   (rate-limited like 2);
5. anything else starts an interactive registration and answers an ``AuthURL``, unless
   the caps on pending registrations refuse it.

Before any of it the Hostinfo passes :meth:`HostinfoGate.check
<protocol.control.hostinfo.HostinfoGate.check>`. Errors a user should see are answered
as HTTP 200 with ``Error`` set; only an unsupported client version or an undecodable
body gets an HTTP error (:mod:`protocol.control.messages`). Every lookup by node key
checks the Noise peer's machine key (pitfall 9).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Literal
from urllib.parse import urlparse

import msgspec

from eventlog import Actor, ActorKind, EventLogError, caused_by
from eventlog.sidetables import Admission, PendingRegistration
from projections import CommandError, NotFoundError, Tailnet
from projections import commands as c
from projections.admin import AdminOps, decode_args
from projections.state import TailnetState
from projections.tailcfg import (
    RegisterRequest,
    RegisterResponse,
    decode_register_request,
    encode,
    time_or_none,
)

from ..handler import NoiseRequest, NoiseResponse
from ..registrations import Approved, Expired, Gone, Outcome, PendingRegistrations, Rejected
from .decisions import Decisions
from .hostinfo import HostinfoGate, reported
from .messages import JSON, decode_keyed, register_error, register_response, rejected

__all__ = ["Registration"]

log = logging.getLogger(__name__)


class _RegisterArgs(msgspec.Struct, forbid_unknown_fields=True):
    """``nodes.register``: the pending request's id (the AuthURL's last part) and the
    user (name or id) the machine is registered to."""

    key: str
    user: str


def node_actor(machine_key: str) -> Actor:
    """The actor of what a node does: its machine key."""
    return Actor(kind=ActorKind.NODE, id=machine_key)


class Registration:
    """Decides ``/machine/register`` requests and interactive approvals.

    Args:
        tailnet: commands and the current projection.
        pending: where interactive registrations wait.
        decisions: appends the logins.
        hostinfo: checks and rate-limits what the node reports.
        public_url: where AuthURLs point (read at each registration: the embedding
            program may change it once the listening port is known).
    """

    def __init__(
        self,
        tailnet: Tailnet,
        pending: PendingRegistrations,
        decisions: Decisions,
        hostinfo: HostinfoGate,
        public_url: Callable[[], str],
    ) -> None:
        self._tailnet = tailnet
        self._pending = pending
        self._decisions = decisions
        self._hostinfo = hostinfo
        self._public_url = public_url

    def register_admin_ops(self, ops: AdminOps) -> None:
        ops.register("nodes.register", self._admin_register)
        self._pending.register_admin_ops(ops)

    async def handle(self, request: NoiseRequest) -> NoiseResponse:
        """Answer a ``/machine/register`` request."""
        decoded = decode_keyed(request.body, decode_register_request, "register")
        if isinstance(decoded, NoiseResponse):
            return decoded
        rr, raw_nk = decoded
        if raw_nk is None:
            return register_error("the register request has no node key")
        mk = request.machine_key.hex()
        refused = self._hostinfo.check(rr.hostinfo)
        if refused is not None:
            return register_error(refused)
        try:
            with caused_by():  # one login: its events share a correlation id
                return await self._decide(rr, mk, raw_nk.hex(), request.remote_addr)
        except CommandError as exc:
            return register_error(str(exc))

    async def _decide(self, rr: RegisterRequest, mk: str, nk: str, source: str) -> NoiseResponse:
        now = self._tailnet.clock()
        actor = node_actor(mk)
        state = self._tailnet.state
        node = state.node_by_key(nk)
        expiry = time_or_none(rr.expiry)
        if node is not None and node.machine_key != mk:
            return register_error("this node key belongs to another machine")

        # 1. Logout: an expiry in the past.
        if expiry is not None and expiry <= now:
            if node is None:
                return NoiseResponse(200, JSON, encode(RegisterResponse(node_key_expired=True)))
            await self._tailnet.execute(
                lambda s: c.decide_logout_node(s, s.nodes[node.id], now=now), actor=actor
            )
            return NoiseResponse(200, JSON, encode(RegisterResponse(node_key_expired=True)))

        auth_key = rr.auth.auth_key if rr.auth is not None else ""
        # 2. A known key without an auth key (or with one it already used): restart.
        if node is not None and not rr.followup:
            if node.is_expired(now):
                if not auth_key:
                    return register_response(state, node, node_key_expired=True)
            else:
                shorten = expiry is not None and (node.expiry is None or expiry < node.expiry)
                if expiry is not None and not shorten:
                    return register_error("extending the key expiry is not allowed")
                host = reported(rr.hostinfo)
                rules = self._decisions.rules()

                def relogin(s: TailnetState) -> c.Decision[int]:
                    return c.decide_login_known(
                        s, s.nodes[node.id], shorten_expiry_to=expiry if shorten else None,
                        host=host, now=now, rules=rules,
                    )

                refused = self._hostinfo.spend(node, len(relogin(state).events))
                if refused is not None:
                    return register_error(refused)
                await self._decisions.append(relogin, actor, node.id)
                return register_response(self._tailnet.state, self._tailnet.state.nodes[node.id])

        # 3. Follow-up of an interactive registration.
        if rr.followup:
            auth_id = urlparse(rr.followup).path.rstrip("/").rsplit("/", 1)[-1]
            pending = await self._pending.get(auth_id)
            if pending is not None and pending.machine_key == mk and pending.node_key == nk:
                if pending.rejected_reason is not None:
                    return rejected(pending.rejected_reason)
                # The answer is a body streamed once decided: the wait keeps nothing of
                # this request (its Hostinfo may be a megabyte), only the ids.
                return NoiseResponse(200, JSON, stream=self._await_decision(pending))
            state = self._tailnet.state
            approved = state.node_by_key(nk)
            if approved is not None and approved.machine_key == mk and not approved.is_expired(now):
                # Approved while the client was not waiting (it reconnected, or the
                # server restarted): the node is its answer.
                return register_response(state, approved)
            # Unknown or stale follow-up: start over with a fresh URL below.

        # 4. Pre-auth key.
        if auth_key:
            return await self._register_with_key(rr, mk, nk, auth_key, now, actor)

        # 5. Interactive.
        return await self._start_interactive(rr, mk, nk, source)

    async def _register_with_key(
        self, rr: RegisterRequest, mk: str, nk: str, text: str, now: datetime, actor: Actor
    ) -> NoiseResponse:
        existing = self._tailnet.state.node_by_machine(mk)
        if existing is not None and existing.node_key == nk and not existing.is_expired(now):
            # A container re-running `up --authkey` with a spent one-shot key.
            return register_response(self._tailnet.state, existing)
        host = reported(rr.hostinfo)
        rules = self._decisions.rules()

        def decide(state: TailnetState) -> c.Decision[int]:
            return c.decide_login_with_key(
                state, machine_key=mk, node_key=nk, auth_key=text, host=host, now=now, rules=rules
            )

        if existing is not None:
            # A re-key appends two events (and maybe the Hostinfo's): rate-limited.
            refused = self._hostinfo.spend(existing, len(decide(self._tailnet.state).events))
            if refused is not None:
                return register_error(refused)
        node_id = await self._decisions.append(decide, actor, 0)
        return register_response(self._tailnet.state, self._tailnet.state.nodes[node_id])

    async def _start_interactive(
        self, rr: RegisterRequest, mk: str, nk: str, source: str
    ) -> NoiseResponse:
        try:
            pending = await self._pending.start(
                machine_key=mk, node_key=nk, hostinfo=rr.hostinfo, ephemeral=rr.ephemeral, source=source
            )
        except EventLogError as exc:
            log.warning("cannot store a pending registration: %s", exc)
            return register_error("the server cannot take interactive registrations right now; try again later")
        if not isinstance(pending, PendingRegistration):
            return register_error(
                "too many machines are waiting for approval"
                + (" from your address" if pending is Admission.SOURCE_CAP else "")
                + "; try again later, or ask an administrator for an auth key"
            )
        url = f"{self._public_url()}/register/{pending.auth_id}"
        return NoiseResponse(200, JSON, encode(RegisterResponse(auth_url=url)))

    async def _await_decision(self, pending: PendingRegistration) -> AsyncIterator[bytes]:
        """The streamed answer to a follow-up: written once the request is decided."""
        outcome = await self._pending.wait(pending)
        yield await self._decision_answer(outcome, pending.machine_key, pending.node_key)

    async def _decision_answer(self, outcome: Outcome, mk: str, nk: str) -> bytes:
        if isinstance(outcome, Rejected):
            return rejected(outcome.reason).body or b""
        if isinstance(outcome, Approved | Gone):
            if isinstance(outcome, Gone):
                # Decided elsewhere: the node, if approved, is in the log; catch up first.
                await self._tailnet.runner.wait_for((await self._tailnet.log.head()).seq)
            state = self._tailnet.state
            node = state.node_by_key(nk)
            if node is not None and node.machine_key == mk:
                return register_response(state, node).body or b""
            if isinstance(outcome, Approved):
                return encode(RegisterResponse(error="the registration was approved but the node is gone"))
        if isinstance(outcome, Expired | Gone):
            return encode(
                RegisterResponse(
                    error="the registration request expired before an administrator approved it; log in again"
                )
            )
        return encode(RegisterResponse(error="a newer login of this machine took over this request"))

    async def _admin_register(self, raw: dict[str, object], actor: Actor) -> object:
        """``tailledger nodes register --key AUTH_ID --user USER``."""
        args = decode_args(_RegisterArgs, raw)
        node_id = await self.approve_pending(args.key, args.user, actor)
        return {"registered": node_id, "name": self._tailnet.state.nodes[node_id].given_name}

    async def approve_pending(
        self,
        auth_id: str,
        user_ref: str,
        actor: Actor,
        *,
        auth: str = "cli",
        expiry: datetime | Literal["default"] | None = "default",
    ) -> int:
        """Register the machine of the pending request ``auth_id`` to the user
        ``user_ref`` (name or id), as ``actor``; answer its waiting client.

        Args:
            auth: how it was approved, as recorded (``cli``, ``oidc``, ``web``).
            expiry: the node key's expiry; ``"default"``: ``node_key_expiry``.

        Returns:
            The node's id.

        Raises:
            NotFoundError: no such request (or it expired), or no such user.
            CommandError: it was rejected, or the registration is refused.
        """
        pending = await self._pending.get(auth_id)
        if pending is None:
            raise NotFoundError(
                f"no pending registration with key {auth_id!r} (it may have expired)"
            )
        if pending.rejected_reason is not None:
            raise CommandError(
                f"the registration {auth_id!r} was rejected by {pending.rejected_by}; "
                "the machine must log in again"
            )
        now = self._tailnet.clock()

        host = c.ReportedHost(hostname=pending.hostname, os=pending.os, request_tags=pending.request_tags)
        rules = self._decisions.rules()

        def decide(state: TailnetState) -> c.Decision[int]:
            return c.decide_login_approved(
                state, machine_key=pending.machine_key, node_key=pending.node_key,
                user_ref=user_ref, ephemeral=pending.ephemeral, host=host, now=now, rules=rules,
                auth=auth, expiry=expiry,
            )

        node_id = await self._decisions.append(decide, actor, 0)
        # Routes and the rest of the Hostinfo arrive with the node's first map request.
        await self._pending.approved(auth_id, node_id)
        return node_id
