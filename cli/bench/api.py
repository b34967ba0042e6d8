"""``tailledger bench api``: how fast the admin API lists a large tailnet.

Writes a tailnet of ``--nodes`` nodes (default 5,000, over 50 users) into a fresh data
directory through the real commands and the real log, starts ``tailledger serve`` on it
as its own process, makes an API key with the CLI, and asks for the device list
(``GET /api/v2/tailnet/-/devices`` and ``GET /api/v1/node``) over HTTP: one client after
another for latency (p50, p99), then ``--clients`` at once for throughput. The target
of issue 17 is a p99 below 300 ms for 5,000 nodes.

With ``--streams`` (default 5,000) the tailnet's nodes are (up to that many) simulated
clients of the load generator (``cli/bench/loadgen``: the real protocol, a zstd map
long-poll each): it measures once they registered, before any stream is open, then
again once every one streams its map, sequential and concurrent, and watches
every stream meanwhile: a client that waited longer than 1.5 keep-alive intervals
(``--keepalive``, shortened so that the API load spans several) between two frames
missed a keep-alive. The clients run in this process (one trio thread) and the API
requests in threads beside them, so the figures include the load generator's own
load on two shared cores. ``--streams 0``: no simulated clients, no second run.

It prints figures and never fails on timing.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from eventlog import Actor, ActorKind, AppendRequest, SQLiteEventStore, to_micros
from projections import AddressPlan, TailnetState, apply
from projections import commands as c
from projections.ipam import DEFAULT_V4, DEFAULT_V6

from ..spawn import child_env, free_port, spawn_serve, stop, tailledger_argv, wait_ready

__all__ = ["bench_api_main", "write_tailnet"]


def write_tailnet(db: Path, nodes: int, users: int = 50, *, seed: int = 0) -> None:
    """A tailnet of ``users`` users and ``nodes`` nodes, decided by the real commands
    and appended to a new log at ``db``."""
    rnd = random.Random(seed)
    store = SQLiteEventStore(db, synchronous="OFF")  # a throw-away log: no fsync per node
    actor = Actor(kind=ActorKind.SYSTEM, id="bench")
    state = TailnetState()
    plan = AddressPlan(DEFAULT_V4, DEFAULT_V6)
    now = datetime.now(UTC)

    def run(decision: c.Decision[int]) -> None:
        nonlocal state
        [recorded] = store.append_batch(
            [AppendRequest(events=decision.events, actor=actor, expected_seq=state.seq)], to_micros(now)
        )
        assert isinstance(recorded, tuple)
        for event in recorded:
            state, _ = apply(state, event)

    try:
        for u in range(users):
            run(c.decide_create_user(state, f"user{u}"))
        for n in range(nodes):
            run(c.decide_register_node(
                state, machine_key=f"{rnd.getrandbits(256):064x}", node_key=f"{rnd.getrandbits(256):064x}",
                hostname=f"host-{n}", user_id=1 + n % users, tags=(), ephemeral=False, expiry=None,
                auth="preauthkey", preauth_key=None, plan=plan, os="linux",
            ))
    finally:
        store.close()


@dataclass(frozen=True)
class _Target:
    base: str
    headers: dict[str, str]


def _latency(t: _Target, path: str, requests: int) -> tuple[list[float], int]:
    """``requests`` sequential GETs of ``path``: their times (ms, sorted) and the size."""
    import httpx

    with httpx.Client(base_url=t.base, headers=t.headers, timeout=60) as http:
        size = len(http.get(path).content)  # warm-up
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            response = http.get(path)
            times.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
    times.sort()
    return times, size


def _throughput(t: _Target, clients: int, seconds: float) -> tuple[int, float]:
    """Device lists by ``clients`` threads at once for ``seconds``: (count, elapsed)."""
    import httpx

    count = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(base_url=t.base, headers=t.headers, timeout=60) as http:
            while time.monotonic() < stop:
                http.get("/api/v2/tailnet/-/devices").raise_for_status()
                with lock:
                    count[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return count[0], time.perf_counter() - started


def _print_latency(label: str, times: list[float], size: int) -> None:
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"{label:44} {statistics.median(times):8.1f} {p99:8.1f} {times[-1]:8.1f} {size:10d}")


def _api_load(t: _Target, args: argparse.Namespace, seconds: float) -> None:
    """The API load of a run: sequential latency, then concurrent throughput."""
    for path in ("/api/v2/tailnet/-/devices", "/api/v1/node"):
        times, size = _latency(t, path, args.requests)
        _print_latency(path, times, size)
    count, elapsed = _throughput(t, args.clients, seconds)
    print(f"device list, {args.clients} clients at once: {count / elapsed:.1f} requests/s "
          f"({count} in {elapsed:.1f} s)")


async def _under_streams(data: Path, port: int, t: _Target, args: argparse.Namespace) -> None:
    """Connect ``args.streams`` simulated clients, then run the API load while every
    stream is watched for a missed keep-alive."""
    import gc

    import trio

    from protocol import fetch_server_key

    from ..adminsock import call
    from .loadgen.client import Client, Hub
    from .loadgen.scanner import make_decompressor

    n = args.streams
    key_args: dict[str, object] = {"user": "user0", "reusable": True, "expiration_seconds": None}
    created = await trio.to_thread.run_sync(call, data / "admin.sock", "preauthkeys.create", key_args)
    assert isinstance(created, dict)
    hub = Hub(
        port=port, auth_key=str(created["key"]), server_key=await fetch_server_key("127.0.0.1", port),
        decompress=make_decompressor(), update_interval=(1e9, 1e9),
        register_slots=trio.Semaphore(4), connect_slots=trio.Semaphore(100), register_target=n,
    )
    clients = [Client(i, hub) for i in range(n)]
    async with trio.open_nursery() as nursery:
        started = time.perf_counter()
        for client in clients:
            nursery.start_soon(client.run)
        with trio.fail_after(60 + 0.2 * n):
            await hub.registered_all.wait()
        print(f"{n} simulated clients registered in {time.perf_counter() - started:.1f} s")
        print(f"with no map stream ({max(args.nodes, n)} nodes):")
        await trio.to_thread.run_sync(_api_load, t, args, args.seconds)
        started = time.perf_counter()
        hub.begin_round(n, trio.current_time())
        hub.streams_go.set()
        with trio.fail_after(60 + 0.2 * n):
            await hub.ready_all.wait()
        hub.connect_slots = None
        gc.freeze()  # the clients' long-lived objects
        print(f"{n} map streams connected in {time.perf_counter() - started:.1f} s")
        errors0, keepalives0 = sum(hub.errors.values()), hub.keepalives
        t0 = trio.current_time()
        for client in clients:
            client.last_frame_at, client.max_frame_gap = t0, 0.0
        print(f"with {n} map streams open:")
        seconds = max(args.seconds, 3 * args.keepalive)  # the load spans several keep-alives
        await trio.to_thread.run_sync(_api_load, t, args, seconds)
        t1 = trio.current_time()
        gaps = sorted(
            max(c.max_frame_gap, t1 - c.last_frame_at) for c in clients if c.last_frame_at is not None
        )
        nursery.cancel_scope.cancel()
    limit = 1.5 * args.keepalive
    missed = sum(1 for g in gaps if g > limit)
    print(f"streams during the API load ({t1 - t0:.1f} s, keep-alive every {args.keepalive:g} s): "
          f"{hub.keepalives - keepalives0} keep-alives received, longest wait between frames "
          f"{gaps[-1] if gaps else float('nan'):.1f} s (p99 {gaps[int(len(gaps) * 0.99)] if gaps else float('nan'):.1f} s), "
          f"{missed} of {n} clients waited over {limit:g} s (missed a keep-alive), "
          f"{sum(hub.errors.values()) - errors0} stream errors")


def bench_api_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tailledger bench api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000,
                        help="nodes in the tailnet, the streamed clients included (default 5000)")
    parser.add_argument("--requests", type=int, default=100, help="sequential requests per endpoint")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for the throughput run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the throughput run")
    parser.add_argument("--streams", type=int, default=5000,
                        help="map streams connected for the second run (default 5000; 0: none)")
    parser.add_argument("--keepalive", type=float, default=5.0,
                        help="the server's map keep-alive interval for this run, seconds (default 5)")
    args = parser.parse_args(argv)
    if args.streams < 0 or args.nodes < 0 or args.keepalive <= 0:
        parser.error("--nodes and --streams must not be negative, --keepalive must be positive")

    with tempfile.TemporaryDirectory(prefix="tailledger-bench-api-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir(mode=0o700)
        written = max(args.nodes - args.streams, 0)
        t = time.perf_counter()
        write_tailnet(data / "ledger.db", written)
        print(f"wrote a tailnet of {written} nodes in {time.perf_counter() - t:.1f} s")
        if args.streams:
            from .loadgen.client import raise_fd_limit

            raise_fd_limit(args.streams)
        port = free_port()
        env = {
            **os.environ, "TAILLEDGER_DATA": str(data), "TAILLEDGER_LISTEN_ADDR": f"127.0.0.1:{port}",
            "TAILLEDGER_METRICS_LISTEN_ADDR": "",
            "TAILLEDGER_TUNING__MAP_KEEPALIVE_INTERVAL": f"{args.keepalive:g}s",
            # As for tailledger loadgen: thousands of simulated clients share the cores
            # with the server, so the idle and slow-reader limits would measure them.
            "TAILLEDGER_LIMITS__TUNNEL_IDLE_TIMEOUT": "24h",
            "TAILLEDGER_LIMITS__WRITE_TIMEOUT": "10m",
        }
        log = Path(tmp) / "serve.log"
        proc = spawn_serve(env, log)
        try:
            try:
                wait_ready(proc, log, timeout=120, admin_socket=data / "admin.sock")
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 1
            key = subprocess.run(
                tailledger_argv("apikeys", "create"), env=child_env(env), capture_output=True, text=True, check=True
            ).stdout.strip()
            target = _Target(base=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"})
            print(f"{'endpoint':44} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'bytes':>10}")
            if args.streams:  # the no-stream run once they registered: the same tailnet
                import trio

                trio.run(_under_streams, data, port, target, args)
            else:
                print(f"with no map stream ({written} nodes):")
                _api_load(target, args, args.seconds)
            print("target (issue 17): p99 < 300 ms for 5,000 nodes; no missed keep-alive")
        finally:
            stop(proc, 15)
    return 0
