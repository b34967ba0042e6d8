"""The simulated clients: one trio task per node, over the real protocol.

Theory of operation
-------------------
A :class:`Client` is one node: a machine key, a node key, and a life of connections.
It connects (``/key``, the ``/ts2021`` upgrade, Noise, HTTP/2 with the receive
windows of Go's transport), registers once with a pre-auth key, waits for the go of
the connect phase, then follows a zstd map long poll (``KeepAlive: true``) for as
long as it lives; an updater also posts lite endpoint updates while idle. A broken
connection is retried with Tailscale's backoff, so a restart sees a realistic herd;
a refused registration ends the run (:class:`FatalClientError`).

Everything the clients of one run share is in their :class:`Hub`: where the server
is, the ramp limits (semaphores for registrations and stream openings), the
readiness count of the current *round* (one wave of connections), the counters the
report prints, and the change being timed. A timed change is a :class:`Watch` (the
join and policy phases: one marker searched in the bytes) or one of several
:class:`ChurnWatch` (the churn phase: decoded updates matched by key, id or filter).
Each client keeps a frame's payload only while something is watched or when it is
the sentinel (client 0), which decodes everything and counts where the byte search
and the decoded view disagree.

The hub is subclassed for ``--workers`` in :mod:`cli.bench.loadgen.workers`; the
clients themselves do not know in which process they run.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import trio
import zstandard

from projections.tailcfg import Hostinfo, MapRequest, NetInfo, RegisterRequest, RegisterResponseAuth
from protocol import (
    ControlClient,
    HandshakeError,
    Keypair,
    MapStream,
    ProtocolError,
    RemoteProtocolError,
    open_control_client,
)

from .scanner import FrameKind, MapFrameScanner, ScannedFrame, view_decoder

__all__ = ["ChurnWatch", "Client", "FatalClientError", "Hub", "Watch"]


#: Capability version of the simulated clients (tailscale v1.90).
_CAP_VERSION: Final = 130
#: HTTP/2 receive windows of golang.org/x/net/http2's Transport (tailscale's clients)...
_GO_STREAM_WINDOW: Final = 4 << 20
_GO_CONNECTION_WINDOW: Final = 1 << 30
#: ... and the SETTINGS_MAX_FRAME_SIZE it advertises (its default ``MaxReadFrameSize``,
#: sent with the preface), so a full map arrives in few DATA frames.
_GO_MAX_FRAME: Final = 1 << 20


@dataclass(eq=False)
class Watch:
    """A change being timed: who has seen ``marker`` since ``t0``.

    ``t0`` is set when the change is made; until then it is ``inf`` and the watch is
    not installed on the hub, so nobody can hit it.
    """

    kind: str  # "join" or "policy"
    marker: bytes
    expected: int
    exclude: int | None = None  # the client that caused the change (not a receiver)
    #: The clients that must get the change (None: everybody but ``exclude``).
    receivers: frozenset[int] | None = None
    t0: float = math.inf
    latencies: list[float] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    #: Clients that may get the change but are not timed (``--replicas``: the peers on
    #: the changed node's own replica, when only the other replicas' are measured).
    ignored: frozenset[int] = frozenset()
    #: Clients that got the change although the policy says they should not.
    unexpected: int = 0
    #: Compressed bytes of the updates all clients received while it was watched.
    bytes: int = 0

    def __post_init__(self) -> None:
        if self.expected <= 0:
            self.done.set()  # nobody to wait for

    def wants(self, index: int) -> bool:
        """Whether client ``index`` is one of the change's receivers."""
        return index != self.exclude and (self.receivers is None or index in self.receivers)

    def hit(self, now: float) -> None:
        """One more receiver saw the change at ``now`` (each receiver hits once)."""
        self.latencies.append(now - self.t0)
        if len(self.latencies) >= self.expected:
            self.done.set()


@dataclass(eq=False)
class ChurnWatch:
    """One change of the churn phase being timed (several may be under way at once).

    A receiver hits it when an update (not a full map) carries the change:

    * ``join``: the newcomer's node key among ``PeersChanged``;
    * ``tag``: the retagged node's key among ``PeersChanged``, or its id among
      ``PeersRemoved`` (it may leave a node's view);
    * ``delete``: the deleted node's id among ``PeersRemoved``;
    * ``policy``: a packet filter.

    A client hits it at most once; one outside ``receivers`` counts as ``unexpected``.
    ``delivered_bytes`` adds up the (compressed) updates that brought it, once per client.
    """

    kind: str
    receivers: frozenset[int]
    key: bytes = b""
    node_id: int = -1
    exclude: int | None = None
    t0: float = math.inf
    latencies: list[float] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    unexpected: int = 0
    #: The clients outside ``receivers`` that got it, and when (seconds after ``t0``).
    strays: list[tuple[int, float]] = field(default_factory=list)
    delivered_bytes: int = 0
    done: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        if not self.receivers:
            self.done.set()

    def matches(self, keys: set[bytes], removed: set[int], has_filter: bool) -> bool:
        """Whether an update with these peer keys, removed ids and filter carries it."""
        if self.kind == "policy":
            return has_filter
        if self.kind == "delete":
            return self.node_id in removed
        return self.key in keys or (self.kind == "tag" and self.node_id in removed)

    def offer(self, index: int, now: float, size: int) -> None:
        """Client ``index`` got an update of ``size`` compressed bytes that carries the change."""
        if index == self.exclude or index in self.seen:
            return
        self.seen.add(index)
        self.delivered_bytes += size
        if index not in self.receivers:
            self.unexpected += 1
            self.strays.append((index, now - self.t0))
            return
        self.latencies.append(now - self.t0)
        if len(self.latencies) >= len(self.receivers):
            self.done.set()


@dataclass(eq=False)
class Hub:
    """Everything the simulated clients of one run share: where the server is, the
    ramp limits, the "ready" accounting and the change being watched.

    A *round* is one wave of connections (the initial connect, the reconnect after the
    restart); a client counts as ready in a round when a full map arrives on a stream
    it opened after the round began.
    """

    port: int
    auth_key: str
    server_key: bytes | None
    decompress: Callable[[bytes], bytes]
    update_interval: tuple[float, float]
    register_slots: trio.Semaphore
    connect_slots: trio.Semaphore | None
    #: Per client index, the pre-auth key to register with (else ``auth_key``).
    auth_keys: dict[int, str] = field(default_factory=dict)
    #: ``--replicas``: the replicas' ports; client *i* talks to ``ports[i % len]``
    #: (empty: everybody talks to ``port``).
    ports: tuple[int, ...] = ()
    streams_go: trio.Event = field(default_factory=trio.Event)
    registered: int = 0
    registered_all: trio.Event = field(default_factory=trio.Event)
    register_target: int = 0
    round: int = 0
    round_t0: float = 0.0
    ready: int = 0
    ready_target: int = 0
    ready_all: trio.Event = field(default_factory=trio.Event)
    ready_times: list[float] = field(default_factory=list)
    #: Clients in the run (the join phase's newcomer adds one), wherever they run.
    population: int = 0
    watch: Watch | None = None
    #: The churn phase's changes under way (see :class:`ChurnWatch`).
    churn: list[ChurnWatch] = field(default_factory=list)
    churn_bytes: int = 0  # compressed bytes of the updates read while churn watches ran
    full_map_max: int = 0  # largest compressed full map seen, bytes
    full_map_json: int = 0  # the sentinel's last full map, decompressed bytes
    full_map_peers: int = -1  # peers in the sentinel's last full map
    marker_mismatches: int = 0
    keepalives: int = 0
    lite_updates: int = 0
    updates_read: int = 0  # non-full frames decompressed (during watches)
    errors: Counter[str] = field(default_factory=Counter)

    def port_of(self, index: int) -> int:
        """The port client ``index`` talks to."""
        return self.ports[index % len(self.ports)] if self.ports else self.port

    def begin_round(self, target: int, t0: float) -> None:
        """Start a wave of connections; ``ready_all`` fires when ``target`` made it."""
        self.round += 1
        self.round_t0 = t0
        self.ready = 0
        self.ready_target = target
        self.ready_all = trio.Event()
        self.ready_times = []

    def count_registered(self) -> None:
        """A registration succeeded."""
        self.registered += 1
        if self.registered >= self.register_target:
            self.registered_all.set()

    def count_ready(self, client: Client, now: float) -> None:
        """A full map reached ``client``; counts once per client and round."""
        if client.round < self.round:
            client.round = self.round
            self.count_ready_at(now)

    def count_ready_at(self, now: float) -> None:
        """One more client is ready in this round (a worker's client, or ours)."""
        self.ready += 1
        self.ready_times.append(now - self.round_t0)
        if self.ready >= self.ready_target:
            self.ready_all.set()

    def note_error(self, exc: BaseException) -> None:
        """Count a connection failure by type and (shortened) message."""
        text = str(exc)
        if isinstance(exc, RemoteProtocolError) and exc.http_status:
            text = f"HTTP {exc.http_status}"
        self.errors[f"{type(exc).__name__}: {text[:60]}"] += 1


def _backoff(failures: int) -> float:
    """Tailscale's reconnect backoff: n^2 * 10 ms, capped at 30 s, jittered 0.5-1.5 times
    (``logtail/backoff``), so a restart sees a realistic, dispersed herd."""
    base = min(failures * failures * 0.010, 30.0)
    return base * random.uniform(0.5, 1.5)


class FatalClientError(Exception):
    """The server refused a registration: the run cannot produce figures."""


class _TryAgain(Exception):
    """The server refused a registration for now (its message says "try again")."""


_Retryable = (OSError, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, _TryAgain)


class Client:
    """One simulated node: a machine key, a node key and a life of map polls.

    Attributes:
        round: the last round in which this client was counted ready.
        register_s: how long its register call took.
        first_map_at: when its first full map arrived (``has_map`` is set then).
        last_frame_at, max_frame_gap: when its last frame arrived, and the longest
            wait between two frames (``tailledger bench api`` resets both).
        on_register: called just before the register request is sent (the join
            phase starts its clock there).
    """

    def __init__(self, index: int, hub: Hub, *, updater: bool = False, sentinel: bool = False) -> None:
        self.index = index
        self.hub = hub
        self.updater = updater
        self.sentinel = sentinel
        self.machine = Keypair.generate()
        self.node_key = "nodekey:" + Keypair.generate().public.hex()
        self.marker = self.node_key.encode()
        self.disco_key = "discokey:" + os.urandom(32).hex()
        self.registered = False
        self.round = 0
        self.failures = 0
        self.port = 41641
        self.register_s: float | None = None
        self.first_map_at: float | None = None
        #: When its last frame (of any kind) arrived, and the longest wait between two
        #: frames since: a wait longer than the keep-alive interval is a missed one.
        self.last_frame_at: float | None = None
        self.max_frame_gap = 0.0
        self.has_map = trio.Event()
        self.on_register: Callable[[], None] | None = None
        self._seen: Watch | None = None  # the last watch this client has hit
        self._slot: trio.Semaphore | None = None
        #: The connection of the stream under way (None between connections).
        self.control: ControlClient | None = None
        #: Cancelled when the churn phase deletes this node (its life ends there).
        self.scope = trio.CancelScope()

    # -- requests ------------------------------------------------------------------

    def _hostinfo(self) -> Hostinfo:
        return Hostinfo(hostname=f"sim-{self.index}", os="linux", net_info=NetInfo(preferred_derp=1))

    def map_request(self, *, stream: bool) -> MapRequest:
        """A streaming map poll, or a lite endpoint update (``OmitPeers``)."""
        return MapRequest(
            version=_CAP_VERSION, compress="zstd", keep_alive=True, node_key=self.node_key,
            disco_key=self.disco_key, stream=stream, omit_peers=not stream,
            hostinfo=self._hostinfo(),
            endpoints=[f"192.0.2.{self.index % 250 + 1}:{self.port}"], endpoint_types=[1],
        )

    # -- life cycle ----------------------------------------------------------------

    async def run(self) -> None:
        """Register once, then follow map streams forever, reconnecting with backoff.

        Raises:
            FatalClientError: the server refused the registration (not retried).

        Cancellation: the only way it ends (also through :attr:`scope`).
        """
        with self.scope:
            await self._live()

    async def _live(self) -> None:
        while True:
            try:
                await self._session()
            except* _Retryable as group:
                for exc in group.exceptions:
                    self.hub.note_error(exc)
                    if isinstance(exc, HandshakeError):
                        self.hub.server_key = None  # the server may have a new key
            finally:
                self._release_slot()
            self.failures += 1
            await trio.sleep(_backoff(self.failures))

    async def _take_slot(self, slots: trio.Semaphore | None) -> None:
        """Wait for a ramp slot (none to wait for once the ramp is over)."""
        if slots is not None:
            await slots.acquire()
            self._slot = slots

    def _release_slot(self) -> None:
        """Give the ramp slot back (idempotent): done registering, or map arrived."""
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    async def _session(self) -> None:
        """One connection: (register,) stream until it breaks."""
        hub = self.hub
        await self._take_slot(hub.connect_slots if self.registered else hub.register_slots)
        async with open_control_client(
            "127.0.0.1",
            hub.port_of(self.index),
            machine_key=self.machine,
            server_public=hub.server_key,
            # The windows of Go's HTTP/2 transport, which tailscale's clients use.
            initial_window_size=_GO_STREAM_WINDOW,
            connection_window_size=_GO_CONNECTION_WINDOW,
            max_frame_size=_GO_MAX_FRAME,
        ) as client:
            if hub.server_key is None:
                hub.server_key = client.server_public
            if not self.registered:
                await self._register(client)
                self._release_slot()
                await hub.streams_go.wait()
                await self._take_slot(hub.connect_slots)
            self.control = client
            async with trio.open_nursery() as nursery:
                if self.updater:
                    nursery.start_soon(self._lite_updates, client)
                async with client.map_stream(self.map_request(stream=True)) as stream:
                    await self._follow(stream)
                nursery.cancel_scope.cancel()

    async def _register(self, client: ControlClient) -> None:
        """Register with the pre-auth key (control-protocol.md §7), timing the call.

        Raises:
            _TryAgain: the server asked to retry later.
            FatalClientError: the server refused for good.
        """
        hub = self.hub
        request = RegisterRequest(
            version=_CAP_VERSION, node_key=self.node_key,
            auth=RegisterResponseAuth(auth_key=hub.auth_keys.get(self.index, hub.auth_key)),
            hostinfo=self._hostinfo(),
        )
        if self.on_register is not None:
            self.on_register()
        t0 = trio.current_time()
        response = await client.register(request)
        self.register_s = trio.current_time() - t0
        if response.error and "try again" in response.error:
            raise _TryAgain(response.error)  # a real client backs off and retries, too
        if response.error:
            raise FatalClientError(f"sim-{self.index}: registration refused: {response.error}")
        self.registered = True
        hub.count_registered()

    async def _lite_updates(self, client: ControlClient) -> None:
        """Every 20-40 s (``--update-interval``) report a new endpoint, like a client
        whose NAT mapping changed. A failure ends it; the stream notices too."""
        lo, hi = self.hub.update_interval
        while True:
            await trio.sleep(random.uniform(lo, hi))
            self.port += 1
            try:
                await client.post_json("/machine/map", self.map_request(stream=False))
            except ProtocolError:
                return
            self.hub.lite_updates += 1

    async def move_endpoint(self, port: int) -> None:
        """Report the endpoint ``port`` at once, on the connection of its stream
        (``--replicas``' presence phase).

        Raises:
            ProtocolError: no connection is open, or it failed.
        """
        self.port = port
        if self.control is None:
            raise ProtocolError(f"sim-{self.index} has no connection open")
        await self.control.post_json("/machine/map", self.map_request(stream=False))

    # -- the receive path --------------------------------------------------------------

    def _want(self, kind: FrameKind) -> bool:
        """Keep a frame's payload only for the sentinel or while a change is timed."""
        return self.sentinel or self.hub.watch is not None or bool(self.hub.churn)

    async def _follow(self, stream: MapStream) -> None:
        """Read the long poll until it ends; raw chunks, not decoded messages."""
        scanner = MapFrameScanner(self._want, self.hub.decompress)
        async for chunk in stream.response:
            frames = scanner.feed(chunk)
            if frames:
                now = trio.current_time()
                for frame in frames:
                    self._on_frame(frame, now)

    def _on_frame(self, frame: ScannedFrame, now: float) -> None:
        """Account for one complete frame: readiness, and the watched marker."""
        hub = self.hub
        if self.last_frame_at is not None:
            self.max_frame_gap = max(self.max_frame_gap, now - self.last_frame_at)
        self.last_frame_at = now
        if frame.kind is FrameKind.KEEPALIVE:
            hub.keepalives += 1
            return
        if frame.kind is FrameKind.FULL:
            self.failures = 0
            self._release_slot()
            if self.first_map_at is None:
                self.first_map_at = now
                self.has_map.set()
            hub.full_map_max = max(hub.full_map_max, frame.size)
            hub.count_ready(self, now)
        if frame.payload is None:
            return
        try:
            body = hub.decompress(frame.payload)
        except zstandard.ZstdError:
            raise RemoteProtocolError("bad zstd map frame") from None
        watch = hub.watch
        if frame.kind is FrameKind.UPDATE and hub.churn:
            self._on_churn(body, frame.size, now)
        if frame.kind is FrameKind.UPDATE:
            hub.updates_read += 1
            if watch is not None:
                watch.bytes += frame.size
        hit = (
            watch is not None
            and self._seen is not watch
            and self.index != watch.exclude
            and watch.marker in body
        )
        if hit and watch is not None and self.index in watch.ignored:
            self._seen = watch
            hit = False
        if hit and watch is not None and not watch.wants(self.index):
            # The change reached a node the policy says it does not concern.
            watch.unexpected += 1
            self._seen = watch
            hit = False
        if self.sentinel:
            self._check(body, frame.kind, watch if self._seen is not watch else None, hit)
        if hit:
            assert watch is not None
            self._seen = watch
            watch.hit(now)

    def _on_churn(self, body: bytes, size: int, now: float) -> None:
        """Offer an update to every churn change under way (decoded: the updates of a
        churn run are small, and a delete is only visible as a node id)."""
        hub = self.hub
        hub.churn_bytes += size
        view = view_decoder.decode(body)
        keys = {p.Key.encode() for p in view.PeersChanged or ()}
        removed = set(view.PeersRemoved or ())
        has_filter = view.PacketFilters is not None or view.PacketFilter is not None
        for watch in hub.churn:
            if watch.matches(keys, removed, has_filter):
                watch.offer(self.index, now, size)

    def _check(self, body: bytes, kind: FrameKind, watch: Watch | None, hit: bool) -> None:
        """Sentinel: decode fully and compare with what the byte search concluded."""
        hub = self.hub
        view = view_decoder.decode(body)
        if kind is FrameKind.FULL:
            hub.full_map_json = len(body)
            hub.full_map_peers = len(view.Peers or ())
        if watch is None or self.index == watch.exclude:
            return
        if watch.kind == "join":
            key = watch.marker.decode()
            decoded = any(p.Key == key for p in (*(view.Peers or ()), *(view.PeersChanged or ())))
        else:
            decoded = view.PacketFilters is not None or view.PacketFilter is not None
        if decoded != hit:
            hub.marker_mismatches += 1
