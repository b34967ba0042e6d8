"""``tailledger loadgen``: simulated tailscale clients over the real protocol.

Starts a ``tailledger serve`` process on a scratch data directory and N simulated
clients in this process. Every client speaks the real protocol: ``/key``, the
``/ts2021`` upgrade, Noise, HTTP/2, register with a pre-auth key, and a zstd map
long-poll (``KeepAlive: true``) that it reads for as long as it lives; a bounded
number of "updaters" send endpoint updates (lite map requests) while idle. For each
tailnet size it measures, in phases:

* register: every client connects and registers (no map stream is open yet, so the
            registrations do not fan out to anybody); wall time and server CPU;
* connect:  every client opens its map stream (at most ``--concurrency`` at once)
            until its full map arrived; wall time, server CPU, then server RSS once
            the server is idle again: memory per connected node and the peak (VmHWM);
* join:     one more node registers; how long the register call took, and the time
            until the last stream showed the newcomer (p50, p99) with the server CPU
            spent meanwhile;
* policy:   the policy changes every node's packet filter; time until the last
            stream got its new filter (p50, p99), and server CPU;
* restart:  the server is restarted on the same data; time until every client has
            reconnected (with Tailscale's backoff) and received a full map again.

Register and connect always run; ``--phases`` picks the others. The figures are
benchmarks, printed as a table and written as JSON, never assertions. Long phases
print their progress every 30 s. A memory guard kills the server and ends the run
(``aborted`` in the JSON, exit status 1) before the machine runs out of memory: a
5,000-client reconnect herd once took the server past 19 GiB.

Keeping the load generator cheap
--------------------------------
The clients share two cores with the server, and at 5,000 nodes a full map is
megabytes of JSON, so a load generator that decoded every message would measure
itself. The receive path therefore does the least the measurement needs
(:class:`MapFrameScanner`):

* It splits the stream into ``[u32 LE][zstd]`` frames (``protocol/mapframe.py``)
  and *skips* the payload of any frame nobody will read: no buffering, no zstd, no
  JSON. The bytes are still received, decrypted and acknowledged through HTTP/2
  flow control, so the server sees real back-pressure.
* Keep-alives are recognised by size and bytes (the server sends one constant frame).
* The first other message of a stream is its full map (control-protocol.md §8.5:
  the first non-keep-alive message carries ``Node``); that marks a client "ready"
  without decompressing megabytes.
* Only while a change is being timed (a watch is active) are frames decompressed,
  and then searched for a byte marker (the newcomer's ``nodekey:…`` or
  ``"PacketFilter``) instead of being decoded.
* One sentinel client decodes everything into small msgspec views and counts how
  often its decoded view and the byte search disagree (``marker_mismatches``; must
  be 0) and how many peers its full map listed (``full_map_peers``).

It also reports how busy the load generator itself was in each phase
(``*_loadgen_cpu_pct``, % of one core); near 100 % the phase's figures are upper
bounds, not measurements of the server.

Scenarios
---------
``--scenario`` picks the tailnet (``cli/bench/scenarios.py``): ``flat`` (one user,
allow-all: one visibility class) or ``corp`` (a segmented company tailnet: N/10 users
in 20 teams, 10 % tagged servers over 20 tags registered with tagged keys, 166 rules,
2 app grants, 22 SSH rules with ``check`` mode; its policy change widens a port range
in 70 rules). The receivers of a change are computed with the policy engine on the
same users, tags and policies before the run: the join waits only for the nodes that
can see the newcomer, the policy change only for the nodes whose packet filter
changes, and a node that gets a change it should not see is counted in
``*_unexpected`` (reported as a warning; must be 0). The report adds the number of
visibility classes, the average/median/max peers per node and the (compressed) bytes
the clients received per change.

``--scenario churn`` is the corp tailnet under steady background change for
``--duration`` seconds, in place of the join, policy and restart phases: a join or a
delete (alternately) every ``--join-delete-every`` seconds, a tagged node's tag
changes every ``--tag-every`` seconds, and the policy switches between corp's two
texts every ``--policy-every`` seconds (defaults 1, 10, 60; ``--seed`` picks the
nodes). Each change's receivers are computed with the policy engine on the live
tailnet (a join: who sees the newcomer; a delete: who saw the node; a tag change:
who sees it before or after; a policy edit: whose filter changes), and each
receiver's latency is taken from the first update that carries it (the key in
``PeersChanged``, the id in ``PeersRemoved``, a packet filter); a node outside the
receivers that gets it counts in ``churn_unexpected``. Changes are made one after
another and their deliveries overlap, except a policy edit's (which waits for the
others and holds them back until it has landed: joins and tag changes change
filters, too). The report gives latencies per kind of change, the server's and the
load generator's CPU, KiB received per change, and the server's RSS sampled every
second with its least-squares slope after the first minute (MiB/min). Figures only.

Worker processes
----------------
``--workers N`` runs the simulated clients in N worker processes (client *i* in
worker *i* mod N; the join phase's newcomer and the orchestration stay here), so that
the load generator is not the bottleneck at thousands of nodes. The workers report
registrations, readiness, hits and strays of the watched change, and their counters
over a pipe; all processes read one clock (``time.monotonic``), so latencies span
them. The ramp limits are split among the workers. On a machine with 3 or more cores
the server is pinned to the first half of them and the load generator with its
workers to the rest (``os.sched_setaffinity``); with fewer, nothing is pinned and the
report says so. Each phase then also reports the workers' CPU (``*_workers_cpu_s``,
``*_workers_cpu_pct``) beside the server's (``*_cpu_s``). With ``churn``, the
workers report who got each change and the parent, which knows its receivers, counts
them. Without ``--workers`` every client runs in this process, as before.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import gc
import json
import math
import multiprocessing
import multiprocessing.process
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import msgspec
import trio
import zstandard

from projections.mapviews.hub import class_key
from projections.policy import (
    CompiledPolicy,
    PolicyNode,
    PolicyUser,
    Tailnet,
    compile_policy,
    parse_policy,
)
from projections.tailcfg import Hostinfo, MapRequest, NetInfo, RegisterRequest, RegisterResponseAuth
from protocol import (
    KEEPALIVE_FRAME_ZSTD,
    KEEPALIVE_JSON,
    ControlClient,
    HandshakeError,
    Keypair,
    MapStream,
    ProtocolError,
    RemoteProtocolError,
    fetch_server_key,
    open_control_client,
)

from ...adminsock import AdminError, call
from ...gcpolicy import manage_gc
from ..scenarios import SCENARIOS, Scenario, scenario

__all__ = [
    "PHASES",
    "FrameKind",
    "LoadgenOptions",
    "MapFrameScanner",
    "ScannedFrame",
    "build_parser",
    "format_table",
    "loadgen_main",
    "make_decompressor",
    "measure",
]

#: Phases ``--phases`` may name; ``register`` and ``connect`` always run.
PHASES: Final = ("join", "policy", "restart")

#: Capability version of the simulated clients (tailscale v1.90).
_CAP_VERSION: Final = 130
#: HTTP/2 receive windows of golang.org/x/net/http2's Transport (tailscale's clients).
_GO_STREAM_WINDOW: Final = 4 << 20
_GO_CONNECTION_WINDOW: Final = 1 << 30
#: Same defensive cap as ``protocol.mapframe`` (compressed and decompressed).
_MAX_FRAME: Final = 64 << 20
#: The zstd payload of the server's constant keep-alive frame.
_KEEPALIVE_PAYLOAD: Final = KEEPALIVE_FRAME_ZSTD[4:]
#: The memory guard kills the server when less than this share of the machine's
#: memory is available.
_MIN_AVAILABLE: Final = 0.10
#: Frames up to this size are always buffered: they may be keep-alives, and a
#: full map or update can never be this small (it carries at least ControlTime).
_SMALL_FRAME: Final = 64

_FILTER_MARKER: Final = b'"PacketFilter'  # matches PacketFilters and PacketFilter


# ---------------------------------------------------------------------------
# The receive path (sans-I/O)
# ---------------------------------------------------------------------------


class FrameKind(enum.Enum):
    """What a map-stream frame is, as far as the load generator can tell cheaply."""

    KEEPALIVE = "keepalive"
    #: The first non-keep-alive message of a stream: the full netmap (§8.5).
    FULL = "full"
    #: Any later message (a delta).
    UPDATE = "update"


@dataclass(frozen=True, slots=True)
class ScannedFrame:
    """One complete frame of a map stream.

    Attributes:
        kind: see :class:`FrameKind`.
        size: length of the (compressed) payload in bytes.
        payload: the zstd frame when it was kept, else ``None`` (skipped unread).
    """

    kind: FrameKind
    size: int
    payload: bytes | None


class MapFrameScanner:
    """Splits a zstd map stream into frames, reading only the ones someone wants.

    Unlike :class:`protocol.MapFrameDecoder`, which decompresses every frame, this
    asks ``want(kind)`` when a frame's header arrives and, if the answer is no,
    counts the payload bytes away without copying or decompressing them. Frames of at
    most ``_SMALL_FRAME`` bytes are always kept and checked against the keep-alive
    (``{"KeepAlive":true}``), first by bytes, then by decompressing; so a keep-alive is
    never mistaken for a full map.

    Feed DATA chunks in order; chunk and frame boundaries are independent.

    Args:
        want: decides, at the start of each non-keep-alive frame, whether its payload
            is kept. It sees the frame's kind (``FULL`` or ``UPDATE``).
        decompress: zstd decompression for keep-alive candidates.
        max_frame: largest acceptable payload.
    """

    __slots__ = (
        "_body",
        "_decompress",
        "_header",
        "_kind",
        "_max_frame",
        "_remaining",
        "_seen_map",
        "_size",
        "_want",
    )

    def __init__(
        self,
        want: Callable[[FrameKind], bool],
        decompress: Callable[[bytes], bytes],
        *,
        max_frame: int = _MAX_FRAME,
    ) -> None:
        self._want = want
        self._decompress = decompress
        self._max_frame = max_frame
        self._header = bytearray()
        # Invariant: _remaining > 0 exactly while inside a frame's payload; _body is
        # the kept part of that payload (None: skipping).
        self._remaining = 0
        self._size = 0
        self._body: bytearray | None = None
        self._kind = FrameKind.FULL
        self._seen_map = False  # has a non-keep-alive frame completed on this stream?

    def feed(self, data: bytes) -> list[ScannedFrame]:
        """Consume one chunk; return the frames it completed.

        Raises:
            RemoteProtocolError: a zero-length or oversized frame.
        """
        out: list[ScannedFrame] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._remaining == 0:
                # Header: 4 bytes, possibly split across chunks.
                need = 4 - len(self._header)
                self._header += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._header) < 4:
                    break
                self._start(int.from_bytes(self._header, "little"))
                self._header.clear()
                continue
            take = min(self._remaining, end - pos)
            if self._body is not None:
                self._body += view[pos : pos + take]
            pos += take
            self._remaining -= take
            if self._remaining == 0:
                out.append(self._finish())
        return out

    def _start(self, length: int) -> None:
        """A header arrived: check the length, classify, decide whether to keep."""
        if length == 0:
            raise RemoteProtocolError("zero-length map frame")
        if length > self._max_frame:
            raise RemoteProtocolError(f"map frame of {length} bytes is too large")
        self._remaining = self._size = length
        self._kind = FrameKind.UPDATE if self._seen_map else FrameKind.FULL
        keep = length <= _SMALL_FRAME or self._want(self._kind)
        self._body = bytearray() if keep else None

    def _finish(self) -> ScannedFrame:
        """The last payload byte arrived: settle the kind and hand the frame out."""
        payload = bytes(self._body) if self._body is not None else None
        self._body = None
        if payload is not None and self._size <= _SMALL_FRAME and self._is_keepalive(payload):
            return ScannedFrame(FrameKind.KEEPALIVE, self._size, None)
        self._seen_map = True
        if payload is not None and self._size <= _SMALL_FRAME and not self._want(self._kind):
            payload = None  # kept only to check for a keep-alive
        return ScannedFrame(self._kind, self._size, payload)

    def _is_keepalive(self, payload: bytes) -> bool:
        """Our server's constant frame, or any zstd encoding of the keep-alive JSON."""
        if payload == _KEEPALIVE_PAYLOAD:
            return True
        try:
            return self._decompress(payload) == KEEPALIVE_JSON
        except zstandard.ZstdError:
            raise RemoteProtocolError("bad zstd map frame") from None


def make_decompressor(max_size: int = _MAX_FRAME) -> Callable[[bytes], bytes]:
    """A zstd decompression function for map messages (not thread-safe).

    A message may be several concatenated zstd frames (the server sends full maps as
    shared pre-compressed pieces; tailscale's ``zstdframe.AppendDecode`` reads "zero
    or more frames"), which ``ZstdDecompressor.decompress`` would silently cut after
    the first one.

    Raises (from the returned function):
        zstandard.ZstdError: not zstd.
        RemoteProtocolError: more than ``max_size`` bytes of output.
    """
    decompressor = zstandard.ZstdDecompressor()

    def decompress(payload: bytes) -> bytes:
        reader = decompressor.decompressobj(write_size=1 << 20, read_across_frames=True)
        data: bytes = reader.decompress(payload)
        if len(data) > max_size:
            raise RemoteProtocolError("map message decompresses to more than the limit")
        return data

    return decompress


# Views for the sentinel client: the few MapResponse fields it checks.
class _PeerView(msgspec.Struct):
    Key: str = ""


class _MapView(msgspec.Struct):
    Node: _PeerView | None = None
    Peers: list[_PeerView] | None = None
    PeersChanged: list[_PeerView] | None = None
    PeersRemoved: list[int] | None = None
    PacketFilters: dict[str, msgspec.Raw] | None = None
    PacketFilter: msgspec.Raw | None = None


_view_decoder: Final = msgspec.json.Decoder(_MapView)


# ---------------------------------------------------------------------------
# Simulated clients (trio)
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Watch:
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
class _ChurnWatch:
    """One change of the churn phase being timed (several may be under way at once).

    A receiver hits it when an update (not a full map) carries the change:

    * ``join``: the newcomer's node key among ``PeersChanged``;
    * ``tag``: the retagged node's key among ``PeersChanged``, or its id among
      ``PeersRemoved`` (it may leave a node's view);
    * ``delete``: the deleted node's id among ``PeersRemoved``;
    * ``policy``: a packet filter.

    A client hits it at most once; one outside ``receivers`` counts as ``unexpected``.
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

    def offer(self, index: int, now: float) -> None:
        """Client ``index`` got an update that carries the change."""
        if index == self.exclude or index in self.seen:
            return
        self.seen.add(index)
        if index not in self.receivers:
            self.unexpected += 1
            return
        self.latencies.append(now - self.t0)
        if len(self.latencies) >= len(self.receivers):
            self.done.set()


@dataclass(eq=False)
class _Hub:
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
    watch: _Watch | None = None
    #: The churn phase's changes under way (see :class:`_ChurnWatch`).
    churn: list[_ChurnWatch] = field(default_factory=list)
    churn_bytes: int = 0  # compressed bytes of the updates read while churn watches ran
    full_map_max: int = 0  # largest compressed full map seen, bytes
    full_map_json: int = 0  # the sentinel's last full map, decompressed bytes
    full_map_peers: int = -1  # peers in the sentinel's last full map
    marker_mismatches: int = 0
    keepalives: int = 0
    lite_updates: int = 0
    updates_read: int = 0  # non-full frames decompressed (during watches)
    errors: Counter[str] = field(default_factory=Counter)

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

    def count_ready(self, client: _Client, now: float) -> None:
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


class _FatalClientError(Exception):
    """The server refused a registration: the run cannot produce figures."""


class _TryAgain(Exception):
    """The server refused a registration for now (its message says "try again")."""


_Retryable = (OSError, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, _TryAgain)


class _Client:
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

    def __init__(self, index: int, hub: _Hub, *, updater: bool = False, sentinel: bool = False) -> None:
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
        self._seen: _Watch | None = None  # the last watch this client has hit
        self._slot: trio.Semaphore | None = None
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
            _FatalClientError: the server refused the registration (not retried).

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
            hub.port,
            machine_key=self.machine,
            server_public=hub.server_key,
            # The windows of Go's HTTP/2 transport, which tailscale's clients use.
            initial_window_size=_GO_STREAM_WINDOW,
            connection_window_size=_GO_CONNECTION_WINDOW,
        ) as client:
            if hub.server_key is None:
                hub.server_key = client.server_public
            if not self.registered:
                await self._register(client)
                self._release_slot()
                await hub.streams_go.wait()
                await self._take_slot(hub.connect_slots)
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
            _FatalClientError: the server refused for good.
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
            raise _FatalClientError(f"sim-{self.index}: registration refused: {response.error}")
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
        view = _view_decoder.decode(body)
        keys = {p.Key.encode() for p in view.PeersChanged or ()}
        removed = set(view.PeersRemoved or ())
        has_filter = view.PacketFilters is not None or view.PacketFilter is not None
        for watch in hub.churn:
            if watch.matches(keys, removed, has_filter):
                watch.offer(self.index, now)

    def _check(self, body: bytes, kind: FrameKind, watch: _Watch | None, hit: bool) -> None:
        """Sentinel: decode fully and compare with what the byte search concluded."""
        hub = self.hub
        view = _view_decoder.decode(body)
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


# ---------------------------------------------------------------------------
# --workers: the simulated clients in several processes
# ---------------------------------------------------------------------------


class _SharedClock(trio.abc.Clock):
    """trio's time as ``time.monotonic()`` itself (trio's own clock adds a random
    offset per run), so that times taken in the worker processes and in this one
    can be subtracted: CLOCK_MONOTONIC is one clock for the whole machine."""

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return time.monotonic()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - time.monotonic()


async def _recv(conn: Connection) -> tuple[Any, ...] | None:
    """The next message on ``conn`` (``None`` once the other side is gone)."""
    await trio.lowlevel.wait_readable(conn.fileno())
    try:
        msg: tuple[Any, ...] = conn.recv()
    except (EOFError, OSError):
        return None
    return msg


@dataclass(frozen=True)
class _WorkerSpec:
    """What a worker process needs to run its share of the clients."""

    indexes: tuple[int, ...]
    updaters: frozenset[int]
    port: int
    server_key: bytes | None
    auth_keys: dict[int, str]
    update_interval: tuple[float, float]
    register_concurrency: int
    concurrency: int
    cpus: frozenset[int]


@dataclass(eq=False)
class _WorkerHub(_Hub):
    """A worker's hub: what the parent needs to count goes to it as a message."""

    conn: Connection | None = None

    def _send(self, *msg: object) -> None:
        assert self.conn is not None
        self.conn.send(msg)

    def count_registered(self) -> None:
        self.registered += 1
        self._send("registered")

    def count_ready_at(self, now: float) -> None:
        self._send("ready", now)


class _RemoteWatch(_Watch):
    """A worker's copy of the parent's watch: hits, strays and bytes go to the parent."""

    serial: int = 0
    conn: Connection | None = None
    _unexpected: int = 0
    _bytes: int = 0

    def hit(self, now: float) -> None:
        assert self.conn is not None
        self.conn.send(("hit", self.serial, now))

    @property
    def unexpected(self) -> int:
        return self._unexpected

    @unexpected.setter
    def unexpected(self, value: int) -> None:
        if self.conn is not None and value != self._unexpected:
            self.conn.send(("unexpected", self.serial, value - self._unexpected))
        self._unexpected = value

    @property
    def bytes(self) -> int:
        return self._bytes

    @bytes.setter
    def bytes(self, value: int) -> None:
        if self.conn is not None and value != self._bytes:
            self.conn.send(("bytes", self.serial, value - self._bytes))
        self._bytes = value


_STAT_SUMS: Final = ("keepalives", "lite_updates", "updates_read", "marker_mismatches", "churn_bytes")


class _RemoteChurnWatch(_ChurnWatch):
    """A worker's copy of a churn change: whoever gets it is reported to the parent,
    which knows the receivers."""

    serial: int = 0
    conn: Connection | None = None

    def offer(self, index: int, now: float) -> None:
        if index not in self.seen:
            self.seen.add(index)
            assert self.conn is not None
            self.conn.send(("offer", self.serial, index, now))


def _worker_main(conn: Connection, spec: _WorkerSpec) -> None:
    """A worker process: run ``spec``'s clients until the parent says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    try:
        trio.run(_worker, conn, spec, clock=_SharedClock())
    except* _FatalClientError as group:
        conn.send(("fatal", str(group.exceptions[0])))


async def _worker(conn: Connection, spec: _WorkerSpec) -> None:
    hub = _WorkerHub(
        port=spec.port, auth_key=spec.auth_keys[spec.indexes[0]] if spec.indexes else "", auth_keys=spec.auth_keys,
        server_key=spec.server_key, decompress=make_decompressor(), update_interval=spec.update_interval,
        register_slots=trio.Semaphore(spec.register_concurrency), connect_slots=trio.Semaphore(spec.concurrency),
        conn=conn,
    )
    clients = [_Client(i, hub, updater=i in spec.updaters, sentinel=i == 0) for i in spec.indexes]
    sent: dict[str, int] = dict.fromkeys(_STAT_SUMS, 0)
    errors_sent: Counter[str] = Counter()
    conn.send(("up",))
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(manage_gc, interval=5.0, full_interval=600.0))
        while (msg := await _recv(conn)) is not None and msg[0] != "stop":
            op = msg[0]
            if op == "register":
                for c in clients:
                    nursery.start_soon(c.run)
                gc.freeze()
            elif op == "go":
                hub.streams_go.set()
            elif op == "unslot":
                hub.connect_slots = None
            elif op == "round":
                hub.round = msg[1]
            elif op == "watch":
                _, serial, kind, marker, expected, exclude, receivers, t0 = msg
                watch = _RemoteWatch(kind, marker, expected, exclude=exclude, receivers=receivers, t0=t0)
                watch.serial, watch.conn = serial, conn
                hub.watch = watch
            elif op == "unwatch":
                hub.watch = None
            elif op == "churn":
                _, serial, kind, key, node_id = msg
                churn = _RemoteChurnWatch(kind, frozenset({-1}), key=key, node_id=node_id)
                churn.serial, churn.conn = serial, conn
                hub.churn.append(churn)
            elif op == "unchurn":
                hub.churn = [w for w in hub.churn if not (isinstance(w, _RemoteChurnWatch) and w.serial == msg[1])]
            elif op == "cancel":
                for c in clients:
                    if c.index == msg[1]:
                        c.scope.cancel()
            elif op == "stats":
                now = {k: getattr(hub, k) for k in _STAT_SUMS}
                conn.send(("stats", {k: now[k] - sent[k] for k in _STAT_SUMS}, hub.full_map_max,
                           hub.full_map_json, hub.full_map_peers, dict(hub.errors - errors_sent)))
                sent, errors_sent = now, Counter(hub.errors)
        nursery.cancel_scope.cancel()


class _ParentHub(_Hub):
    """The hub of a ``--workers`` run, in the parent: it counts what the workers
    report, and tells them of every new round and watch."""

    workers: _Workers | None = None
    _watch: _Watch | None = None

    @property
    def watch(self) -> _Watch | None:
        return self._watch

    @watch.setter
    def watch(self, value: _Watch | None) -> None:
        self._watch = value
        if self.workers is not None:
            self.workers.publish(value)

    def begin_round(self, target: int, t0: float) -> None:
        super().begin_round(target, t0)
        if self.workers is not None:
            self.workers.send(("round", self.round))


class _Workers:
    """The worker processes of a ``--workers`` run, seen from the parent.

    Client *i* runs in worker *i* mod W; the join phase's newcomer runs here. The
    ramp limits (``--concurrency``, ``--register-concurrency``) are split among the
    workers (at least 1 each).
    """

    def __init__(self, opts: LoadgenOptions, hub: _ParentHub, server: _Server, updaters: set[int]) -> None:
        self.opts = opts
        self.hub = hub
        self.server = server
        self.updaters = frozenset(updaters)
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.watches: dict[int, _Watch] = {}
        self.churn: dict[int, _ChurnWatch] = {}
        self.stopping = False
        self._up = 0
        self._all_up = trio.Event()
        self._stats_pending = 0
        self._stats_done = trio.Event()
        self._own: dict[str, int] = {}

    async def start(self, nursery: trio.Nursery, n: int, results: Results) -> None:
        """Spawn the workers (their clients are made but idle until ``register``)."""
        count = self.opts.workers
        ctx = multiprocessing.get_context("spawn")
        for w in range(count):
            parent, child = ctx.Pipe()
            spec = _WorkerSpec(
                indexes=tuple(range(w, n, count)), updaters=self.updaters, port=self.hub.port,
                server_key=self.hub.server_key, auth_keys=self.hub.auth_keys,
                update_interval=self.hub.update_interval,
                register_concurrency=max(1, self.opts.register_concurrency // count),
                concurrency=max(1, self.opts.concurrency // count), cpus=self.server.loadgen_cpus,
            )
            proc = ctx.Process(target=_worker_main, args=(child, spec), daemon=True, name=f"loadgen-worker-{w}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
            nursery.start_soon(self._read, parent)
        self.server.worker_pids = [p.pid for p in self.procs if p.pid is not None]
        self.hub.workers = self
        results["workers"] = count
        with trio.move_on_after(60 * self.opts.timeout_scale):
            await self._all_up.wait()
        if not self._all_up.is_set():
            raise _FatalClientError("the load-generator workers did not start")

    def send(self, msg: tuple[object, ...]) -> None:
        for conn in self.conns:
            conn.send(msg)

    def publish(self, watch: _Watch | None) -> None:
        """Install ``watch`` (or none) in every worker."""
        if watch is None:
            self.send(("unwatch",))
            return
        serial = len(self.watches) + 1
        self.watches[serial] = watch
        self.send(("watch", serial, watch.kind, watch.marker, watch.expected, watch.exclude,
                   watch.receivers, watch.t0))

    def publish_churn(self, watch: _ChurnWatch) -> None:
        """Install a churn change in every worker (``("unchurn", id(watch))`` ends it)."""
        self.churn[id(watch)] = watch
        self.send(("churn", id(watch), watch.kind, watch.key, watch.node_id))

    async def collect(self) -> None:
        """Fold the workers' counters (keep-alives, full-map sizes, errors, ...) into
        the hub: each answer carries what changed since the last one."""
        self._stats_pending = len(self.conns)
        self._stats_done = trio.Event()
        self.send(("stats",))
        with trio.move_on_after(30 * self.opts.timeout_scale):
            await self._stats_done.wait()

    async def _read(self, conn: Connection) -> None:
        hub = self.hub
        while (msg := await _recv(conn)) is not None:
            op = msg[0]
            if op == "registered":
                hub.count_registered()
            elif op == "ready":
                hub.count_ready_at(msg[1])
            elif op == "hit":
                self.watches[msg[1]].hit(msg[2])
            elif op == "unexpected":
                self.watches[msg[1]].unexpected += msg[2]
            elif op == "bytes":
                self.watches[msg[1]].bytes += msg[2]
            elif op == "offer":
                self.churn[msg[1]].offer(msg[2], msg[3])
            elif op == "up":
                self._up += 1
                if self._up >= len(self.procs):
                    self._all_up.set()
            elif op == "stats":
                _, sums, full_max, full_json, full_peers, errors = msg
                for key in _STAT_SUMS:
                    setattr(hub, key, getattr(hub, key) + sums[key])
                hub.full_map_max = max(hub.full_map_max, full_max)
                if full_peers >= 0:  # the worker with the sentinel
                    hub.full_map_json, hub.full_map_peers = full_json, full_peers
                hub.errors.update(errors)
                self._stats_pending -= 1
                if self._stats_pending <= 0:
                    self._stats_done.set()
            elif op == "fatal":
                raise _FatalClientError(msg[1])
        if not self.stopping:
            raise _FatalClientError("a load-generator worker exited")

    def stop(self) -> None:
        """Tell the workers to stop; kill any that does not within 5 s (blocking)."""
        self.stopping = True
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


def _pids_cpu(pids: Sequence[int]) -> float:
    """CPU seconds of the (live) processes ``pids`` together."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += _proc_cpu(pid)
    return total


def _pin(server: _Server, workers: int) -> str:
    """Pin the server apart from the load generator when the machine has cores to
    spare (3 or more: the first half to the server, the rest to us and the workers);
    say what was done."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 3:
        return (f"not pinned: only {len(cpus)} core(s) here, so the server and the {workers} "
                "load-generator workers share them")
    half = len(cpus) // 2
    server.cpus, server.loadgen_cpus = frozenset(cpus[:half]), frozenset(cpus[half:])
    os.sched_setaffinity(0, server.loadgen_cpus)
    return (f"pinned: the server on CPU(s) {','.join(map(str, cpus[:half]))}, the load generator "
            f"and its {workers} workers on {','.join(map(str, cpus[half:]))}")


# ---------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_memory(pid: int) -> tuple[int, int]:
    """(RSS, peak RSS) of ``pid`` in bytes, from ``VmRSS`` and ``VmHWM``."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024  # kB
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


@dataclass
class _Server:
    """A ``tailledger serve`` child on a scratch data directory."""

    data: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    #: --workers: the worker processes' pids (their CPU is reported per phase).
    worker_pids: list[int] = field(default_factory=list)
    #: The CPUs the server is pinned to (empty: not pinned).
    cpus: frozenset[int] = frozenset()
    #: The CPUs the load generator's workers are pinned to (empty: not pinned).
    loadgen_cpus: frozenset[int] = frozenset()

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAILLEDGER_")}
        env.update(
            TAILLEDGER_DATA=str(self.data), TAILLEDGER_LISTEN_ADDR=f"127.0.0.1:{self.port}",
            TAILLEDGER_LOG_LEVEL="warning",
            # The simulated clients keep their tunnel with no stream open between the
            # register and connect phases (real ones open their map poll at once), and
            # thousands of them share two cores with the server, so one may not read for
            # a while: the idle and slow-reader limits would measure the load generator.
            TAILLEDGER_LIMITS__TUNNEL_IDLE_TIMEOUT="24h",
            TAILLEDGER_LIMITS__WRITE_TIMEOUT="10m",
            TAILLEDGER_AUDIT__SIGNING_KEY_FILE=str(self.data.parent / f"{self.data.name}-signing.key"),
        )
        return env

    def start(self, timeout: float) -> None:
        """Start the server and wait until its port accepts connections (blocking)."""
        log = open(self.data.parent / f"{self.data.name}-server.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {log.name}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s (blocking)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def admin(self, op: str, args: Mapping[str, object] | None = None) -> object:
        """One admin-socket operation (blocking)."""
        return call(self.data / "admin.sock", op, dict(args) if args is not None else None)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


# ---------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadgenOptions:
    """How to run one measurement (see ``tailledger loadgen --help``).

    Attributes:
        phases: which of :data:`PHASES` to run after register and connect.
        updaters: clients that send lite endpoint updates; ``None`` = min(N/10, 20).
        update_interval: each updater waits uniformly this long between updates (s).
        concurrency: stream openings in flight at once during the ramp (the
            reconnect after a restart is not limited, like real clients).
        register_concurrency: registrations in flight at once. The server appends
            one event at a time and has concurrent registrations retry on a
            sequence conflict, so more than a few only burns its CPU on retries.
        timeout_scale: multiplies every phase timeout (they grow with N).
        max_server_rss: bytes of server RSS at which the run is aborted (0: only
            the machine-wide guard, see ``_memory_guard``).
        scenario: the tailnet's shape, a name in :data:`cli.bench.scenarios.SCENARIOS`.
        duration: how long the ``churn`` scenario's churn phase runs (s).
        join_delete_every, tag_every, policy_every: the churn phase's rates: a join
            or a delete (alternately), a tag change, a policy edit every so many
            seconds (0 = never).
        seed: seeds the churn phase's choices.
        workers: run the simulated clients in this many worker processes (0: in
            this process, as always).
    """

    phases: frozenset[str] = frozenset(PHASES)
    updaters: int | None = None
    update_interval: tuple[float, float] = (20.0, 40.0)
    concurrency: int = 64
    register_concurrency: int = 4
    timeout_scale: float = 1.0
    max_server_rss: int = 0
    scenario: str = "flat"
    duration: float = 30.0
    join_delete_every: float = 1.0
    tag_every: float = 10.0
    policy_every: float = 60.0
    seed: int = 19
    workers: int = 0

    def timeout(self, base: float, per_node: float, n: int) -> float:
        return (base + per_node * n) * self.timeout_scale


Results = dict[str, object]


class _Span:
    """Wall time, server CPU and load-generator CPU over one phase."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.t0 = trio.current_time()
        self.cpu0 = _proc_cpu(server.pid)
        self.own0 = time.process_time()
        self.workers0 = _pids_cpu(server.worker_pids)

    def close(self, results: Results, phase: str, *, wall_key: str | None = None) -> float:
        wall = trio.current_time() - self.t0
        results[f"{phase}_wall_s"] = wall
        results[f"{phase}_cpu_s"] = _proc_cpu(self.server.pid) - self.cpu0
        results[f"{phase}_loadgen_cpu_pct"] = 100 * (time.process_time() - self.own0) / max(wall, 1e-9)
        if self.server.worker_pids:
            # --workers: the clients' processes (together; % of one core), besides this one.
            busy = _pids_cpu(self.server.worker_pids) - self.workers0
            results[f"{phase}_workers_cpu_s"] = busy
            results[f"{phase}_workers_cpu_pct"] = 100 * busy / max(wall, 1e-9)
        if wall_key:
            results[wall_key] = wall
        return wall


def _pct(latencies: list[float], expected: int, q: float) -> float | None:
    """The q-quantile in ms over ``expected`` receivers, counting those who never
    received as infinitely late: ``None`` when the quantile falls among them."""
    if expected <= 0:
        return None
    ordered = sorted(latencies)
    i = min(expected - 1, max(0, math.ceil(q * expected) - 1))
    return ordered[i] * 1000 if i < len(ordered) else None


async def _settle(server: _Server, *, min_s: float, max_s: float, idle_pct: float = 20.0) -> tuple[float, float]:
    """Wait until the server's CPU use over the last second is below ``idle_pct``.

    Returns (seconds waited, CPU % of the last one-second window).
    """
    t0 = trio.current_time()
    last_t, last_cpu = t0, _proc_cpu(server.pid)
    while True:
        await trio.sleep(1.0)
        now, cpu = trio.current_time(), _proc_cpu(server.pid)
        pct = 100 * (cpu - last_cpu) / max(now - last_t, 1e-9)
        last_t, last_cpu = now, cpu
        if (now - t0 >= min_s and pct < idle_pct) or now - t0 >= max_s:
            return now - t0, pct


@dataclass(frozen=True)
class Expectations:
    """What the policy engine says about a scenario's tailnet of ``n`` nodes plus the
    newcomer (client indexes; node ``n`` is the newcomer).

    Attributes:
        join: the clients that can see the newcomer.
        policy: the clients whose packet filter the scenario's policy change changes.
        classes: visibility classes (:func:`projections.mapviews.hub.class_key`).
        peers_avg, peers_median, peers_max: peers per node.
    """

    join: frozenset[int]
    policy: frozenset[int]
    classes: int
    peers_avg: float
    peers_median: float
    peers_max: int


def expectations(sc: Scenario, n: int) -> Expectations:
    """Compile the scenario's policies on its users and nodes (synthetic addresses:
    the scenarios name no addresses) and derive each change's receivers."""
    users = [PolicyUser(id=i + 1, login=name, name=name) for i, name in enumerate(sc.users)]
    uid = {name: i + 1 for i, name in enumerate(sc.users)}
    nodes = []
    for i in range(n + 1):
        user, tags = sc.node(i)
        nodes.append(PolicyNode(
            id=i + 1, name=f"sim-{i}", user_id=uid[user], tags=tags,
            ipv4=f"100.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", ipv6=f"fd7a:115c:a1e0::{i + 1:x}",
        ))
    tailnet = Tailnet(users, nodes)
    a = compile_policy(parse_policy(sc.policy_a), tailnet)
    b = compile_policy(parse_policy(sc.policy_b), tailnet)
    join = frozenset(i - 1 for i in a.peer_id_set(n + 1))
    policy = frozenset(i for i in range(n + 1) if a.packet_filter(i + 1) != b.packet_filter(i + 1))
    peers = sorted(len(a.peer_id_set(i + 1)) for i in range(n))
    classes = len({class_key(a, i + 1) for i in range(n)})
    return Expectations(join, policy, classes, sum(peers) / max(n, 1), float(peers[n // 2]) if n else 0.0,
                        peers[-1] if n else 0)


async def measure(n: int, workdir: Path, options: LoadgenOptions | None = None) -> Results:
    """Run every selected phase with ``n`` simulated clients against a fresh server.

    Args:
        n: tailnet size (simulated nodes besides the join phase's newcomer).
        workdir: scratch space; the server's data and log go in ``workdir/n<N>``.
        options: see :class:`LoadgenOptions`.

    Returns:
        The figures (see the module docstring); a phase that timed out records how
        many clients made it (``registered``, ``connected``, ``*_reached``,
        ``reconnected``) and ``None`` for quantiles it could not reach.

    Raises:
        RuntimeError: the server did not start, or refused a registration.

    Cancellation: the server is stopped either way.
    """
    opts = options or LoadgenOptions()
    server = _Server(workdir / f"n{n}", _free_port())
    server.data.mkdir(parents=True)
    results: Results = {"nodes": n}
    if opts.workers:
        results["pinning"] = _pin(server, opts.workers)
        print(f"  {results['pinning']}", flush=True)
    await trio.to_thread.run_sync(server.start, opts.timeout(60, 0.01, n))
    try:
        async with trio.open_nursery() as guarded:
            guarded.start_soon(_memory_guard, server, opts, results, guarded.cancel_scope)
            await _run_phases(n, server, opts, results)
            guarded.cancel_scope.cancel()
    except* _FatalClientError as group:
        raise RuntimeError(str(group.exceptions[0])) from None
    finally:
        await trio.to_thread.run_sync(server.stop)
    return results


def _meminfo() -> tuple[int, int]:
    """(MemTotal, MemAvailable) of the machine in bytes."""
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemAvailable"):
            values[name] = int(rest.split()[0]) * 1024
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


async def _memory_guard(server: _Server, opts: LoadgenOptions, results: Results, scope: trio.CancelScope) -> None:
    """Kill the server (and end the measurement) before it takes the machine down.

    Other people's processes share the machine, so a server that balloons (a
    reconnect herd once took one past 19 GiB) must not get the kernel's OOM killer
    going. Trips when the server's RSS passes ``opts.max_server_rss`` (if set) or the
    machine's available memory falls under ``_MIN_AVAILABLE`` of the total; the reason
    and the phase go into ``results["aborted"]``.
    """
    while True:
        await trio.sleep(0.5)
        proc = server.proc
        if proc is None or proc.poll() is not None:
            continue  # between stop and start of the restart phase
        try:
            rss, _ = _proc_memory(proc.pid)
        except OSError:
            continue  # exited just now
        total, available = _meminfo()
        reason = None
        if opts.max_server_rss and rss > opts.max_server_rss:
            reason = f"server RSS {rss / 2**20:.0f} MiB passed --max-server-rss"
        elif total and available < _MIN_AVAILABLE * total:
            reason = (f"only {available / 2**20:.0f} MiB of memory left on the machine "
                      f"(server RSS {rss / 2**20:.0f} MiB)")
        if reason is not None:
            proc.kill()
            results["aborted"] = f"{reason}, during {results.get('last_phase', '?')}; server killed"
            print(f"  ABORTED: {results['aborted']}", flush=True)
            scope.cancel()
            return


async def _run_phases(n: int, server: _Server, opts: LoadgenOptions, results: Results) -> None:
    """Set the tailnet up (user, reusable key, policy A), start the clients and run the
    phases in order, filling ``results`` as each one ends."""
    admin = trio.to_thread.run_sync
    sc = scenario(opts.scenario, n + 1)  # the join phase's newcomer is node n
    expect = await trio.to_thread.run_sync(expectations, sc, n)
    results.update(scenario=sc.name, classes=expect.classes, peers_avg=expect.peers_avg,
                   peers_median=expect.peers_median, peers_max=expect.peers_max)
    for name in sc.users:
        await admin(server.admin, "users.create", {"name": name})
    has_policy = True
    try:
        await admin(server.admin, "policy.set", {"text": sc.policy_a})
    except AdminError:
        has_policy = False
    keys: dict[tuple[str, tuple[str, ...]], str] = {}
    for i in range(n + 1):
        kind = sc.node(i)
        if kind not in keys:
            created = await admin(server.admin, "preauthkeys.create", {
                "user": kind[0], "reusable": True, "tags": list(kind[1]), "expiration_seconds": None,
            })
            assert isinstance(created, dict)
            keys[kind] = str(created["key"])
    auth_keys = {i: keys[sc.node(i)] for i in range(n + 1)}
    rss0, _ = _proc_memory(server.pid)

    updaters = min(n // 10, 20) if opts.updaters is None else min(opts.updaters, n)
    decompress = make_decompressor()  # one for all: this is one thread
    hub = (_ParentHub if opts.workers else _Hub)(
        port=server.port,
        auth_key=auth_keys[0],
        auth_keys=auth_keys,
        server_key=await fetch_server_key("127.0.0.1", server.port),
        decompress=decompress,
        update_interval=opts.update_interval,
        register_slots=trio.Semaphore(opts.register_concurrency),
        connect_slots=trio.Semaphore(opts.concurrency),
        register_target=n,
        population=n,
    )
    spread = {i * n // updaters for i in range(updaters)} if updaters else set()
    workers = _Workers(opts, hub, server, spread) if isinstance(hub, _ParentHub) else None
    clients = [] if workers else [_Client(i, hub, updater=i in spread, sentinel=i == 0) for i in range(n)]
    results["updaters"] = len(spread)

    try:
        async with trio.open_nursery() as nursery:
            # Thousands of clients are a large, long-lived heap: without this, the
            # oldest-generation collections of the load generator itself (a second or
            # more at 5,000 clients) would be measured as server latency.
            await nursery.start(functools.partial(manage_gc, interval=5.0, full_interval=600.0))
            if workers:
                await workers.start(nursery, n, results)
            # -- register: everybody, before any stream exists ---------------------------
            results["last_phase"] = "register"
            span = _Span(server)
            for c in clients:
                nursery.start_soon(c.run)
            if workers:
                workers.send(("register",))
            await _wait(hub.registered_all, opts.timeout(60, 0.05, n), "register", lambda: hub.registered, n)
            span.close(results, "register", wall_key="register_all_s")
            results["registered"] = hub.registered
            results["rss_registered_mib"] = _proc_memory(server.pid)[0] / 2**20
            gc.freeze()  # the clients' long-lived objects: keep them out of GC passes

            # -- connect: open the streams, at most `concurrency` waiting for a full map --
            results["last_phase"] = "connect"
            span = _Span(server)
            hub.begin_round(n, trio.current_time())
            hub.streams_go.set()
            if workers:
                workers.send(("go",))
            await _wait(hub.ready_all, opts.timeout(60, 0.1, n), "connect", lambda: hub.ready, n)
            span.close(results, "connect", wall_key="connect_all_s")
            results["connected"] = hub.ready
            results["connect_p50_s"] = _sec(_pct(hub.ready_times, n, 0.5))
            results["connect_p99_s"] = _sec(_pct(hub.ready_times, n, 0.99))
            if workers:
                await workers.collect()  # the full-map sizes are the workers' to tell
            results["full_map_kib"] = hub.full_map_max / 1024
            results["full_map_json_kib"] = hub.full_map_json / 1024
            results["full_map_peers"] = hub.full_map_peers
            hub.connect_slots = None  # from now on clients reconnect like real ones: at once
            if workers:
                workers.send(("unslot",))
            gc.freeze()

            # -- memory once idle ----------------------------------------------------------
            # At least one of the server's 10-second memory steps (cli/gcpolicy.py):
            # idle memory is what an idle server holds, not the ramp's leftovers.
            settle_s, idle_pct = await _settle(server, min_s=11, max_s=opts.timeout(20, 0.01, n))
            rss1, peak = _proc_memory(server.pid)
            results["settle_s"] = settle_s
            results["idle_cpu_pct"] = idle_pct
            results["rss_before_mib"] = rss0 / 2**20
            results["rss_mib"] = rss1 / 2**20
            results["peak_rss_mib"] = peak / 2**20
            results["mem_per_node_kib"] = (rss1 - rss0) / max(n, 1) / 1024

            if sc.name == "churn":
                await _churn(server, opts, hub, clients, n, spread, nursery, results, sc, auth_keys)
                nursery.cancel_scope.cancel()
                return
            if "join" in opts.phases:
                await _join(n, server, opts, hub, clients, nursery, results, expect.join)
            if "policy" in opts.phases and has_policy:
                await _settle(server, min_s=1, max_s=opts.timeout(5, 0.005, n))
                receivers = expect.policy if hub.population > n else expect.policy - {n}
                await _policy(n, server, opts, hub, clients, results, sc, receivers)
            if "restart" in opts.phases:
                await _settle(server, min_s=1, max_s=opts.timeout(5, 0.005, n))
                await _restart(n, server, opts, hub, clients, results)
            if workers:
                await workers.collect()
            nursery.cancel_scope.cancel()
    finally:  # also when the memory guard cut the run short
        if workers:
            workers.stop()
        if "aborted" in results:
            results["ready_at_abort"] = hub.ready  # in the round that was under way
        results["keepalives"] = hub.keepalives
        results["lite_updates"] = hub.lite_updates
        results["updates_read"] = hub.updates_read
        results["marker_mismatches"] = hub.marker_mismatches
        results["client_errors"] = dict(hub.errors.most_common(8))


async def _wait(
    done: trio.Event, within: float, label: str, progress: Callable[[], int], total: int,
    *, every: float = 30.0,
) -> None:
    """Wait for ``done`` at most ``within`` seconds; print how far the phase got every
    ``every`` seconds (a 5,000-node phase can take minutes) and when it ends."""
    t0 = trio.current_time()
    with trio.move_on_after(within):
        while not done.is_set():
            with trio.move_on_after(every):
                await done.wait()
            if not done.is_set():
                print(f"  {label}: {progress()}/{total} after {trio.current_time() - t0:.0f} s", flush=True)
    state = "done" if done.is_set() else "TIMED OUT"
    print(f"  {label}: {progress()}/{total} {state} in {trio.current_time() - t0:.1f} s", flush=True)


def _sec(ms: float | None) -> float | None:
    """Milliseconds to seconds, keeping ``None`` (not reached)."""
    return None if ms is None else ms / 1000


async def _join(
    n: int, server: _Server, opts: LoadgenOptions, hub: _Hub, clients: list[_Client],
    nursery: trio.Nursery, results: Results, receivers: frozenset[int],
) -> None:
    """One more node registers and streams; it stays for the later phases. Only the
    ``receivers`` (the nodes that can see it) are waited for."""
    newcomer = _Client(hub.population, hub)
    watch = _Watch("join", newcomer.marker, expected=len(receivers), exclude=newcomer.index, receivers=receivers)

    def begin() -> None:  # just before the register request leaves
        watch.t0 = trio.current_time()
        hub.watch = watch

    newcomer.on_register = begin
    results["last_phase"] = "join"
    hub.register_target = hub.registered + 1
    hub.registered_all = trio.Event()
    span = _Span(server)
    nursery.start_soon(newcomer.run)
    with trio.move_on_after(opts.timeout(30, 0.01, n)):
        await watch.done.wait()
        await newcomer.has_map.wait()  # its register call has returned by then, too
    print(f"  join: {len(watch.latencies)}/{watch.expected} saw it", flush=True)
    span.close(results, "join")
    hub.watch = None
    clients.append(newcomer)
    hub.population += 1
    results["register_ms"] = None if newcomer.register_s is None else newcomer.register_s * 1000
    results["join_self_map_ms"] = (
        None if newcomer.first_map_at is None else (newcomer.first_map_at - watch.t0) * 1000
    )
    _record_latencies(results, "join", watch)


def _record_latencies(results: Results, phase: str, watch: _Watch) -> None:
    """``<phase>_reached`` and the p50, p99 and max latencies of a watched change."""
    results[f"{phase}_reached"] = len(watch.latencies)
    results[f"{phase}_p50_ms"] = _pct(watch.latencies, watch.expected, 0.5)
    results[f"{phase}_p99_ms"] = _pct(watch.latencies, watch.expected, 0.99)
    results[f"{phase}_max_ms"] = _pct(watch.latencies, watch.expected, 1.0)
    results[f"{phase}_expected"] = watch.expected
    results[f"{phase}_unexpected"] = watch.unexpected
    results[f"{phase}_kib"] = watch.bytes / 1024


async def _policy(
    n: int, server: _Server, opts: LoadgenOptions, hub: _Hub, clients: list[_Client], results: Results,
    sc: Scenario, receivers: frozenset[int],
) -> None:
    """Change the policy; time until each stream whose filter changes carried one."""
    watch = _Watch("policy", _FILTER_MARKER, expected=len(receivers), receivers=receivers)
    results["last_phase"] = "policy"
    span = _Span(server)
    watch.t0 = trio.current_time()
    hub.watch = watch
    await trio.to_thread.run_sync(server.admin, "policy.set", {"text": sc.policy_b})
    results["policy_set_ms"] = (trio.current_time() - watch.t0) * 1000
    await _wait(watch.done, opts.timeout(30, 0.02, n), "policy", lambda: len(watch.latencies), watch.expected)
    span.close(results, "policy")
    hub.watch = None
    _record_latencies(results, "policy", watch)


async def _restart(
    n: int, server: _Server, opts: LoadgenOptions, hub: _Hub, clients: list[_Client], results: Results
) -> None:
    """Stop the server, start it on the same data, wait for every client's full map."""
    results["peak_rss_mib"] = _proc_memory(server.pid)[1] / 2**20
    results["last_phase"] = "restart"
    t0 = trio.current_time()
    await trio.to_thread.run_sync(server.stop)
    results["stop_s"] = trio.current_time() - t0
    t_start = trio.current_time()
    # The round begins before the new server exists, so that no full map from the
    # old one can count; latencies are then taken from when the port accepts.
    hub.begin_round(hub.population, t_start)
    await trio.to_thread.run_sync(server.start, opts.timeout(60, 0.01, n))
    t_up = trio.current_time()
    results["server_start_s"] = t_up - t_start
    span = _Span(server)
    await _wait(hub.ready_all, opts.timeout(60, 0.05, n), "reconnect", lambda: hub.ready, hub.population)
    span.close(results, "reconnect")
    now = trio.current_time()
    results["reconnected"] = hub.ready
    results["reconnect_all_s"] = now - t_up if hub.ready >= hub.ready_target else None
    results["restart_total_s"] = now - t0 if hub.ready >= hub.ready_target else None
    shifted = [t - (t_up - t_start) for t in hub.ready_times]
    results["reconnect_p50_s"] = _sec(_pct(shifted, hub.population, 0.5))
    results["reconnect_p99_s"] = _sec(_pct(shifted, hub.population, 0.99))
    rss, peak = _proc_memory(server.pid)
    results["rss_after_restart_mib"] = rss / 2**20
    results["restart_peak_rss_mib"] = peak / 2**20


# ---------------------------------------------------------------------------
# The churn phase
# ---------------------------------------------------------------------------

#: How long a churn change may take to reach its receivers before it counts as missed.
_CHURN_TIMEOUT: Final = 30.0
#: A change stays watched this long after its last receiver, to catch late strays.
_CHURN_GRACE: Final = 0.5
_CHURN_KINDS: Final = ("join", "delete", "tag", "policy")


@dataclass(eq=False)
class _ChurnModel:
    """The tailnet as the policy engine sees it: the live clients' users and tags.

    Node ids in the compiled policy are client index + 1, with synthetic addresses
    (the scenarios name no addresses, so who sees whom does not depend on them).
    """

    users: tuple[str, ...]
    live: dict[int, tuple[str, tuple[str, ...]]]
    policy: str

    def _compiled(self, text: str, live: Mapping[int, tuple[str, tuple[str, ...]]]) -> CompiledPolicy:
        users = [PolicyUser(id=i + 1, login=name, name=name) for i, name in enumerate(self.users)]
        uid = {name: i + 1 for i, name in enumerate(self.users)}
        nodes = [
            PolicyNode(id=i + 1, name=f"sim-{i}", user_id=uid[user], tags=tags,
                       ipv4=f"100.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", ipv6=f"fd7a:115c:a1e0::{i + 1:x}")
            for i, (user, tags) in sorted(live.items())
        ]
        return compile_policy(parse_policy(text), Tailnet(users, nodes))

    def peers(self, index: int, live: Mapping[int, tuple[str, tuple[str, ...]]] | None = None) -> frozenset[int]:
        """The clients that see client ``index`` (in ``live``, default the model's)."""
        compiled = self._compiled(self.policy, self.live if live is None else live)
        return frozenset(i - 1 for i in compiled.peer_id_set(index + 1))

    def filter_changes(self, text: str) -> frozenset[int]:
        """The live clients whose packet filter changes when the policy becomes ``text``."""
        a, b = self._compiled(self.policy, self.live), self._compiled(text, self.live)
        return frozenset(i for i in self.live if a.packet_filter(i + 1) != b.packet_filter(i + 1))


def _rss_slope(samples: Sequence[tuple[float, float]], after: float) -> float | None:
    """Least-squares slope of (seconds, MiB) samples taken at or after ``after``, in
    MiB per minute (``None`` with fewer than 3 samples)."""
    pts = [(t, m) for t, m in samples if t >= after]
    if len(pts) < 3:
        return None
    mt = sum(t for t, _ in pts) / len(pts)
    mm = sum(m for _, m in pts) / len(pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    return None if var == 0 else 60 * sum((t - mt) * (m - mm) for t, m in pts) / var


async def _sample_rss(server: _Server, t0: float, samples: list[tuple[float, float]]) -> None:
    """Append (seconds since ``t0``, server RSS MiB) every second until cancelled."""
    while True:
        samples.append((trio.current_time() - t0, _proc_memory(server.pid)[0] / 2**20))
        await trio.sleep(1.0)


async def _churn(
    server: _Server, opts: LoadgenOptions, hub: _Hub, clients: list[_Client], n: int, updaters: set[int],
    nursery: trio.Nursery,
    results: Results, sc: Scenario, auth_keys: Mapping[int, str],
) -> None:
    """Steady background change for ``opts.duration`` seconds, each change timed to
    every node the policy engine says it concerns.

    The changes are made one at a time, in order (a join waits for the newcomer's own
    map, so it hears of later changes as updates); their deliveries overlap, except a
    policy edit's: it waits for the changes under way and nothing starts until it has
    reached its receivers (nearly every change also changes some packet filters, so
    a policy edit overlapping them could not tell whose filter it is).

    Clients 0 to n-1 were connected before (``clients`` here, or in ``--workers``
    processes); the newcomers run here. The sentinel (client 0) and the updaters never change.
    """
    rng = random.Random(opts.seed)
    base = len(sc.owners)
    live = {i: sc.node(i) for i in range(n)}
    model = _ChurnModel(sc.users, live, sc.policy_a)
    local = {c.index: c for c in clients}  # the clients of this process
    ids: dict[str, tuple[int, bytes]] = {}  # host name -> (node id, node key)
    done: dict[str, list[_ChurnWatch]] = {k: [] for k in _CHURN_KINDS}
    next_index = n
    busy: set[int] = set()  # targets of changes under way
    workers = hub.workers if isinstance(hub, _ParentHub) else None

    async def node_id(index: int) -> tuple[int, bytes]:
        """The server's id and the node key of client ``index`` (host name ``sim-<index>``)."""
        if f"sim-{index}" not in ids:
            listed = await trio.to_thread.run_sync(server.admin, "nodes.list", {})
            assert isinstance(listed, list)
            # The admin view shows the key's hex, the protocol its "nodekey:" form.
            ids.update({str(v["hostname"]): (int(v["id"]), b"nodekey:" + str(v["node_key"]).encode())
                        for v in listed})
        return ids[f"sim-{index}"]

    async def follow(watch: _ChurnWatch) -> None:
        with trio.move_on_after(_CHURN_TIMEOUT * opts.timeout_scale):
            await watch.done.wait()
            await trio.sleep(_CHURN_GRACE)
        hub.churn.remove(watch)
        if workers is not None:
            workers.send(("unchurn", id(watch)))
        if watch.exclude is not None:
            busy.discard(watch.exclude)
        done[watch.kind].append(watch)

    def start(watch: _ChurnWatch, watchers: trio.Nursery) -> None:
        if watch.t0 != math.inf:
            return  # a registration retried after "try again": the clock runs already
        watch.t0 = trio.current_time()
        hub.churn.append(watch)
        if workers is not None:
            workers.publish_churn(watch)
        watchers.start_soon(follow, watch)

    def candidates(tagged: bool) -> list[int]:
        return [i for i in live
                if i not in busy and i != 0 and i not in updaters
                and (i not in local or local[i].has_map.is_set()) and bool(live[i][1]) == tagged]

    async def join(watchers: trio.Nursery) -> None:
        nonlocal next_index
        index, next_index = next_index, next_index + 1
        hub.auth_keys[index] = auth_keys[index % base]
        newcomer = _Client(index, hub)
        after = {**live, index: sc.node(index)}
        receivers = await trio.to_thread.run_sync(functools.partial(model.peers, index, after))
        watch = _ChurnWatch("join", receivers & set(live), key=newcomer.marker, exclude=index)
        newcomer.on_register = lambda: start(watch, watchers)
        hub.register_target = hub.registered + 1
        busy.add(index)
        nursery.start_soon(newcomer.run)
        with trio.move_on_after(10 * opts.timeout_scale):
            await newcomer.has_map.wait()
        live[index] = sc.node(index)
        local[index] = newcomer

    async def delete(watchers: trio.Nursery) -> None:
        pool = candidates(False) + candidates(True)
        if not pool:
            return
        victim = rng.choice(pool)
        nid, _ = await node_id(victim)
        receivers = await trio.to_thread.run_sync(model.peers, victim)
        if victim in local:
            local[victim].scope.cancel()
        elif workers is not None:
            workers.send(("cancel", victim))
        del live[victim]
        busy.add(victim)
        watch = _ChurnWatch("delete", receivers, node_id=nid, exclude=victim)
        start(watch, watchers)
        await trio.to_thread.run_sync(server.admin, "nodes.delete", {"node": str(nid)})

    async def retag(watchers: trio.Nursery) -> None:
        pool = candidates(True)
        if not pool:
            return
        target = rng.choice(pool)
        user, (tag,) = live[target][0], live[target][1][:1]
        new = f"tag:svc{(int(tag.removeprefix('tag:svc')) + 1) % 20}"
        nid, key = await node_id(target)
        before = await trio.to_thread.run_sync(model.peers, target)
        live[target] = (user, (new,))
        after = await trio.to_thread.run_sync(model.peers, target)
        busy.add(target)
        watch = _ChurnWatch("tag", before | after, key=key, node_id=nid, exclude=target)
        start(watch, watchers)
        await trio.to_thread.run_sync(server.admin, "nodes.tag", {"node": str(nid), "tags": [new]})

    async def edit(watchers: trio.Nursery) -> None:
        text = sc.policy_b if model.policy == sc.policy_a else sc.policy_a
        while hub.churn:  # let the changes under way finish (or time out)
            await trio.sleep(0.05)
        receivers = await trio.to_thread.run_sync(model.filter_changes, text)
        model.policy = text
        watch = _ChurnWatch("policy", receivers)
        start(watch, watchers)
        await trio.to_thread.run_sync(server.admin, "policy.set", {"text": text})
        while watch in hub.churn:
            await trio.sleep(0.05)

    results["last_phase"] = "churn"
    samples: list[tuple[float, float]] = []
    span = _Span(server)
    t0 = trio.current_time()
    due = {"join_delete": t0 + opts.join_delete_every, "tag": t0 + opts.tag_every, "policy": t0 + opts.policy_every}
    every = {"join_delete": opts.join_delete_every, "tag": opts.tag_every, "policy": opts.policy_every}
    joining = True
    async with trio.open_nursery() as watchers:
        watchers.start_soon(_sample_rss, server, t0, samples)
        while True:
            pending = {k: t for k, t in due.items() if every[k] > 0}
            if not pending:
                break
            kind = min(pending, key=pending.__getitem__)
            if pending[kind] >= t0 + opts.duration:
                break
            await trio.sleep_until(pending[kind])
            if kind == "join_delete":
                await (join if joining else delete)(watchers)
                joining = not joining
            elif kind == "tag":
                await retag(watchers)
            else:
                await edit(watchers)
            # A late change does not make the next ones burst to catch up.
            due[kind] = max(due[kind] + every[kind], trio.current_time())
        while hub.churn:
            await trio.sleep(0.05)
        watchers.cancel_scope.cancel()
    if workers is not None:
        await workers.collect()  # their churn_bytes
    results["churn_loadgen_cpu_s"] = time.process_time() - span.own0
    results["churn_duration_s"] = span.close(results, "churn")
    after = min(60.0, opts.duration / 2)
    results["churn_rss_samples"] = len(samples)
    results["churn_rss_first_mib"] = samples[0][1] if samples else None
    results["churn_rss_last_mib"] = samples[-1][1] if samples else None
    results["churn_rss_slope_from_s"] = after
    results["churn_rss_slope_mib_per_min"] = _rss_slope(samples, after)
    changes = sum(len(w) for w in done.values())
    results["churn_changes"] = changes
    results["churn_kib_per_change"] = hub.churn_bytes / 1024 / max(changes, 1)
    everything: list[float] = []
    expected_all = 0
    for kind, watches in done.items():
        lat = [x for w in watches for x in w.latencies]
        expected = sum(len(w.receivers) for w in watches)
        everything += lat
        expected_all += expected
        results[f"churn_{kind}_count"] = len(watches)
        results[f"churn_{kind}_expected"] = expected
        results[f"churn_{kind}_reached"] = len(lat)
        results[f"churn_{kind}_unexpected"] = sum(w.unexpected for w in watches)
        results[f"churn_{kind}_p50_ms"] = _pct(lat, expected, 0.5)
        results[f"churn_{kind}_p99_ms"] = _pct(lat, expected, 0.99)
        results[f"churn_{kind}_max_ms"] = _pct(lat, expected, 1.0)
    results["churn_expected"] = expected_all
    results["churn_reached"] = len(everything)
    results["churn_unexpected"] = sum(w.unexpected for ws in done.values() for w in ws)
    results["churn_p50_ms"] = _pct(everything, expected_all, 0.5)
    results["churn_p99_ms"] = _pct(everything, expected_all, 0.99)
    results["churn_max_ms"] = _pct(everything, expected_all, 1.0)


def _cpu_lines(row: Results) -> list[str]:
    """With ``--workers``: each side's CPU per phase (nothing otherwise)."""
    if not row.get("workers"):
        return []
    lines = [f"{_num(row, 'nodes') or 0:.0f} nodes, {row['workers']} workers, {row.get('pinning', '')}"]
    for phase in ("register", "connect", "join", "policy", "reconnect", "churn"):
        wall = _num(row, f"{phase}_wall_s")
        if wall is None:
            continue
        lines.append(f"  {phase:>9}: {wall:.1f} s; CPU: server {_num(row, f'{phase}_cpu_s') or 0:.2f} s, "
                     f"workers {_num(row, f'{phase}_workers_cpu_s') or 0:.2f} s "
                     f"({_num(row, f'{phase}_workers_cpu_pct') or 0:.0f}% of a core), "
                     f"main {_num(row, f'{phase}_loadgen_cpu_pct') or 0:.0f}% of a core")
    return lines


def _churn_lines(row: Results) -> list[str]:
    """The churn phase's figures (nothing for a row without one)."""
    if "churn_changes" not in row:
        return []

    def ms(key: str) -> str:
        value = _num(row, key)
        return "t/o" if value is None else f"{value:.0f}"

    n = _num(row, "nodes") or 0
    lines = [f"churn at {n:.0f} nodes for {_num(row, 'churn_duration_s') or 0:.0f} s: "
             f"{row['churn_changes']} changes, {_num(row, 'churn_kib_per_change') or 0:.1f} KiB received per change"]
    for kind in ("all", *_CHURN_KINDS):
        p = "churn" if kind == "all" else f"churn_{kind}"
        count = "" if kind == "all" else f"{row[f'{p}_count']:>4} changes, "
        lines.append(f"  {kind:>6}: {count}{row[f'{p}_reached']}/{row[f'{p}_expected']} receivers reached, "
                     f"p50 {ms(f'{p}_p50_ms')} ms, p99 {ms(f'{p}_p99_ms')} ms, max {ms(f'{p}_max_ms')} ms, "
                     f"{row[f'{p}_unexpected']} unexpected")
    lines.append(f"  CPU: server {_num(row, 'churn_cpu_s') or 0:.2f} s, "
                 f"load generator {_num(row, 'churn_loadgen_cpu_s') or 0:.2f} s"
                 + (f" + workers {_num(row, 'churn_workers_cpu_s') or 0:.2f} s" if row.get("workers") else ""))
    slope = _num(row, "churn_rss_slope_mib_per_min")
    lines.append(f"  server RSS {_num(row, 'churn_rss_first_mib') or 0:.0f} -> {_num(row, 'churn_rss_last_mib') or 0:.0f}"
                 f" MiB; slope after {_num(row, 'churn_rss_slope_from_s') or 0:.0f} s: "
                 + ("n/a (too few samples)" if slope is None else f"{slope:+.2f} MiB/min"))
    return lines


# ---------------------------------------------------------------------------
# Output and command line
# ---------------------------------------------------------------------------

_COLUMNS: Final = [
    ("nodes", "nodes", "{:.0f}"),
    ("classes", "classes", "{:.0f}"),
    ("peers_avg", "peers avg", "{:.0f}"),
    ("peers_median", "med", "{:.0f}"),
    ("peers_max", "max", "{:.0f}"),
    ("register_all_s", "reg s", "{:.1f}"),
    ("connect_all_s", "connect s", "{:.1f}"),
    ("mem_per_node_kib", "KiB/node", "{:.1f}"),
    ("peak_rss_mib", "peak MiB", "{:.0f}"),
    ("register_ms", "register ms", "{:.0f}"),
    ("join_p50_ms", "join p50 ms", "{:.0f}"),
    ("join_p99_ms", "join p99 ms", "{:.0f}"),
    ("join_cpu_s", "join CPU s", "{:.3f}"),
    ("join_loadgen_cpu_pct", "lg %", "{:.0f}"),
    ("join_expected", "join rcv", "{:.0f}"),
    ("join_kib", "join KiB", "{:.0f}"),
    ("policy_p50_ms", "policy p50 ms", "{:.0f}"),
    ("policy_p99_ms", "policy p99 ms", "{:.0f}"),
    ("policy_cpu_s", "policy CPU s", "{:.3f}"),
    ("policy_loadgen_cpu_pct", "lg %", "{:.0f}"),
    ("policy_expected", "policy rcv", "{:.0f}"),
    ("policy_kib", "policy KiB", "{:.0f}"),
    ("server_start_s", "start s", "{:.1f}"),
    ("reconnect_all_s", "reconnect s", "{:.1f}"),
]

#: Issue 7's targets (meant for 5,000 nodes on 2 cores): key, limit, label.
_TARGETS: Final = [
    ("join_p99_ms", 2000.0, "a join reaches all within 2 s (p99)"),
    ("policy_p99_ms", 5000.0, "a policy change reaches all within 5 s (p99)"),
    ("mem_per_node_kib", 20.0, "under 20 KiB of server memory per idle node"),
    ("restart_total_s", 60.0, "all reconnected within 60 s of a restart"),
    ("register_ms", 200.0, "registering one more node answers within 200 ms"),
]


def _cell(row: Results, key: str, fmt: str) -> str:
    if key not in row:
        return "-"
    value = row[key]
    if value is None:
        return "t/o"
    assert isinstance(value, int | float)
    return fmt.format(value)


def format_table(rows: Sequence[Results]) -> str:
    """The figures as an aligned text table, one row per tailnet size."""
    head = [h for _, h, _ in _COLUMNS]
    body = [[_cell(r, k, fmt) for k, _, fmt in _COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *body])


def _num(row: Results, key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) else None


def _curve(rows: Sequence[Results]) -> list[str]:
    """How CPU per change grows with the tailnet, against linear and quadratic."""
    lines: list[str] = []
    base = rows[0]
    for r in rows[1:]:
        scale = (_num(r, "nodes") or 0) / (_num(base, "nodes") or 1)
        for key, what in (("join_cpu_s", "join"), ("policy_cpu_s", "policy")):
            a, b = _num(base, key), _num(r, key)
            if a and b is not None:
                lines.append(
                    f"{what} CPU x{b / a:.1f} for x{scale:.0f} nodes "
                    f"(linear would be x{scale:.0f}, quadratic x{scale * scale:.0f})"
                )
    return lines


def _warnings(row: Results) -> list[str]:
    """What makes a row's figures incomplete or suspect."""
    n = _num(row, "nodes") or 0
    out: list[str] = []
    for key, what in (("registered", "registered"), ("connected", "connected"),
                      ("join_reached", "saw the join"), ("policy_reached", "got the new filter"),
                      ("reconnected", "reconnected")):
        got = _num(row, key)
        want = n + 1 if key == "reconnected" and "join_reached" in row else n
        if key in ("join_reached", "policy_reached"):
            want = _num(row, key.replace("reached", "expected")) or 0
        if got is not None and got < want:
            out.append(f"{n:.0f} nodes: only {got:.0f} of {want:.0f} {what} before the timeout")
    for phase in ("connect", "join", "policy", "reconnect"):
        busy, wall = _num(row, f"{phase}_loadgen_cpu_pct"), _num(row, f"{phase}_wall_s")
        if busy is not None and busy > 90 and (wall or 0) >= 1:  # a blip is no saturation
            out.append(f"{n:.0f} nodes: the load generator was {busy:.0f}% busy during {phase}; "
                       "its figures are upper bounds")
    if row.get("aborted"):
        out.append(f"{n:.0f} nodes: aborted: {row['aborted']}")
    if row.get("churn_unexpected"):
        out.append(f"{n:.0f} nodes: {row['churn_unexpected']} nodes got a churn change although the policy "
                   "says it does not concern them")
    if _num(row, "churn_reached") is not None and (_num(row, "churn_reached") or 0) < (_num(row, "churn_expected") or 0):
        out.append(f"{n:.0f} nodes: churn changes reached only {row['churn_reached']} of "
                   f"{row['churn_expected']} receivers in time")
    for phase in ("join", "policy"):
        if row.get(f"{phase}_unexpected"):
            out.append(f"{n:.0f} nodes: {row[f'{phase}_unexpected']} nodes got the {phase} change although "
                       "the policy says it does not concern them")
    if row.get("marker_mismatches"):
        out.append(f"{n:.0f} nodes: byte search and full decode disagreed {row['marker_mismatches']} times")
    return out


def _targets(row: Results) -> list[str]:
    """Issue 7's targets against one row, ok or FAIL each."""
    lines = [f"targets (issue 7; meant for 5,000 nodes on 2 cores), at {_num(row, 'nodes') or 0:.0f} nodes:"]
    for key, limit, label in _TARGETS:
        if key not in row:
            continue
        value = _num(row, key)
        mark = "FAIL (timed out)" if value is None else ("ok" if value <= limit else "FAIL")
        shown = "-" if value is None else f"{value:.1f}"
        lines.append(f"  {mark:>4}  {label} ({key} = {shown})")
    return lines


def _parse_phases(text: str) -> frozenset[str]:
    """``--phases``: comma-separated names from :data:`PHASES` (register and connect
    are accepted and ignored: they always run)."""
    names = {p.strip() for p in text.split(",") if p.strip()}
    unknown = names - set(PHASES) - {"register", "connect"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown phase(s): {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    return frozenset(names & set(PHASES))


def _parse_interval(text: str) -> tuple[float, float]:
    """``--update-interval``: ``LOW,HIGH`` seconds (or one number for both)."""
    try:
        lo, _, hi = text.partition(",")
        low, high = float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError("use LOW,HIGH in seconds, e.g. 20,40") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError("need 0 < LOW <= HIGH")
    return low, high


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def build_parser(*, add_help: bool = True) -> argparse.ArgumentParser:
    """The options of ``tailledger loadgen`` (also ``python -m cli.bench.loadgen``; the
    ``tailledger`` command includes them as a parent parser, without ``-h``)."""
    parser = argparse.ArgumentParser(
        prog="tailledger loadgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
    )
    parser.add_argument("--nodes", default="100,1000", help="comma-separated tailnet sizes (e.g. 100,1000,5000)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="flat",
                        help="the tailnet's shape: flat (one user, allow-all) or corp (segmented; see "
                             "cli/bench/scenarios.py), or churn: corp under steady change for --duration "
                             "(instead of the join, policy and restart phases); default flat")
    parser.add_argument("--duration", type=_positive, default=30.0,
                        help="churn: seconds of background change (default 30)")
    parser.add_argument("--join-delete-every", type=_non_negative, default=1.0, metavar="S",
                        help="churn: a join or a delete (alternately) every S seconds (default 1; 0 = none)")
    parser.add_argument("--tag-every", type=_non_negative, default=10.0, metavar="S",
                        help="churn: a tagged node's tag changes every S seconds (default 10; 0 = none)")
    parser.add_argument("--policy-every", type=_non_negative, default=60.0, metavar="S",
                        help="churn: the policy is edited every S seconds (default 60; 0 = none)")
    parser.add_argument("--seed", type=int, default=19, help="churn: seeds which nodes change (default 19)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="run the simulated clients in N worker processes, pinned apart from the "
                             "server when the machine has 3 or more cores; each side's CPU is reported "
                             "(default 0: all clients in this process)")
    parser.add_argument("--json", default="loadgen-results.json", help="where to write the figures ('' = nowhere)")
    parser.add_argument("--phases", type=_parse_phases, default=frozenset(PHASES),
                        help=f"comma-separated phases after register+connect (default {','.join(PHASES)})")
    parser.add_argument("--updaters", type=int, default=None,
                        help="clients sending endpoint updates (default min(N/10, 20); 0 = none)")
    parser.add_argument("--update-interval", type=_parse_interval, default=(20.0, 40.0), metavar="LOW,HIGH",
                        help="seconds between one updater's endpoint updates (default 20,40)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="map streams being opened at once during the ramp (default 64)")
    parser.add_argument("--register-concurrency", type=int, default=4,
                        help="registrations in flight at once (default 4)")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every phase timeout (they already grow with N)")
    parser.add_argument("--max-server-rss", type=int, default=0, metavar="MIB",
                        help="abort when the server's RSS passes this (default: only when the "
                             "machine runs short of memory)")
    return parser


def _raise_fd_limit(n: int) -> None:
    """Each client holds one socket; make sure this process (and the server, which
    inherits the limit) may open them all."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * n + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def loadgen_main(argv: list[str], args: argparse.Namespace | None = None) -> int:
    """Run ``tailledger loadgen`` with ``argv`` (or options already parsed by
    :func:`build_parser`); return the exit status."""
    if args is None:
        args = build_parser().parse_args(argv)
    try:
        sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        print("tailledger loadgen: --nodes takes comma-separated integers", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 1:
        print("tailledger loadgen: --nodes needs sizes >= 1", file=sys.stderr)
        return 2
    if args.workers < 0:
        print("tailledger loadgen: --workers needs N >= 0", file=sys.stderr)
        return 2
    options = LoadgenOptions(
        phases=args.phases, updaters=args.updaters, update_interval=args.update_interval,
        concurrency=max(1, args.concurrency),
        register_concurrency=max(1, args.register_concurrency), timeout_scale=args.timeout_scale,
        max_server_rss=max(0, args.max_server_rss) * 2**20, scenario=args.scenario,
        duration=args.duration, join_delete_every=args.join_delete_every, tag_every=args.tag_every,
        policy_every=args.policy_every, seed=args.seed, workers=args.workers,
    )
    _raise_fd_limit(max(sizes))
    rows: list[Results] = []
    with tempfile.TemporaryDirectory(prefix="tailledger-loadgen-") as tmp:
        for n in sizes:
            print(f"# {n} simulated nodes, {options.scenario} ...", flush=True)
            try:
                # With workers, times taken in several processes are compared: one clock.
                clock = _SharedClock() if options.workers else None
                rows.append(trio.run(measure, n, Path(tmp), options, clock=clock))
            except RuntimeError as exc:
                print(f"tailledger loadgen: {exc}", file=sys.stderr)
                return 1
            print(format_table(rows[-1:]), flush=True)
    print()
    print(format_table(rows))
    for line in _curve(rows):
        print(line)
    for row in rows:
        for line in (*_churn_lines(row), *_cpu_lines(row)):
            print(line)
    if options.scenario != "churn":
        for line in _targets(rows[-1]):
            print(line)
    for row in rows:
        for line in _warnings(row):
            print(f"warning: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"figures written to {args.json}")
    return 1 if any(row.get("aborted") for row in rows) else 0
