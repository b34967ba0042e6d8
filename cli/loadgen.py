"""``tailledger loadgen``: simulated tailscale clients over the real protocol.

Starts a ``tailledger serve`` process on a scratch data directory and N simulated
clients in this process. Every client speaks the real protocol: ``/key``, the
``/ts2021`` upgrade, Noise, HTTP/2, register with a pre-auth key, and a zstd map
long-poll that it reads for as long as it lives; a few send endpoint updates (lite map
requests) while idle. Then it measures, for each tailnet size:

* join:     a new node registers; time until the last stream shows it (p50, p99), and
            how long the register call itself took;
* policy:   the policy changes every node's packet filter; time until the last stream
            got its new filter (p50, p99);
* CPU per change: server CPU seconds (from /proc) spent on each of those changes;
* memory:   server RSS growth per connected, idle node;
* restart:  the server is restarted on the same data; time until every client has
            reconnected and received a full map again.

It prints a table and writes the figures as JSON. These are benchmark figures, not
assertions. The clients decode each message only as far as the measurement needs
(small msgspec view structs), so a busy load generator distorts the figures less.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio

from projections.tailcfg import Hostinfo, MapRequest, NetInfo, RegisterRequest, RegisterResponseAuth
from protocol import MapFrameDecoder, generate_private_key, open_control_client, public_key

from .adminsock import AdminError, call

__all__ = ["loadgen_main"]


class _PeerView(msgspec.Struct):
    ID: int = 0
    Key: str = ""


class _MapView(msgspec.Struct):
    """The few MapResponse fields the load generator looks at."""

    Node: _PeerView | None = None
    Peers: list[_PeerView] | None = None
    PeersChanged: list[_PeerView] | None = None
    PeersRemoved: list[int] | None = None
    PacketFilters: dict[str, msgspec.Raw] | None = None
    PacketFilter: msgspec.Raw | None = None
    KeepAlive: bool = False


_decoder = msgspec.json.Decoder(_MapView)
_POLICY_A = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
_POLICY_B = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:1-65535"]}]}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


@dataclass
class _Server:
    data: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAILLEDGER_")}
        env.update(TAILLEDGER_DATA=str(self.data), TAILLEDGER_LISTEN_ADDR=f"127.0.0.1:{self.port}",
                   TAILLEDGER_LOG_LEVEL="warning")
        return env

    def start(self) -> None:
        log = open(self.data.parent / "server.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start; see server.log") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def admin(self, op: str, args: object = None) -> object:
        assert args is None or isinstance(args, dict)
        return call(self.data / "admin.sock", op, args)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass(eq=False)
class _Client:
    index: int
    machine: bytes = field(default_factory=generate_private_key)
    node: bytes = field(default_factory=lambda: os.urandom(32))
    ready: trio.Event = field(default_factory=trio.Event)
    full_maps: int = 0
    seen: dict[str, float] = field(default_factory=dict)  # marker -> first time seen
    filters: int = 0
    last_filter_at: float = 0.0

    @property
    def node_key(self) -> str:
        return "nodekey:" + public_key(self.node).hex()

    def _hostinfo(self) -> Hostinfo:
        return Hostinfo(hostname=f"sim-{self.index}", os="linux", net_info=NetInfo(preferred_derp=1))

    def map_request(self, *, stream: bool, port: int = 41641) -> MapRequest:
        return MapRequest(
            version=130, compress="zstd", keep_alive=True, node_key=self.node_key,
            disco_key="discokey:" + public_key(self.machine[::-1]).hex(), stream=stream,
            omit_peers=not stream, hostinfo=self._hostinfo(),
            endpoints=[f"192.0.2.{self.index % 250 + 1}:{port}"], endpoint_types=[1],
        )

    def observe(self, view: _MapView, now: float) -> None:
        if (view.Node is not None and view.Peers is not None) or (view.Node is not None and self.full_maps == 0):
            self.full_maps += 1
        for peer in view.Peers or ():
            self.seen.setdefault(peer.Key, now)
        for peer in view.PeersChanged or ():
            self.seen.setdefault(peer.Key, now)
        if view.PacketFilters is not None or view.PacketFilter is not None:
            self.filters += 1
            self.last_filter_at = now

    async def run(self, port: int, key: str, endpoint_updates: bool) -> None:
        """Connect, register, follow the map stream; reconnect whenever it breaks."""
        registered = False
        while True:
            try:
                async with open_control_client("127.0.0.1", port, machine_key=self.machine) as client:
                    if not registered:
                        req = RegisterRequest(
                            version=130, node_key=self.node_key,
                            auth=RegisterResponseAuth(auth_key=key), hostinfo=self._hostinfo(),
                        )
                        resp = await client.register(req)
                        if resp.error:
                            raise RuntimeError(resp.error)
                        registered = True
                    async with trio.open_nursery() as nursery:
                        if endpoint_updates:
                            nursery.start_soon(self._lite_updates, client)
                        async with client.map_stream(self.map_request(stream=True)) as stream:
                            decoder = MapFrameDecoder(compressed=True)
                            async for chunk in stream.response:
                                now = trio.current_time()
                                for raw in decoder.receive_data(chunk):
                                    self.observe(_decoder.decode(raw), now)
                                    self.ready.set()
                        nursery.cancel_scope.cancel()
            except (OSError, trio.BrokenResourceError, Exception) as exc:
                if isinstance(exc, RuntimeError) and "pre-auth" in str(exc):
                    raise
            await trio.sleep(random.uniform(0.2, 1.0))  # like a real client's backoff

    async def _lite_updates(self, client: object) -> None:
        from protocol import ControlClient

        assert isinstance(client, ControlClient)
        port = 41641
        while True:
            await trio.sleep(random.uniform(20, 40))
            port += 1
            await client.post_json("/machine/map", self.map_request(stream=False, port=port))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _measure(n: int, workdir: Path) -> dict[str, float]:
    server = _Server(workdir / f"n{n}", _free_port())
    server.data.mkdir(parents=True)
    server.start()
    results: dict[str, float] = {"nodes": n}
    try:
        await trio.to_thread.run_sync(server.admin, "users.create", {"name": "load"})
        created = await trio.to_thread.run_sync(
            server.admin, "preauthkeys.create", {"user": "load", "reusable": True, "expiration_seconds": None}
        )
        assert isinstance(created, dict)
        key = str(created["key"])
        has_policy = True
        try:
            await trio.to_thread.run_sync(server.admin, "policy.set", {"text": _POLICY_A})
        except AdminError:
            has_policy = False
        _, rss0 = _proc_stat(server.pid)
        clients = [_Client(i) for i in range(n)]
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(64)
            t_connect = trio.current_time()

            async def start(c: _Client) -> None:
                async with limiter:
                    nursery.start_soon(c.run, server.port, key, c.index % 10 == 0)
                    with trio.move_on_after(120):
                        await c.ready.wait()

            async with trio.open_nursery() as starters:
                for c in clients:
                    starters.start_soon(start, c)
            results["connect_all_s"] = trio.current_time() - t_connect
            results["connected"] = sum(1 for c in clients if c.ready.is_set())
            await trio.sleep(3)  # settle: online patches, first lite updates
            _, rss1 = _proc_stat(server.pid)
            results["rss_mib"] = rss1 / 2**20
            results["mem_per_node_kib"] = (rss1 - rss0) / max(n, 1) / 1024

            # -- join --------------------------------------------------------------
            newcomer = _Client(n)
            cpu0, _ = _proc_stat(server.pid)
            t0 = trio.current_time()
            async with open_control_client("127.0.0.1", server.port, machine_key=newcomer.machine) as client:
                resp = await client.register(
                    RegisterRequest(version=130, node_key=newcomer.node_key,
                                    auth=RegisterResponseAuth(auth_key=key), hostinfo=newcomer._hostinfo())
                )
                results["register_ms"] = (trio.current_time() - t0) * 1000
                assert not resp.error, resp.error
                with trio.move_on_after(60):
                    while not all(newcomer.node_key in c.seen for c in clients):
                        await trio.sleep(0.01)
            cpu1, _ = _proc_stat(server.pid)
            lat = [c.seen[newcomer.node_key] - t0 for c in clients if newcomer.node_key in c.seen]
            results["join_reached"] = len(lat)
            results["join_p50_ms"] = _pct(lat, 0.5) * 1000
            results["join_p99_ms"] = _pct(lat, 0.99) * 1000
            results["join_cpu_s"] = cpu1 - cpu0

            # -- policy change -------------------------------------------------------
            if has_policy:
                await trio.sleep(1)
                before = {c.index: c.filters for c in clients}
                cpu0, _ = _proc_stat(server.pid)
                t0 = trio.current_time()
                await trio.to_thread.run_sync(server.admin, "policy.set", {"text": _POLICY_B})
                with trio.move_on_after(60):
                    while not all(c.filters > before[c.index] for c in clients):
                        await trio.sleep(0.01)
                cpu1, _ = _proc_stat(server.pid)
                lat = [c.last_filter_at - t0 for c in clients if c.filters > before[c.index]]
                results["policy_reached"] = len(lat)
                results["policy_p50_ms"] = _pct(lat, 0.5) * 1000
                results["policy_p99_ms"] = _pct(lat, 0.99) * 1000
                results["policy_cpu_s"] = cpu1 - cpu0

            # -- restart ---------------------------------------------------------------
            for c in clients:
                c.ready = trio.Event()
            t0 = trio.current_time()
            await trio.to_thread.run_sync(server.stop)
            await trio.to_thread.run_sync(server.start)
            with trio.move_on_after(180):
                for c in clients:
                    await c.ready.wait()
            results["reconnect_all_s"] = trio.current_time() - t0
            results["reconnected"] = sum(1 for c in clients if c.ready.is_set())
            nursery.cancel_scope.cancel()
    finally:
        server.stop()
    return results


_COLUMNS = [
    ("nodes", "nodes", "{:.0f}"),
    ("connect_all_s", "connect s", "{:.1f}"),
    ("mem_per_node_kib", "KiB/node", "{:.1f}"),
    ("register_ms", "register ms", "{:.0f}"),
    ("join_p50_ms", "join p50 ms", "{:.0f}"),
    ("join_p99_ms", "join p99 ms", "{:.0f}"),
    ("join_cpu_s", "join CPU s", "{:.3f}"),
    ("policy_p50_ms", "policy p50 ms", "{:.0f}"),
    ("policy_p99_ms", "policy p99 ms", "{:.0f}"),
    ("policy_cpu_s", "policy CPU s", "{:.3f}"),
    ("reconnect_all_s", "reconnect s", "{:.1f}"),
]


def _table(rows: list[dict[str, float]]) -> str:
    head = [h for _, h, _ in _COLUMNS]
    body = [[fmt.format(r[k]) if k in r else "-" for k, _, fmt in _COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *body]]
    return "\n".join(lines)


def loadgen_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tailledger loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="100,1000", help="comma-separated tailnet sizes (e.g. 100,1000,5000)")
    parser.add_argument("--json", default="loadgen-results.json", help="where to write the figures")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="tailledger-loadgen-") as tmp:
        for n in sizes:
            print(f"# {n} simulated nodes ...", flush=True)
            rows.append(trio.run(_measure, n, Path(tmp)))
            print(_table(rows[-1:]), flush=True)
    print()
    print(_table(rows))
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            scale = r["nodes"] / base["nodes"]
            ratio = r.get("join_cpu_s", 0) / base["join_cpu_s"] if base.get("join_cpu_s") else float("nan")
            print(f"join CPU x{ratio:.1f} for x{scale:.0f} nodes (linear would be x{scale:.0f}, quadratic x{scale * scale:.0f})")
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"figures written to {args.json}")
    if rows and statistics.fmean(r.get("connected", 0) / r["nodes"] for r in rows) < 1:
        print("warning: not every simulated client connected")
    return 0
