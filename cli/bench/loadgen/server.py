"""The server under test: a ``tailledger serve`` child, and what is read of it.

Theory of operation
-------------------
:class:`Server` runs ``tailledger serve`` (through :mod:`cli.spawn`) on a scratch
data directory with the limits that would otherwise measure the load generator
(tunnel idle and slow-reader timeouts) lifted, and talks to it through its admin
socket. Everything measured of it comes from ``/proc``: CPU seconds, RSS and peak RSS
(:func:`proc_memory`). A :class:`Span` takes wall time, server CPU, the load
generator's own CPU and the workers' CPU over one phase; :func:`settle` waits until
the server is idle; :func:`memory_guard` kills it (and ends the run, ``aborted``)
before it takes the shared machine's memory.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from ...adminsock import call
from ...spawn import spawn_serve, wait_ready
from ...spawn import stop as stop_server
from .options import LoadgenOptions, Results

__all__ = ["Server", "Span", "memory_guard", "pids_cpu", "proc_cpu", "proc_memory", "settle"]


#: The memory guard kills the server when less than this share of the machine's
#: memory is available.
_MIN_AVAILABLE: Final = 0.10


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_waits(pid: int) -> dict[int, float] | None:
    """Per thread of ``pid``, the seconds it spent runnable but waiting for a CPU (the
    second field of ``/proc/<pid>/task/<tid>/schedstat``); ``None`` without schedstats.
    A process that waits far longer than it runs is held back by the machine's other
    load, not by anything inside it."""
    waits: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                waits[int(task.name)] = int((task / "schedstat").read_text().split()[1]) / 1e9
    return waits or None


def proc_cpu_wait(pid: int) -> float | None:
    """The seconds all present threads of ``pid`` waited for a CPU (see
    :func:`thread_cpu_waits`); ``None`` without schedstats."""
    waits = thread_cpu_waits(pid)
    return None if waits is None else sum(waits.values())


def waited_between(before: dict[int, float], after: dict[int, float]) -> float:
    """The wait for a CPU between two :func:`thread_cpu_waits` readings, thread by
    thread: a thread that ended in between (trio's idle worker threads do) took its
    total with it, and a difference of sums would come out short, even negative; this
    counts the threads present at the end (a new one from zero) and leaves out only
    what an ended thread waited during the phase."""
    return sum(max(0.0, wait - before.get(tid, 0.0)) for tid, wait in after.items())


def proc_memory(pid: int) -> tuple[int, int]:
    """(RSS, peak RSS) of ``pid`` in bytes, from ``VmRSS`` and ``VmHWM``."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024  # kB
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def pids_cpu(pids: Sequence[int]) -> float:
    """CPU seconds of the (live) processes ``pids`` together."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += proc_cpu(pid)
    return total


@dataclass
class Server:
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
    #: Settings of this run (``TAILLEDGER_*`` variables) over the defaults below: the
    #: database of replicas and their shared signing key, for instance.
    extra_env: dict[str, str] = field(default_factory=dict)

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
        env.update(self.extra_env)
        return env

    @property
    def log(self) -> Path:
        """The server's output (appended to across restarts)."""
        return self.data.parent / f"{self.data.name}-server.log"

    def start(self, timeout: float) -> None:
        """Start the server and wait until its port accepts connections (blocking)."""
        self.proc = spawn_serve(self.env, self.log)
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        wait_ready(self.proc, self.log, timeout=timeout, port=self.port)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s (blocking)."""
        if self.proc is not None:
            stop_server(self.proc, 30)

    def admin(self, op: str, args: Mapping[str, object] | None = None) -> object:
        """One admin-socket operation (blocking)."""
        return call(self.data / "admin.sock", op, dict(args) if args is not None else None)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Span:
    """Wall time, server CPU and load-generator CPU over one phase."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.t0 = trio.current_time()
        self.cpu0 = proc_cpu(server.pid)
        self.wait0 = thread_cpu_waits(server.pid)
        self.own0 = time.process_time()
        self.workers0 = pids_cpu(server.worker_pids)

    def close(self, results: Results, phase: str, *, wall_key: str | None = None) -> float:
        wall = trio.current_time() - self.t0
        results[f"{phase}_wall_s"] = wall
        results[f"{phase}_cpu_s"] = proc_cpu(self.server.pid) - self.cpu0
        waits = thread_cpu_waits(self.server.pid)
        if waits is not None and self.wait0 is not None:
            results[f"{phase}_cpu_wait_s"] = waited_between(self.wait0, waits)
        results[f"{phase}_loadgen_cpu_pct"] = 100 * (time.process_time() - self.own0) / max(wall, 1e-9)
        if self.server.worker_pids:
            # --workers: the clients' processes (together; % of one core), besides this one.
            busy = pids_cpu(self.server.worker_pids) - self.workers0
            results[f"{phase}_workers_cpu_s"] = busy
            results[f"{phase}_workers_cpu_pct"] = 100 * busy / max(wall, 1e-9)
        if wall_key:
            results[wall_key] = wall
        return wall


async def settle(server: Server, *, min_s: float, max_s: float, idle_pct: float = 20.0) -> tuple[float, float]:
    """Wait until the server's CPU use over the last second is below ``idle_pct``.

    Returns (seconds waited, CPU % of the last one-second window).
    """
    t0 = trio.current_time()
    last_t, last_cpu = t0, proc_cpu(server.pid)
    while True:
        await trio.sleep(1.0)
        now, cpu = trio.current_time(), proc_cpu(server.pid)
        pct = 100 * (cpu - last_cpu) / max(now - last_t, 1e-9)
        last_t, last_cpu = now, cpu
        if (now - t0 >= min_s and pct < idle_pct) or now - t0 >= max_s:
            return now - t0, pct


def _meminfo() -> tuple[int, int]:
    """(MemTotal, MemAvailable) of the machine in bytes."""
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemAvailable"):
            values[name] = int(rest.split()[0]) * 1024
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


async def memory_guard(server: Server, opts: LoadgenOptions, results: Results, scope: trio.CancelScope) -> None:
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
            rss, _ = proc_memory(proc.pid)
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
