"""``--workers``: the simulated clients in several processes.

Theory of operation
-------------------
Client *i* runs in worker *i* mod W (a ``spawn`` process with its own trio run);
the join phase's newcomer, the churn phase's newcomers and all the orchestration stay
in the parent. Parent and workers talk over one pipe each, in tuples:

* parent to worker: ``register``, ``go``, ``unslot`` (the phases' steps),
  ``round``, ``watch``/``unwatch``, ``churn``/``unchurn`` (what is being timed),
  ``cancel`` (a churn delete), ``stats``, ``gaps`` (a span's frame gaps, see
  :meth:`Workers.frame_gaps`), ``stop``;
* worker to parent: ``up``, ``registered``, ``ready``, ``hit``, ``unexpected``,
  ``bytes``, ``churned`` (a churn change is watched here now), ``offer`` (a churn
  change's delivery: the parent knows the receivers and judges), ``stats``
  (counters since the last answer), ``gaps``, ``fatal``.

A churn change is made only once every worker has answered ``churned``
(:meth:`Workers.publish_churn`): a worker slow to read its pipe would otherwise get
the change's update on its clients' streams before the ``churn`` message, and its
receivers would never be offered it (counted missing, though the server sent it).

A worker's :class:`Hub` and watches (``_WorkerHub``, :class:`RemoteWatch`,
``_RemoteChurnWatch``) forward what they count instead of counting it; the parent's
:class:`ParentHub` tells the workers of every new round and watch. Every process
reads one clock (:class:`SharedClock`: ``time.monotonic``), so latencies span them.
With 3 or more cores, :func:`pin` puts the server on the first half and the load
generator with its workers on the rest.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing
import multiprocessing.process
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

import trio

from ...gcpolicy import manage_gc
from .client import ChurnWatch, Client, FatalClientError, Hub, Watch
from .options import LoadgenOptions, Results
from .scanner import make_decompressor
from .server import Server

__all__ = ["ParentHub", "RemoteWatch", "SharedClock", "Workers", "pin"]


class SharedClock(trio.abc.Clock):
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
class _WorkerHub(Hub):
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


class RemoteWatch(Watch):
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


class _RemoteChurnWatch(ChurnWatch):
    """A worker's copy of a churn change: whoever gets it is reported to the parent,
    which knows the receivers."""

    serial: int = 0
    conn: Connection | None = None

    def offer(self, index: int, now: float, size: int) -> None:
        if index not in self.seen:
            self.seen.add(index)
            assert self.conn is not None
            self.conn.send(("offer", self.serial, index, now, size))


def _worker_main(conn: Connection, spec: _WorkerSpec) -> None:
    """A worker process: run ``spec``'s clients until the parent says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    try:
        trio.run(_worker, conn, spec, clock=SharedClock())
    except* FatalClientError as group:
        conn.send(("fatal", str(group.exceptions[0])))


async def _worker(conn: Connection, spec: _WorkerSpec) -> None:
    hub = _WorkerHub(
        port=spec.port, auth_key=spec.auth_keys[spec.indexes[0]] if spec.indexes else "", auth_keys=spec.auth_keys,
        server_key=spec.server_key, decompress=make_decompressor(), update_interval=spec.update_interval,
        register_slots=trio.Semaphore(spec.register_concurrency), connect_slots=trio.Semaphore(spec.concurrency),
        conn=conn,
    )
    clients = [Client(i, hub, updater=i in spec.updaters, sentinel=i == 0) for i in spec.indexes]
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
                watch = RemoteWatch(kind, marker, expected, exclude=exclude, receivers=receivers, t0=t0)
                watch.serial, watch.conn = serial, conn
                hub.watch = watch
            elif op == "unwatch":
                hub.watch = None
            elif op == "churn":
                _, serial, kind, key, node_id = msg
                churn = _RemoteChurnWatch(kind, frozenset({-1}), key=key, node_id=node_id)
                churn.serial, churn.conn = serial, conn
                hub.churn.append(churn)
                conn.send(("churned", serial))
            elif op == "unchurn":
                hub.churn = [w for w in hub.churn if not (isinstance(w, _RemoteChurnWatch) and w.serial == msg[1])]
            elif op == "cancel":
                for c in clients:
                    if c.index == msg[1]:
                        c.scope.cancel()
            elif op == "gaps":  # ("gaps", t0, None): start a span; ("gaps", None, t1): end it
                _, t0, t1 = msg
                if t0 is not None:
                    for c in clients:
                        c.last_frame_at, c.max_frame_gap = t0, 0.0
                else:
                    conn.send(("gaps", [max(c.max_frame_gap, t1 - c.last_frame_at)
                                        for c in clients if c.last_frame_at is not None]))
            elif op == "stats":
                now = {k: getattr(hub, k) for k in _STAT_SUMS}
                conn.send(("stats", {k: now[k] - sent[k] for k in _STAT_SUMS}, hub.full_map_max,
                           hub.full_map_json, hub.full_map_peers, dict(hub.errors - errors_sent)))
                sent, errors_sent = now, Counter(hub.errors)
        nursery.cancel_scope.cancel()


class ParentHub(Hub):
    """The hub of a ``--workers`` run, in the parent: it counts what the workers
    report, and tells them of every new round and watch."""

    workers: Workers | None = None
    _watch: Watch | None = None

    @property
    def watch(self) -> Watch | None:
        return self._watch

    @watch.setter
    def watch(self, value: Watch | None) -> None:
        self._watch = value
        if self.workers is not None:
            self.workers.publish(value)

    def begin_round(self, target: int, t0: float) -> None:
        super().begin_round(target, t0)
        if self.workers is not None:
            self.workers.send(("round", self.round))


class Workers:
    """The worker processes of a ``--workers`` run, seen from the parent.

    Client *i* runs in worker *i* mod W; the join phase's newcomer runs here. The
    ramp limits (``--concurrency``, ``--register-concurrency``) are split among the
    workers (at least 1 each).
    """

    def __init__(self, opts: LoadgenOptions, hub: ParentHub, server: Server, updaters: set[int]) -> None:
        self.opts = opts
        self.hub = hub
        self.server = server
        self.updaters = frozenset(updaters)
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.watches: dict[int, Watch] = {}
        self.churn: dict[int, ChurnWatch] = {}
        #: per churn change being installed: the workers yet to answer, and its event
        self._installing: dict[int, tuple[int, trio.Event]] = {}
        self.stopping = False
        self._up = 0
        self._all_up = trio.Event()
        self._stats_pending = 0
        self._stats_done = trio.Event()
        self._gaps: list[float] = []
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
            raise FatalClientError("the load-generator workers did not start")

    def send(self, msg: tuple[object, ...]) -> None:
        for conn in self.conns:
            conn.send(msg)

    def publish(self, watch: Watch | None) -> None:
        """Install ``watch`` (or none) in every worker."""
        if watch is None:
            self.send(("unwatch",))
            return
        serial = len(self.watches) + 1
        self.watches[serial] = watch
        self.send(("watch", serial, watch.kind, watch.marker, watch.expected, watch.exclude,
                   watch.receivers, watch.t0))

    async def publish_churn(self, watch: ChurnWatch) -> None:
        """Install a churn change in every worker (``("unchurn", id(watch))`` ends it),
        and return once every worker watches for it: only then may the change be made.

        Raises:
            FatalClientError: a worker did not answer within 30 s (times the scale).
        """
        self.churn[id(watch)] = watch
        if not self.conns:
            return
        installed = trio.Event()
        self._installing[id(watch)] = (len(self.conns), installed)
        self.send(("churn", id(watch), watch.kind, watch.key, watch.node_id))
        with trio.move_on_after(30 * self.opts.timeout_scale):
            await installed.wait()
        self._installing.pop(id(watch), None)
        if not installed.is_set():
            raise FatalClientError("a load-generator worker did not take up a churn change")

    async def collect(self) -> None:
        """Fold the workers' counters (keep-alives, full-map sizes, errors, ...) into
        the hub: each answer carries what changed since the last one."""
        self._stats_pending = len(self.conns)
        self._stats_done = trio.Event()
        self.send(("stats",))
        with trio.move_on_after(30 * self.opts.timeout_scale):
            await self._stats_done.wait()

    def start_frame_gaps(self, t0: float) -> None:
        """Start a span at ``t0`` over which every client's longest wait between two
        frames of its map stream is taken (see :meth:`frame_gaps`)."""
        self.send(("gaps", t0, None))

    async def frame_gaps(self, t1: float) -> list[float]:
        """End the span begun by :meth:`start_frame_gaps` at ``t1``: each streaming
        client's longest wait between two frames (or since its last one), sorted."""
        self._gaps = []
        self._stats_pending = len(self.conns)
        self._stats_done = trio.Event()
        self.send(("gaps", None, t1))
        with trio.move_on_after(30 * self.opts.timeout_scale):
            await self._stats_done.wait()
        return sorted(self._gaps)

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
            elif op == "churned":
                left, installed = self._installing.get(msg[1], (0, None))
                if installed is not None:
                    self._installing[msg[1]] = (left - 1, installed)
                    if left <= 1:
                        installed.set()
            elif op == "offer":
                self.churn[msg[1]].offer(msg[2], msg[3], msg[4])
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
                self._answered()
            elif op == "gaps":
                self._gaps.extend(msg[1])
                self._answered()
            elif op == "fatal":
                raise FatalClientError(msg[1])
        if not self.stopping:
            raise FatalClientError("a load-generator worker exited")

    def _answered(self) -> None:
        """One worker answered a ``stats`` or ``gaps`` request."""
        self._stats_pending -= 1
        if self._stats_pending <= 0:
            self._stats_done.set()

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


def pin(server: Server, workers: int) -> str:
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
