"""The control logic behind the tunnel: ``/machine/register`` and ``/machine/map``.

This is the :class:`~protocol.handler.ControlHandler` the transport calls for every
request inside a Noise tunnel. It decides registrations against the current
projection and appends what happened to the log (with the node, identified by its
machine key, or the approving admin as the actor); it serves map long-polls from the
projection and the presence table, and it never changes state any other way.

Register (control-protocol.md §7, Headscale's ``handleRegister`` order):

1. an ``Expiry`` in the past is a logout (checked first, even with an auth key);
2. a known node key without an auth key is a daemon restart: answer the current state;
3. ``Followup`` waits for an interactive approval (``tailledger nodes register``) or
   rejection (``nodes reject``), answered as a streamed body that keeps nothing of the
   request (see :mod:`protocol.registrations`);
4. an auth key registers a new node, or re-keys the machine's existing node;
5. anything else starts an interactive registration and answers an ``AuthURL``, unless
   the caps on pending registrations refuse it.

Errors a user should see are answered as HTTP 200 with ``Error`` set (the client shows
it); only an unsupported client version or an undecodable body gets an HTTP error.

Map: a streaming request opens a long-poll that first sends the full netmap, then the
smallest update whenever the log or the presence of a visible peer changes (bursts are
coalesced for :attr:`ControlSettings.coalesce` seconds), and a keep-alive when nothing
happened for :attr:`ControlSettings.keepalive_interval` seconds. A node has one
long-poll: a newer one ends the older. Lite updates (``OmitPeers``, not streaming)
only report endpoints and Hostinfo; one-shot maps (neither) wait for a full-map turn
like streams.

What a node can make the server keep or write is bounded (:class:`ControlLimits`): its
Hostinfo is refused above a size and kept only as peers see it
(:func:`~projections.tailcfg.peer_hostinfo`), its host name is cleaned and cut, its
routes are counted, and updates that append to the log are rate-limited per node. A
node whose key expired or that logged out gets only its own node, marked expired,
and its updates are ignored. Every refusal is counted in :class:`ControlStats`.

Every lookup by node key checks the Noise peer's machine key (pitfall 9).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, TypeVar
from urllib.parse import urlparse

import msgspec
import trio
import trio.lowlevel

from eventlog import Actor, ActorKind, EventLogError, caused_by
from eventlog.sidetables import Admission, PendingRegistration
from projections import AddressPlan, CommandError, NotFoundError, Tailnet, UnavailableError
from projections import commands as c
from projections.admin import AdminOps
from projections.mapviews.cursor import StreamCursor
from projections.mapviews.hub import MapHub
from projections.netmap import NetmapSettings
from projections.policystate import PolicyCompiler
from projections.presence import PresenceTable
from projections.state import Node, TailnetState
from projections.tailcfg import (
    DERPMap,
    DNSConfig,
    Hostinfo,
    KeyFormatError,
    KeyPrefix,
    Login,
    MapRequest,
    RegisterRequest,
    RegisterResponse,
    User,
    decode_map_request,
    decode_register_request,
    encode,
    parse_key,
    peer_hostinfo,
    time_or_none,
)

from .handler import NoiseRequest, NoiseResponse, Park
from .mapframe import keepalive_frame
from .mapwire import MapWire
from .ratelimit import TokenBuckets
from .registrations import (
    Approved,
    Expired,
    Gone,
    Outcome,
    PendingLimits,
    PendingRegistrations,
    Rejected,
)

__all__ = ["MIN_CAPABILITY_VERSION", "Control", "ControlLimits", "ControlSettings", "ControlStats"]

log = logging.getLogger(__name__)

#: Clients older than this are refused (Headscale's floor: v1.80).
MIN_CAPABILITY_VERSION = 113

_JSON = (("content-type", "application/json"),)
#: Stream groups woken one after another by a publication (see Control._wake_streams).
_WAKE_GROUPS = 64
#: A presence-only fan-out may use at most 1/_PRESENCE_PACING of the time...
_PRESENCE_PACING = 5
#: ...but presence is never held back longer than this many seconds.
_PRESENCE_MAX_HOLD = 3.0
#: Keep-alive ticks per keep-alive interval (see Control._tick_keepalives).
_KEEPALIVE_TICKS = 4


@dataclass(frozen=True)
class ControlLimits:
    """What one node may make the server keep or write (``[limits]`` in the config)."""

    #: Largest Hostinfo accepted, in bytes of JSON.
    max_hostinfo_bytes: int = 16384
    #: Longest host name recorded (longer ones are cut).
    max_hostname_length: int = c.MAX_HOSTNAME_LENGTH
    #: Most routes one node may advertise.
    max_advertised_routes: int = 512
    #: Log-writing updates per node: a bucket of this many...
    node_update_burst: int = 10
    #: ...regaining one every this many seconds.
    node_update_interval: float = 30.0


@dataclass
class ControlStats:
    """What the limits refused or dropped (exported as metrics)."""

    #: Requests refused because their Hostinfo was larger than the limit.
    hostinfo_too_large: int = 0
    #: Requests refused because they advertised too many routes.
    too_many_routes: int = 0
    #: Host names cut to the limit (or cleaned of control characters).
    hostnames_cleaned: int = 0
    #: Log-writing updates refused by the per-node rate limit.
    updates_rate_limited: int = 0
    #: Hostinfo updates ignored because the node's key expired or it logged out.
    expired_updates_ignored: int = 0
    #: Map long-polls ended by a newer one of the same node.
    streams_superseded: int = 0


@dataclass(frozen=True)
class ControlSettings:
    """Configuration the control logic needs (from ``cli.config``)."""

    public_url: str
    plan: AddressPlan
    netmap: NetmapSettings
    node_key_expiry: timedelta | None = None
    keepalive_interval: float = 55.0
    coalesce: float = 0.05
    presence_coalesce: float = 0.5
    offline_grace: float = 5.0
    ephemeral_timeout: timedelta | None = timedelta(minutes=30)
    #: Full maps being sent at once; other new streams wait their turn (a restart's
    #: reconnect herd would otherwise buffer one full map per client at the same time).
    full_map_concurrency: int = 32
    #: Longest a full map may hold its turn (a client that stopped reading).
    full_map_turn: float = 10.0
    limits: ControlLimits = field(default_factory=ControlLimits)


class _Turn:
    """One held unit of a semaphore, given back once: by its holder or by a timer."""

    __slots__ = ("_done", "_semaphore")

    def __init__(self, semaphore: trio.Semaphore) -> None:
        self._semaphore = semaphore
        self._done = trio.Event()

    def release(self) -> None:
        if not self._done.is_set():
            self._done.set()
            self._semaphore.release()

    async def expire(self, after: float) -> None:
        with trio.move_on_after(after):
            await self._done.wait()
        self.release()


class _Poll:
    """The long-poll a node has open (there is one: a newer one ends it)."""

    __slots__ = ("cancel", "superseded")

    def __init__(self, cancel: Callable[[], None] | None) -> None:
        self.cancel = cancel
        self.superseded = False


class _Wake:
    """One event many sources can set; re-armed after each wait."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def set(self) -> None:
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()
        self.event = trio.Event()


def _register_response(state: TailnetState, node: Node, **extra: object) -> NoiseResponse:
    user = state.users.get(node.user_id)
    name = user.name if user else "tagged-devices"
    display = (user.display_name if user else "") or name
    body = RegisterResponse(
        user=User(id=node.user_id, display_name=display, created=user.created_at if user else None),
        login=Login(
            id=node.user_id, login_name=user.login_name if user else name, display_name=display
        ),
        machine_authorized=True,
        **extra,  # type: ignore[arg-type]
    )
    return NoiseResponse(200, _JSON, encode(body))


def _reported(hostinfo: Hostinfo | None) -> c.ReportedHost | None:
    """What of a Hostinfo goes to the log (``None``: the client sent none)."""
    if hostinfo is None:
        return None
    return c.ReportedHost(
        hostname=hostinfo.hostname or "", os=hostinfo.os or "", routes=tuple(hostinfo.routable_ips or ()),
        request_tags=tuple(hostinfo.request_tags or ()),
    )


def _register_error(message: str) -> NoiseResponse:
    return NoiseResponse(200, _JSON, encode(RegisterResponse(error=message)))


def _rejected(reason: str) -> NoiseResponse:
    why = f": {reason}" if reason else ""
    return _register_error(f"an administrator rejected this machine's registration{why}")


def _http_error(status: int, message: str) -> NoiseResponse:
    return NoiseResponse(
        status, (("content-type", "text/plain; charset=utf-8"),), message.encode() + b"\n"
    )


_Keyed = TypeVar("_Keyed", RegisterRequest, MapRequest)


def _decode_keyed(
    body: bytes, decode: Callable[[bytes], _Keyed], what: str
) -> tuple[_Keyed, bytes | None] | NoiseResponse:
    """Decode a register or map body and its node key; an HTTP error if unusable."""
    try:
        req = decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _http_error(400, f"invalid {what} request: {exc}")
    if req.version < MIN_CAPABILITY_VERSION:
        return _http_error(400, f"unsupported client version: capability {req.version}")
    try:
        return req, parse_key(KeyPrefix.NODE, req.node_key)
    except KeyFormatError as exc:
        return _http_error(400, str(exc))


class Control:
    """The control handler (register, map) over one tailnet.

    Args:
        tailnet: commands and the current projection.
        presence: this server's presence table.
        settings: see :class:`ControlSettings`.
        policy: compiles the policy in force for each state (allow-all until one is set).
        randbelow: randomness for random address allocation.
        pending: where interactive registrations wait (default: an in-memory table
            with the default limits, for tests; the server keeps them beside the log).
    """

    def __init__(
        self,
        tailnet: Tailnet,
        presence: PresenceTable,
        settings: ControlSettings,
        *,
        policy: PolicyCompiler | None = None,
        randbelow: Callable[[int], int] = secrets.randbelow,
        pending: PendingRegistrations | None = None,
    ) -> None:
        self.tailnet = tailnet
        self.presence = presence
        self.settings = settings
        self.policy = policy or PolicyCompiler(settings.public_url)
        self._randbelow = randbelow
        if pending is None:
            from eventlog.sidetables import SideTables

            pending = PendingRegistrations(SideTables(":memory:"), tailnet, PendingLimits())
        self.pending = pending
        #: When run() started: an ephemeral node never seen since counts from here.
        self._started: datetime | None = None
        self._nursery: trio.Nursery | None = None
        self.streams_open = 0
        self.stats = ControlStats()
        #: Each node's open long-poll (see _stream).
        self._polls: dict[int, _Poll] = {}
        #: Log-writing updates per node (see ControlLimits.node_update_burst).
        self._updates = TokenBuckets(settings.limits.node_update_interval, settings.limits.node_update_burst)
        #: Shared peer views of every stream (see :mod:`projections.mapviews`), advanced
        #: by :meth:`_drive_hub` and read by the streams.
        self.hub = MapHub(self.policy, settings.netmap, presence.get)
        #: The bytes of what the hub's streams are sent, each shared message and
        #: full-map piece encoded and framed once (see protocol.mapwire).
        self.wire = MapWire()
        #: Parked streams per group (by node id): the resume callables of their
        #: transports (an idle stream is no task, see protocol.handler.Park), each
        #: with the time its keep-alive falls due (_parking_due, set by the stream
        #: just before it parks), so that the keep-alive ticker resumes only those
        #: due. A publication resumes the groups one after another, so requests that
        #: arrive meanwhile wait for one group's sends, not for every stream's.
        self._parked: list[list[tuple[float, Callable[[], None]]]] = [[] for _ in range(_WAKE_GROUPS)]
        self._parks = [Park(functools.partial(self._park_in, g)) for g in range(_WAKE_GROUPS)]
        self._parking_due = 0.0
        #: Bounds the full maps in flight (see ControlSettings.full_map_concurrency).
        self._full_maps = trio.Semaphore(settings.full_map_concurrency)
        self._hub_wake, self._hub_log_wake = _Wake(), _Wake()
        self._hub_sub = tailnet.runner.subscribe(self._on_log_change)
        self._hub_watch = presence.watch(self._hub_wake.set)
        #: Streams past their full map, reading publications (streams still waiting
        #: for a full-map turn do not count in a fan-out's cost).
        self._listening = 0
        #: Streams yet to handle the latest publication, when it started, and how long
        #: the last complete fan-out took (paces publications, see _drive_hub).
        self._fanout_left = 0
        self._fanout_started = 0.0
        self._fanout_cost = 0.0
        self._wake_pending = False
        self._published_seq = 0
        #: Where AuthURLs point; the embedding program may update it once the real
        #: listening port is known.
        self.public_url = settings.public_url
        #: Whether this server runs the run-once jobs (ephemeral-node clean-up): one
        #: elected replica of several on one log.
        self.leads: Callable[[], bool] = lambda: True
        #: Serves ``/machine/ssh/action/…`` (SSH check mode, protocol/sshcheck.py).
        self.ssh_action: Callable[[NoiseRequest], Awaitable[NoiseResponse]] | None = None

    # -- life cycle ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background duties: offline marking, ephemeral node clean-up."""
        self._started = self.tailnet.clock()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._drive_hub)
            nursery.start_soon(self._tick_keepalives)
            await nursery.start(self.pending.run)
            task_status.started()
            while True:
                await trio.sleep(10)
                self._updates.prune(trio.current_time())
                if self.leads():
                    await self._collect_ephemeral()

    def register_admin_ops(self, ops: AdminOps) -> None:
        ops.register("nodes.register", self._admin_register)
        self.pending.register_admin_ops(ops)

    def _actor(self, machine_key: str) -> Actor:
        return Actor(kind=ActorKind.NODE, id=machine_key)

    # -- dispatch ------------------------------------------------------------------------

    async def __call__(self, request: NoiseRequest) -> NoiseResponse:
        path = request.path.split("?", 1)[0]
        try:
            if path == "/machine/register" and request.method == "POST":
                return await self._register(request)
            if path == "/machine/map" and request.method == "POST":
                return await self._map(request)
            if path.startswith("/machine/ssh/action/") and self.ssh_action is not None:
                return await self.ssh_action(request)
        except UnavailableError as exc:
            # The log cannot record what the request reported (a full disk): a clear
            # error the client retries, with its Hostinfo again, not a 500.
            return _http_error(503, str(exc))
        if path.startswith("/machine/"):
            return _http_error(501, f"{path} is not implemented by this server")
        return _http_error(404, "not found")

    # -- register --------------------------------------------------------------------

    async def _register(self, request: NoiseRequest) -> NoiseResponse:
        decoded = _decode_keyed(request.body, decode_register_request, "register")
        if isinstance(decoded, NoiseResponse):
            return decoded
        rr, raw_nk = decoded
        if raw_nk is None:
            return _register_error("the register request has no node key")
        mk = request.machine_key.hex()
        refused = self._check_hostinfo(rr.hostinfo)
        if refused is not None:
            return _register_error(refused)
        try:
            with caused_by():  # one login: its events share a correlation id
                return await self._decide_register(rr, mk, raw_nk.hex(), request.remote_addr)
        except CommandError as exc:
            return _register_error(str(exc))

    async def _decide_register(
        self, rr: RegisterRequest, mk: str, nk: str, source: str
    ) -> NoiseResponse:
        now = self.tailnet.clock()
        actor = self._actor(mk)
        state = self.tailnet.state
        node = state.node_by_key(nk)
        expiry = time_or_none(rr.expiry)
        if node is not None and node.machine_key != mk:
            return _register_error("this node key belongs to another machine")

        # 1. Logout: an expiry in the past.
        if expiry is not None and expiry <= now:
            if node is None:
                return NoiseResponse(200, _JSON, encode(RegisterResponse(node_key_expired=True)))
            await self.tailnet.execute(
                lambda s: c.decide_logout_node(s, s.nodes[node.id], now=now), actor=actor
            )
            return NoiseResponse(200, _JSON, encode(RegisterResponse(node_key_expired=True)))

        auth_key = rr.auth.auth_key if rr.auth is not None else ""
        # 2. A known key without an auth key (or with one it already used): restart.
        if node is not None and not rr.followup:
            if node.is_expired(now):
                if not auth_key:
                    return _register_response(state, node, node_key_expired=True)
            else:
                shorten = expiry is not None and (node.expiry is None or expiry < node.expiry)
                if expiry is not None and not shorten:
                    return _register_error("extending the key expiry is not allowed")
                host = _reported(rr.hostinfo)
                rules = self._rules()

                def relogin(s: TailnetState) -> c.Decision[int]:
                    return c.decide_login_known(
                        s, s.nodes[node.id], shorten_expiry_to=expiry if shorten else None,
                        host=host, now=now, rules=rules,
                    )

                refused = self._spend(node, len(relogin(state).events))
                if refused is not None:
                    return _register_error(refused)
                await self._login(relogin, actor, node.id)
                return _register_response(self.tailnet.state, self.tailnet.state.nodes[node.id])

        # 3. Follow-up of an interactive registration.
        if rr.followup:
            auth_id = urlparse(rr.followup).path.rstrip("/").rsplit("/", 1)[-1]
            pending = await self.pending.get(auth_id)
            if pending is not None and pending.machine_key == mk and pending.node_key == nk:
                if pending.rejected_reason is not None:
                    return _rejected(pending.rejected_reason)
                # The answer is a body streamed once decided: the wait keeps nothing of
                # this request (its Hostinfo may be a megabyte), only the ids.
                return NoiseResponse(200, _JSON, stream=self._await_decision(pending))
            state = self.tailnet.state
            approved = state.node_by_key(nk)
            if approved is not None and approved.machine_key == mk and not approved.is_expired(now):
                # Approved while the client was not waiting (it reconnected, or the
                # server restarted): the node is its answer.
                return _register_response(state, approved)
            # Unknown or stale follow-up: start over with a fresh URL below.

        # 4. Pre-auth key.
        if auth_key:
            return await self._register_with_key(rr, mk, nk, auth_key, now, actor)

        # 5. Interactive.
        return await self._start_interactive(rr, mk, nk, source)

    def _rules(self) -> c.LoginRules:
        """The settings a login is decided with (see ``commands.decide_login_*``)."""
        limits = self.settings.limits
        return c.LoginRules(
            plan=self.settings.plan,
            node_key_expiry=self.settings.node_key_expiry,
            max_hostname_length=limits.max_hostname_length,
            max_routes=limits.max_advertised_routes,
            randbelow=self._randbelow,
            auto_approve=self.policy.auto_approved,
        )

    async def _login(self, decide: Callable[[TailnetState], c.Decision[int]], actor: Actor, node_id: int) -> int:
        """Append one login's decision (one transaction) and log what it refused."""
        decided: list[c.Decision[int]] = []

        def remember(state: TailnetState) -> c.Decision[int]:
            decided.append(decide(state))
            return decided[-1]

        result, _ = await self.tailnet.execute(remember, actor=actor)
        refused = decided[-1].meta.get("routes_refused") if decided else None
        if refused:
            log.info("node %d advertised invalid routes: %s", result or node_id, refused)
        refused = decided[-1].meta.get("tags_refused") if decided else None
        if refused:
            log.info("node %d: %s", result or node_id, refused)
        return result

    async def _register_with_key(
        self, rr: RegisterRequest, mk: str, nk: str, text: str, now: datetime, actor: Actor
    ) -> NoiseResponse:
        existing = self.tailnet.state.node_by_machine(mk)
        if existing is not None and existing.node_key == nk and not existing.is_expired(now):
            # A container re-running `up --authkey` with a spent one-shot key.
            return _register_response(self.tailnet.state, existing)
        host = _reported(rr.hostinfo)
        rules = self._rules()

        def decide(state: TailnetState) -> c.Decision[int]:
            return c.decide_login_with_key(
                state, machine_key=mk, node_key=nk, auth_key=text, host=host, now=now, rules=rules
            )

        if existing is not None:
            # A re-key appends two events (and maybe the Hostinfo's): rate-limited.
            refused = self._spend(existing, len(decide(self.tailnet.state).events))
            if refused is not None:
                return _register_error(refused)
        node_id = await self._login(decide, actor, 0)
        return _register_response(self.tailnet.state, self.tailnet.state.nodes[node_id])

    async def _start_interactive(
        self, rr: RegisterRequest, mk: str, nk: str, source: str
    ) -> NoiseResponse:
        try:
            pending = await self.pending.start(
                machine_key=mk, node_key=nk, hostinfo=rr.hostinfo, ephemeral=rr.ephemeral, source=source
            )
        except EventLogError as exc:
            log.warning("cannot store a pending registration: %s", exc)
            return _register_error("the server cannot take interactive registrations right now; try again later")
        if not isinstance(pending, PendingRegistration):
            return _register_error(
                "too many machines are waiting for approval"
                + (" from your address" if pending is Admission.SOURCE_CAP else "")
                + "; try again later, or ask an administrator for an auth key"
            )
        url = f"{self.public_url}/register/{pending.auth_id}"
        return NoiseResponse(200, _JSON, encode(RegisterResponse(auth_url=url)))

    async def _await_decision(self, pending: PendingRegistration) -> AsyncIterator[bytes]:
        """The streamed answer to a follow-up: written once the request is decided."""
        outcome = await self.pending.wait(pending)
        yield await self._decision_answer(outcome, pending.machine_key, pending.node_key)

    async def _decision_answer(self, outcome: Outcome, mk: str, nk: str) -> bytes:
        if isinstance(outcome, Rejected):
            return _rejected(outcome.reason).body or b""
        if isinstance(outcome, Approved | Gone):
            if isinstance(outcome, Gone):
                # Decided elsewhere: the node, if approved, is in the log; catch up first.
                await self.tailnet.runner.wait_for((await self.tailnet.log.head()).seq)
            state = self.tailnet.state
            node = state.node_by_key(nk)
            if node is not None and node.machine_key == mk:
                return _register_response(state, node).body or b""
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
        auth_id, user_ref = raw.get("key"), raw.get("user")
        if not isinstance(auth_id, str) or not isinstance(user_ref, str):
            raise CommandError("bad arguments: need 'key' and 'user'")
        node_id = await self.approve_pending(auth_id, user_ref, actor)
        return {"registered": node_id, "name": self.tailnet.state.nodes[node_id].given_name}

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
        pending = await self.pending.get(auth_id)
        if pending is None:
            raise NotFoundError(
                f"no pending registration with key {auth_id!r} (it may have expired)"
            )
        if pending.rejected_reason is not None:
            raise CommandError(
                f"the registration {auth_id!r} was rejected by {pending.rejected_by}; "
                "the machine must log in again"
            )
        now = self.tailnet.clock()

        host = c.ReportedHost(hostname=pending.hostname, os=pending.os, request_tags=pending.request_tags)
        rules = self._rules()

        def decide(state: TailnetState) -> c.Decision[int]:
            return c.decide_login_approved(
                state, machine_key=pending.machine_key, node_key=pending.node_key,
                user_ref=user_ref, ephemeral=pending.ephemeral, host=host, now=now, rules=rules,
                auth=auth, expiry=expiry,
            )

        node_id = await self._login(decide, actor, 0)
        # Routes and the rest of the Hostinfo arrive with the node's first map request.
        await self.pending.approved(auth_id, node_id)
        return node_id

    # -- hostinfo → log ------------------------------------------------------------------

    def _check_hostinfo(self, hostinfo: Hostinfo | None) -> str | None:
        """Why a Hostinfo is refused (too large, too many routes), or ``None``."""
        if hostinfo is None:
            return None
        limits = self.settings.limits
        size = len(encode(hostinfo))
        if size > limits.max_hostinfo_bytes:
            self.stats.hostinfo_too_large += 1
            return f"the Hostinfo is too large: {size} bytes (the limit is {limits.max_hostinfo_bytes})"
        routes = len(hostinfo.routable_ips or ())
        if routes > limits.max_advertised_routes:
            self.stats.too_many_routes += 1
            return f"too many advertised routes: {routes} (the limit is {limits.max_advertised_routes})"
        return None

    def _host_report(self, state: TailnetState, node_id: int, hostinfo: Hostinfo | None) -> c.Decision[int]:
        return c.decide_host_report(
            state, state.nodes[node_id], _reported(hostinfo), self._rules(), now=self.tailnet.clock()
        )

    def _hostinfo_cost(self, node: Node, hostinfo: Hostinfo | None) -> int:
        """How many events applying ``hostinfo`` to ``node`` would append now."""
        return len(self._host_report(self.tailnet.state, node.id, hostinfo).events)

    def _spend(self, node: Node, cost: int) -> str | None:
        """Take ``cost`` tokens from the node's update bucket; why not, if it can't."""
        wait = self._updates.take(node.id, cost, trio.current_time())
        if wait is None:
            return None
        self.stats.updates_rate_limited += 1
        log.info("node %d: update refused by the rate limit (%d event(s))", node.id, cost)
        if math.isinf(wait):
            return f"this update would append {cost} events; at most {self._updates.burst} are allowed at once"
        return f"too many updates from this node: try again in {math.ceil(wait)} s"

    async def _apply_hostinfo(self, node_id: int, hostinfo: Hostinfo | None, actor: Actor) -> None:
        """Record what in a Hostinfo decides reachability or is audited: routes (and
        the approvals the policy grants for them) and host name, in one transaction."""
        if hostinfo is None or node_id not in self.tailnet.state.nodes:
            return
        await self._login(
            lambda s: self._host_report(s, node_id, hostinfo) if node_id in s.nodes else c.Decision((), node_id),
            actor,
            node_id,
        )

    def _update_presence(self, node_id: int, mr: MapRequest, hostinfo: Hostinfo | None) -> None:
        """Store what a map request says about the node's connection; ``hostinfo`` is
        the request's Hostinfo if it is to be kept (``None`` when ignored)."""
        changes: dict[str, object] = {"cap": mr.version}
        if mr.disco_key and parse_key(KeyPrefix.DISCO, mr.disco_key) is not None:
            changes["disco_key"] = mr.disco_key
        if mr.endpoints or not mr.stream:
            changes["endpoints"] = tuple(mr.endpoints or ())
        if hostinfo is not None:
            # Kept as peers see it: trimmed, the host name cleaned and cut. NetInfo is
            # not kept (clients resend it only when it changes, pitfall 12): its DERP
            # home is, as home_derp, until a NetInfo says otherwise.
            hostname = c.clean_hostname(hostinfo.hostname, self.settings.limits.max_hostname_length)
            if hostname != hostinfo.hostname:
                self.stats.hostnames_cleaned += 1
            changes["hostinfo"] = peer_hostinfo(hostinfo, hostname=hostname)
            if hostinfo.net_info is not None and hostinfo.net_info.preferred_derp:
                changes["home_derp"] = hostinfo.net_info.preferred_derp
        self.presence.update(node_id, **changes)

    # -- map -----------------------------------------------------------------------------

    async def _map(self, request: NoiseRequest) -> NoiseResponse:
        decoded = _decode_keyed(request.body, decode_map_request, "map")
        if isinstance(decoded, NoiseResponse):
            return decoded
        mr, raw_nk = decoded
        node = self.tailnet.state.node_by_key(raw_nk.hex()) if raw_nk else None
        if node is None:
            return _http_error(404, "node not found: register first")
        mk = request.machine_key.hex()
        if node.machine_key != mk:
            return _http_error(401, "this node key belongs to another machine")
        hostinfo = mr.hostinfo
        if hostinfo is not None and node.is_expired(self.tailnet.clock()):
            # Expired or logged out: what it says about itself is ignored until it
            # logs in again (nothing is appended, nothing is shown to anyone).
            self.stats.expired_updates_ignored += 1
            hostinfo = None
        if hostinfo is not None:
            refused = self._check_hostinfo(hostinfo)
            if refused is None:
                refused = self._spend(node, self._hostinfo_cost(node, hostinfo))
                status = 429
            else:
                status = 413
            if refused is not None:
                return _http_error(status, refused)
        self._update_presence(node.id, mr, hostinfo)
        if hostinfo is not None:
            await self._apply_hostinfo(node.id, hostinfo, self._actor(mk))
        compress = mr.compress == "zstd"
        if not mr.stream:
            if mr.omit_peers:
                return NoiseResponse(200, (), b"")
            return NoiseResponse(200, (), stream=self._one_shot(node.id, compress))
        return NoiseResponse(
            200,
            (("content-type", "application/octet-stream"),),
            stream=self._stream(node.id, compress, request.cancel),
        )

    async def _one_shot(self, node_id: int, compress: bool) -> AsyncIterator[bytes | Park]:
        """A one-shot (non-streaming) full map: it waits for a full-map turn like a
        stream's first map, and holds it until the client took it all."""
        turn = await self._full_map_turn()
        try:
            self._sync_hub()
            if self.hub.state is None or node_id not in self.hub.state.nodes:
                return
            yield self.wire.frame_full(StreamCursor(node_id).full_map(self.hub), compress)
        finally:
            turn.release()

    # -- the hub: one place computes what changed, every stream reads it ---------------

    def _on_log_change(self) -> None:
        self._hub_wake.set()
        self._hub_log_wake.set()

    def _sync_hub(self) -> None:
        """Bring the hub up to the current state at once (a stream about to send a full
        map must see its own node); streams are woken by :meth:`_drive_hub` only."""
        if self.hub.state is self.tailnet.state and not self._hub_watch.pending:
            return
        self.hub.advance(self.tailnet.state, self.tailnet.clock(), self._hub_sub.take(), self._hub_watch.take())

    def _publish(self) -> None:
        """Advance the hub and wake every stream to read it."""
        self.hub.advance(self.tailnet.state, self.tailnet.clock(), self._hub_sub.take(), self._hub_watch.take())
        self._fanout_left = self._listening
        self._fanout_started = trio.current_time()
        self._published_seq = self.hub.seq
        self._wake_pending = True

    def _park_in(self, group: int, resume: Callable[[], None]) -> None:
        self._parked[group].append((self._parking_due, resume))

    def _wake_group(self, group: int, *, due_by: float | None = None) -> None:
        """Resume the group's parked streams (with ``due_by``, only those whose
        keep-alive is due by then)."""
        parked = self._parked[group]
        if due_by is None:
            woken = parked
            self._parked[group] = []
        else:
            woken = [p for p in parked if p[0] <= due_by]
            if not woken:
                return
            self._parked[group] = [p for p in parked if p[0] > due_by]
        for _, resume in woken:
            resume()

    async def _wake_streams(self) -> None:
        """Wake the stream groups in turn, letting other tasks run in between."""
        if not self._wake_pending:
            return
        self._wake_pending = False
        for group in range(_WAKE_GROUPS):
            self._wake_group(group)
            await trio.lowlevel.checkpoint()

    async def _drive_hub(self) -> None:
        """Coalesce log and presence changes and publish them (and wake at key expiries).

        A log change is published :attr:`ControlSettings.coalesce` seconds after it
        arrives (a burst becomes one update per stream); presence alone (endpoints,
        online) is not urgent and is gathered for ``presence_coalesce`` seconds unless a
        log change comes meanwhile.
        """
        clock = self.tailnet.clock
        while True:
            timeout = float("inf")
            expiry = self.hub.next_expiry()
            if expiry is not None:
                timeout = max((expiry - clock()).total_seconds() + 0.01, 0)
            with trio.move_on_after(timeout):
                await self._hub_wake.wait()
                await trio.sleep(self.settings.coalesce)
                if self._hub_sub.pending.is_empty():
                    with trio.move_on_after(self.settings.presence_coalesce):
                        await self._hub_log_wake.wait()
            self._hub_log_wake.event = trio.Event()
            if self._hub_sub.pending.is_empty():
                # Presence alone: a fan-out to every stream costs CPU in proportion to
                # the streams; leave _PRESENCE_PACING - 1 times as much to everything
                # else (registrations, handshakes, full maps), so that a storm of
                # endpoint and online changes becomes fewer, larger updates. A log
                # change (a join, a policy) ends the wait: it is not held back.
                hold = min(_PRESENCE_PACING * self._fanout_cost, _PRESENCE_MAX_HOLD)
                with trio.move_on_at(self._fanout_started + hold):
                    await self._hub_log_wake.wait()
            self._publish()
            await self._wake_streams()

    def _fanned_out(self) -> None:
        """One stream handled the latest publication; the last one times the fan-out."""
        self._fanout_left -= 1
        if self._fanout_left == 0:  # (and not below: streams that came later do not count)
            self._fanout_cost = trio.current_time() - self._fanout_started

    def _open_poll(self, node_id: int, cancel: Callable[[], None] | None) -> _Poll:
        """Make this the node's long-poll; the older one, if any, ends (the newest
        wins: a client opens a new poll when it lost or gave up the old one)."""
        poll = _Poll(cancel)
        previous = self._polls.get(node_id)
        self._polls[node_id] = poll
        if previous is not None:
            previous.superseded = True
            self.stats.streams_superseded += 1
            if previous.cancel is not None:
                previous.cancel()  # even one stuck sending to a client that stopped reading
            else:
                self._wake_group(node_id % _WAKE_GROUPS)  # it sees superseded and ends
        return poll

    async def _stream(
        self, node_id: int, compress: bool, cancel: Callable[[], None] | None = None
    ) -> AsyncIterator[bytes | Park]:
        clock = self.tailnet.clock
        generation = self.presence.connect(node_id, clock())
        self.streams_open += 1
        listening_since: int | None = None  # the publication seq when it began listening
        cursor: StreamCursor | None = None
        poll = self._open_poll(node_id, cancel)
        del cancel
        try:
            # The full map is built only once this stream's turn comes, and the turn
            # ends when the client has taken all of it (the generator resumes only
            # after the transport sent the bytes, flow control included): at most
            # full_map_concurrency full maps are in memory at once, however many
            # clients reconnect together. Later changes arrive as deltas from it.
            # A client that stops reading gives its turn up after full_map_turn seconds.
            turn = await self._full_map_turn()
            try:
                self._sync_hub()
                if self.hub.state is None or node_id not in self.hub.state.nodes:
                    return
                cursor = StreamCursor(node_id)
                yield self.wire.frame_full(cursor.full_map(self.hub), compress)
            finally:
                turn.release()
            del turn  # an idle stream keeps nothing of its turn
            last_sent = trio.current_time()
            group = node_id % _WAKE_GROUPS
            self._listening += 1
            listening_since = self._published_seq
            while True:
                # Parked (no task) until a publication or the keep-alive ticker
                # wakes the group (no timer per stream). No wait if something was
                # published while this stream was sending.
                if cursor.seq >= self._published_seq:
                    self._parking_due = last_sent + self._keepalive_due()
                    yield self._parks[group]
                if poll.superseded:
                    return
                assert self.hub.state is not None
                if node_id not in self.hub.state.nodes:
                    return  # deleted: the client re-registers or gives up
                seen = cursor.seq
                messages = cursor.update(self.hub)
                sent = bool(messages)
                while messages:  # not a for loop: nothing stays bound while idle
                    yield self.wire.frame(messages.pop(0), compress)
                del messages
                if cursor.seq != seen and seen >= listening_since:
                    self._fanned_out()
                now = trio.current_time()
                if sent:
                    last_sent = now
                elif now - last_sent >= self._keepalive_due():
                    yield keepalive_frame(compress)
                    last_sent = trio.current_time()
        finally:
            self.streams_open -= 1
            if self._polls.get(node_id) is poll:
                del self._polls[node_id]
            if listening_since is not None and cursor is not None:
                self._listening -= 1
                if cursor.seq < self._published_seq and self._published_seq > listening_since:
                    self._fanned_out()  # one the latest fan-out no longer waits for
            if not self._start_soon(self._offline_later, node_id, generation):
                # Not running, or shutting down (the streams end after us): at once.
                self.presence.disconnect(node_id, generation, clock())

    def set_derp_map(self, derp_map: DERPMap) -> bool:
        """Put a new DERP map in force; every open stream sends it. Returns whether it changed."""
        if derp_map == self.settings.netmap.derp_map:
            return False
        netmap = dataclasses.replace(self.settings.netmap, derp_map=derp_map)
        self.settings = dataclasses.replace(self.settings, netmap=netmap)
        self.hub.settings = netmap
        self._publish()
        for group in range(_WAKE_GROUPS):
            self._wake_group(group)
        self._wake_pending = False
        return True

    def set_dns(self, dns: DNSConfig | None) -> bool:
        """Put a new DNS configuration in force (made through the admin API and recorded
        in the log); every open stream sends it. Returns whether it changed."""
        if dns == self.settings.netmap.dns:
            return False
        netmap = dataclasses.replace(self.settings.netmap, dns=dns)
        self.settings = dataclasses.replace(self.settings, netmap=netmap)
        self.hub.settings = netmap
        self._publish()
        for group in range(_WAKE_GROUPS):
            self._wake_group(group)
        self._wake_pending = False
        return True

    def _keepalive_due(self) -> float:
        """Idle time after which a woken stream sends a keep-alive (see _tick_keepalives)."""
        interval = self.settings.keepalive_interval
        return interval - interval / _KEEPALIVE_TICKS

    async def _tick_keepalives(self) -> None:
        """Wake every stream group ``_KEEPALIVE_TICKS`` times per keep-alive interval.

        A woken stream with nothing to send sends a keep-alive once it has been
        quiet for ``_keepalive_due()``: every idle stream hears from the server at
        least once per ``keepalive_interval``. The groups are spread over the tick.
        """
        while True:
            step = self.settings.keepalive_interval / _KEEPALIVE_TICKS / _WAKE_GROUPS
            for group in range(_WAKE_GROUPS):
                await trio.sleep(step)
                self._wake_group(group, due_by=trio.current_time())

    async def _full_map_turn(self) -> _Turn:
        """Wait for a full-map turn; it ends at ``release()`` or after ``full_map_turn``."""
        await self._full_maps.acquire()
        turn = _Turn(self._full_maps)
        self._start_soon(turn.expire, self.settings.full_map_turn)
        return turn

    def _start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Start a background task; ``False`` when :meth:`run` is not running (or ending)."""
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(fn, *args)
        except RuntimeError:  # "Nursery is closed to new arrivals": shutting down
            return False
        return True

    async def _offline_later(self, node_id: int, generation: int) -> None:
        """Mark a node offline once its stream has been gone a little while (pitfall 14)."""
        try:
            await trio.sleep(self.settings.offline_grace)
        finally:  # at once when the server shuts down meanwhile
            self.presence.disconnect(node_id, generation, self.tailnet.clock())

    async def _collect_ephemeral(self) -> None:
        timeout = self.settings.ephemeral_timeout
        if timeout is None:
            return
        now = self.tailnet.clock()
        for node in list(self.tailnet.state.nodes.values()):
            if not node.ephemeral:
                continue
            p = self.presence.get(node.id)
            if p is not None and p.online:
                continue
            # Inactive since it was last seen (persisted across restarts, see
            # projections.presence), or else since it registered, but never since
            # before this server started: a restart is no inactivity of the node.
            since = p.last_seen if p is not None else None
            if since is None:
                since = max(node.created_at, self._started or node.created_at)
            if now - since > timeout:
                ref = str(node.id)

                def decide(s: TailnetState, ref: str = ref) -> c.Decision[int]:
                    return c.decide_delete_node(s, ref, reason="ephemeral")

                try:
                    await self.tailnet.execute(
                        decide, actor=Actor(kind=ActorKind.SYSTEM, id="ephemeral-gc")
                    )
                    self.presence.forget(node.id)
                except NotFoundError:
                    pass
