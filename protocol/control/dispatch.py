"""The control handler the transport calls: dispatch, composition and life cycle.

:class:`Control` is the :class:`~protocol.handler.ControlHandler` behind every request
inside a Noise tunnel. It owns nothing but the wiring: ``/machine/register`` goes to
:class:`~protocol.control.registration.Registration`; ``/machine/map`` checks the node
key against the Noise peer's machine key (pitfall 9), passes the request's Hostinfo
through :class:`~protocol.control.hostinfo.HostinfoGate` and opens a stream of
:class:`~protocol.control.streams.MapStreams` (a lite update, ``OmitPeers`` without
``Stream``, only reports endpoints and Hostinfo); ``/machine/ssh/action/…`` goes to
the SSH check (protocol/sshcheck.py) when one is installed. A log that cannot record
what a request reported (a full disk) is answered 503, which the client retries.

:meth:`Control.run` runs the background duties: the map streams' hub driver and
keep-alive ticker, the pending registrations' expiry, the rate-limit buckets' pruning
and (on the elected replica) the clean-up of inactive ephemeral nodes. Construction
subscribes to the log and watches the presence table (the map streams' hub must see
every change from the start); :meth:`Control.close` ends both once the server is done.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime

import trio

from eventlog import Actor, ActorKind
from eventlog.sidetables import SideTables
from projections import NotFoundError, Tailnet, UnavailableError
from projections import commands as c
from projections.admin import AdminOps
from projections.policystate import PolicyCompiler
from projections.presence import PresenceTable
from projections.state import TailnetState
from projections.tailcfg import decode_map_request

from ..handler import NoiseRequest, NoiseResponse
from ..registrations import PendingLimits, PendingRegistrations
from .decisions import Decisions
from .hostinfo import HostinfoGate
from .messages import decode_keyed, http_error
from .registration import Registration, node_actor
from .settings import ControlSettings, ControlStats
from .streams import MapStreams

__all__ = ["Control"]


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
        self.policy = policy or PolicyCompiler(settings.public_url)
        #: The in-memory side tables made for ``pending`` when none was given (closed
        #: by close()).
        self._own_side: SideTables | None = None
        if pending is None:
            self._own_side = SideTables(":memory:")
            pending = PendingRegistrations(self._own_side, tailnet, PendingLimits())
        self.pending = pending
        self._ephemeral_timeout = settings.ephemeral_timeout
        #: When run() started: an ephemeral node never seen since counts from here.
        self._started: datetime | None = None
        self.stats = ControlStats()
        decisions = Decisions(tailnet, settings, self.policy, randbelow)
        self.hostinfo = HostinfoGate(tailnet, presence, settings.limits, decisions, self.stats)
        self.registration = Registration(tailnet, pending, decisions, self.hostinfo, lambda: self.public_url)
        self.streams = MapStreams(tailnet, presence, settings, self.policy, self.stats)
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
        """Background duties: the map streams, offline marking, ephemeral node clean-up."""
        self._started = self.tailnet.clock()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.streams.run)
            await nursery.start(self.pending.run)
            task_status.started()
            while True:
                await trio.sleep(10)
                self.hostinfo.prune(trio.current_time())
                if self.leads():
                    await self._collect_ephemeral()

    def close(self) -> None:
        """Let go of what construction took: the map streams' log subscription and
        presence watcher, and the in-memory pending table made when none was given.

        Call it once the handler serves no more (after :meth:`run` and the transport
        ended); the log and the presence table outlive it. Idempotent.
        """
        self.streams.close()
        if self._own_side is not None:
            self._own_side.close()
            self._own_side = None

    def register_admin_ops(self, ops: AdminOps) -> None:
        self.registration.register_admin_ops(ops)

    # -- dispatch ------------------------------------------------------------------------

    async def __call__(self, request: NoiseRequest) -> NoiseResponse:
        path = request.path.split("?", 1)[0]
        try:
            if path == "/machine/register" and request.method == "POST":
                return await self.registration.handle(request)
            if path == "/machine/map" and request.method == "POST":
                return await self._map(request)
            if path.startswith("/machine/ssh/action/") and self.ssh_action is not None:
                return await self.ssh_action(request)
        except UnavailableError as exc:
            # The log cannot record what the request reported (a full disk): a clear
            # error the client retries, with its Hostinfo again, not a 500.
            return http_error(503, str(exc))
        if path.startswith("/machine/"):
            return http_error(501, f"{path} is not implemented by this server")
        return http_error(404, "not found")

    async def _map(self, request: NoiseRequest) -> NoiseResponse:
        decoded = decode_keyed(request.body, decode_map_request, "map")
        if isinstance(decoded, NoiseResponse):
            return decoded
        mr, raw_nk = decoded
        node = self.tailnet.state.node_by_key(raw_nk.hex()) if raw_nk else None
        if node is None:
            return http_error(404, "node not found: register first")
        mk = request.machine_key.hex()
        if node.machine_key != mk:
            return http_error(401, "this node key belongs to another machine")
        refused = await self.hostinfo.from_map(node, mr, node_actor(mk))
        if refused is not None:
            return refused
        compress = mr.compress == "zstd"
        if not mr.stream:
            if mr.omit_peers:
                return NoiseResponse(200, (), b"")
            return NoiseResponse(200, (), stream=self.streams.one_shot(node.id, compress))
        return NoiseResponse(
            200,
            (("content-type", "application/octet-stream"),),
            stream=self.streams.stream(node.id, compress, request.cancel),
        )

    # -- run-once jobs -------------------------------------------------------------------

    async def _collect_ephemeral(self) -> None:
        timeout = self._ephemeral_timeout
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
