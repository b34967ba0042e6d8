"""``tailledger bench api``: how fast the admin API lists a large tailnet.

Writes a tailnet of ``--nodes`` nodes (default 5,000, over 50 users) into a fresh data
directory through the real commands and the real log, starts ``tailledger serve`` on it
as its own process, makes an API key with the CLI, and asks for the device list
(``GET /api/v2/tailnet/-/devices`` and ``GET /api/v1/node``) over HTTP: one client after
another for latency (p50, p99), then ``--clients`` at once for throughput. The target
of issue 17 is a p99 below 300 ms for 5,000 nodes.

It prints figures and never fails on timing. Map streams are not connected here
(``tailledger loadgen`` measures those); run both at once to see one's effect on the
other.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from eventlog import Actor, ActorKind, AppendRequest, SQLiteEventStore, to_micros
from projections import AddressPlan, TailnetState, apply
from projections import commands as c
from projections.ipam import DEFAULT_V4, DEFAULT_V6

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bench_api_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tailledger bench api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=100, help="sequential requests per endpoint")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for the throughput run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the throughput run")
    args = parser.parse_args(argv)
    import httpx

    with tempfile.TemporaryDirectory(prefix="tailledger-bench-api-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir(mode=0o700)
        t = time.perf_counter()
        write_tailnet(data / "ledger.db", args.nodes)
        print(f"wrote a tailnet of {args.nodes} nodes in {time.perf_counter() - t:.1f} s")
        port = _free_port()
        env = {
            **os.environ, "TAILLEDGER_DATA": str(data), "TAILLEDGER_LISTEN_ADDR": f"127.0.0.1:{port}",
            "TAILLEDGER_METRICS_LISTEN_ADDR": "",
        }
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not (data / "admin.sock").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    print((Path(tmp) / "serve.log").read_text(errors="replace"), file=sys.stderr)
                    return 1
                time.sleep(0.1)
            key = subprocess.run(
                [sys.executable, "-m", "cli", "apikeys", "create"], env=env, capture_output=True, text=True, check=True
            ).stdout.strip()
            headers = {"Authorization": f"Bearer {key}"}
            base = f"http://127.0.0.1:{port}"
            print(f"{'endpoint':36} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'bytes':>10}")
            for path in ("/api/v2/tailnet/-/devices", "/api/v1/node"):
                with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
                    size = len(http.get(path).content)  # warm-up
                    times = []
                    for _ in range(args.requests):
                        t = time.perf_counter()
                        response = http.get(path)
                        times.append((time.perf_counter() - t) * 1000)
                        response.raise_for_status()
                times.sort()
                p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
                print(f"{path:36} {statistics.median(times):8.1f} {p99:8.1f} {times[-1]:8.1f} {size:10d}")
            count = [0]
            lock = threading.Lock()
            stop = time.monotonic() + args.seconds

            def worker() -> None:
                with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
                    while time.monotonic() < stop:
                        http.get("/api/v2/tailnet/-/devices").raise_for_status()
                        with lock:
                            count[0] += 1

            threads = [threading.Thread(target=worker) for _ in range(args.clients)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            elapsed = time.perf_counter() - t
            print(f"device list, {args.clients} clients at once: {count[0] / elapsed:.1f} requests/s "
                  f"({count[0]} in {elapsed:.1f} s; {args.nodes} nodes each)")
            print("target (issue 17): p99 < 300 ms for 5,000 nodes")
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return 0
