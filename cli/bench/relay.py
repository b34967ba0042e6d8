"""``tailledger bench relay``: DERP relay throughput and latency against a plain TCP forwarder.

What it measures
----------------
* **Throughput and latency.**  N pairs of clients push 1 KiB packets to each
  other (both directions) through a server running in its *own process*:
  first our DERP relay (plain HTTP mode, as behind a TLS proxy), then a plain
  trio TCP forwarder that splices each pair's two sockets together.  Clients
  are identical in both runs: they write DERP SendPacket frames and decode
  frames with the same decoder; only the server differs.  Each direction keeps
  a window of packets in flight (closed loop, so queues never overflow) and
  every packet carries its send time, so latency is end to end.  Printed:
  packets/s, MB/s, p50/p99 latency, the server process's CPU time per packet,
  and the relay/forwarder throughput ratio (target: at least 60%).
* **Memory.**  M idle DERP clients are connected to a fresh relay process;
  the relay's RSS before and after gives bytes per held client.

Numbers are printed, never asserted: a benchmark is not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import os
import resource
import statistics
import struct
import time
from array import array
from pathlib import Path

import trio

from relay import AllowAll, DerpClient, RelayConfig, connect_derp, generate_private_key, serve_relay
from relay.derp import frames as f

__all__ = ["bench_relay_main"]

_STAMP = struct.Struct(">qI")  # send time (perf_counter_ns), sequence number
_SEND_TYPE = int(f.FrameType.SEND_PACKET)
_RECV_TYPE = int(f.FrameType.RECV_PACKET)


# -- server processes ---------------------------------------------------------


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _run_relay(
    pipe: multiprocessing.connection.Connection, data_dir: str, queue_depth: int, tls: bool
) -> None:
    config = RelayConfig(
        data_dir=data_dir,
        listen_host="127.0.0.1",
        listen_port=0,
        tls="self-signed" if tls else "off",
        stun=False,
        queue_depth=queue_depth,
        write_timeout=10.0,
    )
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, config, AllowAll())
        pipe.send((relay.derp_port, relay.url, relay.cert_name))
        while await trio.to_thread.run_sync(pipe.recv) != "stop":
            drops = {k: v for k, v in relay.stats().drops.items() if v}
            io = relay.io_stats()
            pipe.send(
                (
                    drops,
                    f"{io.reads} reads, {io.direct_writes} direct + {io.task_writes} task writes",
                )
            )
        nursery.cancel_scope.cancel()


async def _splice(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _run_forwarder(pipe: multiprocessing.connection.Connection) -> None:
    """Pair connections by a 64-byte hello (own id, peer id) and splice them."""
    # Who is waiting for its peer: own id -> (its stream, set when the pair ends).
    waiting: dict[bytes, tuple[trio.SocketStream, trio.Event]] = {}

    async def handle(stream: trio.SocketStream) -> None:
        hello = b""
        while len(hello) < 64:
            chunk = await stream.receive_some(64 - len(hello))
            if not chunk:
                return
            hello += chunk
        me, peer = hello[:32], hello[32:]
        if peer in waiting:
            other, done = waiting.pop(peer)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_splice, stream, other)
                nursery.start_soon(_splice, other, stream)
            done.set()
        else:
            done = trio.Event()
            waiting[me] = (stream, done)
            await done.wait()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        pipe.send((listeners[0].socket.getsockname()[1], "", None))
        while await trio.to_thread.run_sync(pipe.recv) != "stop":
            pipe.send(({}, ""))
        nursery.cancel_scope.cancel()


def _server_process(
    kind: str, pipe: multiprocessing.connection.Connection, data_dir: str, depth: int, tls: bool
) -> None:
    _raise_fd_limit()
    if kind == "relay":
        trio.run(_run_relay, pipe, data_dir, depth, tls)
    else:
        trio.run(_run_forwarder, pipe)


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _Server:
    """A relay or forwarder in a child process."""

    def __init__(self, kind: str, data_dir: str, queue_depth: int, tls: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_server_process, args=(kind, child, data_dir, queue_depth, tls), daemon=True
        )
        self.proc.start()
        port, url, cert_name = self.pipe.recv()
        self.port: int = port
        self.url: str = url  # the relay's DERP URL ("" for the forwarder)
        self.cert_name: str | None = cert_name

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def stats(self) -> tuple[dict[str, int], str]:
        """Packets the server dropped so far, by reason, and an I/O summary (relay only)."""
        self.pipe.send("stats")
        drops, io = self.pipe.recv()
        return dict(drops), str(io)

    def stop(self) -> None:
        self.pipe.send("stop")
        self.proc.join(10)


# -- clients --------------------------------------------------------------------


class _Stream:
    """One direction of one pair: counts, window, latencies."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.sent = 0
        self.received = 0
        self.progress = trio.Event()
        self.measuring = False
        self.measured = 0
        self.latencies = array("d")


async def _sender(
    stream: trio.abc.Stream, dst: bytes, flow: _Stream, size: int, frame_type: int, stop: trio.Event
) -> None:
    filler = b"\x00" * (size - _STAMP.size)
    header = struct.pack(">BI", frame_type, 32 + size) + dst
    while not stop.is_set():
        room = flow.window - (flow.sent - flow.received)
        if room <= 0:
            with trio.move_on_after(1.0) as scope:
                await flow.progress.wait()
            if scope.cancelled_caught:  # something was lost; do not stall forever
                flow.sent = flow.received
            flow.progress = trio.Event()
            continue
        now = time.perf_counter_ns()
        batch = []
        for _ in range(min(room, 16)):
            batch.append(header + _STAMP.pack(now, flow.sent) + filler)
            flow.sent += 1
        await stream.send_all(b"".join(batch))


async def _receiver(stream: trio.abc.Stream, flow: _Stream, frame_type: int) -> None:
    decoder = f.FrameDecoder(f.MAX_PACKET_SIZE + 64)
    data: bytes | bytearray = b""
    unpack = _STAMP.unpack_from
    while True:
        if data:
            now = time.perf_counter_ns()
            got = 0
            for ftype, payload in decoder.feed(data):
                if ftype != frame_type:
                    continue
                got += 1
                if flow.measuring:
                    sent_ns, _ = unpack(payload, 32)
                    flow.latencies.append((now - sent_ns) / 1e6)
            if got:
                flow.received += got
                if flow.measuring:
                    flow.measured += got
                flow.progress.set()
        data = await stream.receive_some(65536)
        if not data:
            return


_Endpoint = tuple[trio.abc.Stream, bytes]  # a connected stream and its address (key)


async def _derp_pair(server: _Server) -> tuple[_Endpoint, _Endpoint]:
    a = await connect_derp(server.url, generate_private_key(), cert_name=server.cert_name)
    b = await connect_derp(server.url, generate_private_key(), cert_name=server.cert_name)
    # After login the relay sends nothing until packets flow, so no bytes are
    # left in the clients' own decoders: the raw streams are ours from here.
    assert a.pending_events() == b.pending_events() == 0
    return (a.stream, a.public_key), (b.stream, b.public_key)


async def _plain_pair(port: int) -> tuple[_Endpoint, _Endpoint]:
    ka, kb = os.urandom(32), os.urandom(32)
    a = await trio.open_tcp_stream("127.0.0.1", port)
    await a.send_all(ka + kb)
    b = await trio.open_tcp_stream("127.0.0.1", port)
    await b.send_all(kb + ka)
    return (a, ka), (b, kb)


async def _throughput(
    kind: str, server: _Server, pairs: int, size: int, window: int, seconds: float, warmup: float
) -> dict[str, float | str]:
    port = server.port
    send_type = _SEND_TYPE
    recv_type = _RECV_TYPE if kind == "relay" else _SEND_TYPE  # the forwarder passes frames through
    flows: list[_Stream] = []
    stop = trio.Event()
    streams: list[trio.abc.Stream] = []
    async with trio.open_nursery() as nursery:
        for _ in range(pairs):
            a, b = await (_derp_pair(server) if kind == "relay" else _plain_pair(port))
            for (src_stream, _), (dst_stream, dst_key) in ((a, b), (b, a)):
                flow = _Stream(window)
                flows.append(flow)
                nursery.start_soon(_sender, src_stream, dst_key, flow, size, send_type, stop)
                nursery.start_soon(_receiver, dst_stream, flow, recv_type)
            streams.extend((a[0], b[0]))
        await trio.sleep(warmup)
        for flow in flows:
            flow.measuring = True
        start = time.perf_counter()
        await trio.sleep(seconds)
        for flow in flows:
            flow.measuring = False
        elapsed = time.perf_counter() - start
        # Ask for drops now: packets in flight when the clients hang up would
        # be counted as gone_disconnected and say nothing about the relay.
        drops, io = await trio.to_thread.run_sync(server.stats)
        stop.set()
        nursery.cancel_scope.cancel()
    for s in streams:
        await trio.aclose_forcefully(s)
    total = sum(fl.measured for fl in flows)
    lat = sorted(x for fl in flows for x in fl.latencies)
    return {
        "packets": total,
        "pps": total / elapsed,
        "mbps": total * size / elapsed / 1e6,
        "p50_ms": statistics.median(lat) if lat else float("nan"),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
        "elapsed": elapsed,
        "drops": ", ".join(f"{k}={v}" for k, v in drops.items()) or "none",
        "io": io,
    }


def _run_throughput(kind: str, args: argparse.Namespace, data_dir: str) -> dict[str, float | str]:
    server = _Server(kind, data_dir, args.queue_depth, tls=args.tls)
    try:
        user0, sys0 = _cpu_seconds(server.pid)
        result = trio.run(
            _throughput, kind, server, args.pairs, args.size, args.window, args.seconds, args.warmup
        )
        user1, sys1 = _cpu_seconds(server.pid)
    finally:
        server.stop()
    # Server CPU over warm-up + measurement, per packet at the measured rate.
    moved = float(result["pps"]) * (args.warmup + args.seconds)
    result["user_us"] = (user1 - user0) / moved * 1e6 if moved else 0.0
    result["sys_us"] = (sys1 - sys0) / moved * 1e6 if moved else 0.0
    return result


async def _hold_clients(server: _Server, count: int) -> tuple[int, int, float]:
    before = _rss_bytes(server.pid)
    clients: list[DerpClient] = []
    start = time.perf_counter()
    try:
        for _ in range(count):
            clients.append(
                await connect_derp(server.url, generate_private_key(), cert_name=server.cert_name)
            )
        connect_time = time.perf_counter() - start
        await trio.sleep(1.0)  # let the relay settle (buffers, GC)
        after = _rss_bytes(server.pid)
    finally:
        for c in clients:
            await trio.aclose_forcefully(c.stream)
    return before, after, connect_time


def _run_memory(args: argparse.Namespace, data_dir: str) -> tuple[int, int, float]:
    server = _Server("relay", data_dir, args.queue_depth, tls=args.tls)
    try:
        return trio.run(_hold_clients, server, args.clients)
    finally:
        server.stop()


def bench_relay_main(argv: list[str]) -> int:
    """Run the relay benchmark and print its figures; returns 0."""
    parser = argparse.ArgumentParser(
        prog="tailledger bench relay", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--pairs", type=int, default=8, help="client pairs (each sends both ways)")
    parser.add_argument("--size", type=int, default=1024, help="packet size in bytes")
    parser.add_argument("--window", type=int, default=32, help="packets in flight per direction")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement time per server")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--queue-depth", type=int, default=64, help="relay per-client queue depth")
    parser.add_argument(
        "--clients", type=int, default=1000, help="idle clients for the memory test"
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="run the relay with TLS (self-signed); the forwarder stays plain TCP",
    )
    args = parser.parse_args(argv)
    _raise_fd_limit()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"relay benchmark: {args.pairs} pairs x 2 directions, {args.size}-byte packets, "
            f"window {args.window}, {args.seconds:g} s each (servers in their own process)"
            + ("; relay over TLS, forwarder plain TCP" if args.tls else "; no TLS")
        )
        relay = _run_throughput("relay", args, tmp)
        plain = _run_throughput("forwarder", args, tmp)
        for name, r in (("DERP relay", relay), ("plain TCP forwarder", plain)):
            print(
                f"  {name:<20} {r['pps']:>10,.0f} pkt/s  {r['mbps']:>7.1f} MB/s  "
                f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                f"server CPU {r['user_us']:.1f} user + {r['sys_us']:.1f} sys us/pkt  drops: {r['drops']}"
            )
            if r["io"]:
                print(f"  {'':<20} relay I/O over the whole run: {r['io']}")
        ratio = float(relay["pps"]) / float(plain["pps"]) if plain["pps"] else 0.0
        verdict = "meets" if ratio >= 0.6 else "BELOW"
        print(f"  throughput ratio relay/forwarder: {ratio:.0%} ({verdict} the 60% target)")
        # When the clients (one Python process) saturate first, both servers
        # idle part of the time; CPU per packet then says what each server
        # could do with a whole core to itself.
        cost_relay = float(relay["user_us"]) + float(relay["sys_us"])
        cost_plain = float(plain["user_us"]) + float(plain["sys_us"])
        if cost_relay and cost_plain:
            capacity = cost_plain / cost_relay
            verdict = "meets" if capacity >= 0.6 else "BELOW"
            print(
                f"  capacity ratio (packets per server CPU-second) relay/forwarder: {capacity:.0%} "
                f"({verdict} the 60% target); one core: relay ~{1e6 / cost_relay:,.0f} pkt/s, "
                f"forwarder ~{1e6 / cost_plain:,.0f} pkt/s"
            )
        if not args.skip_memory:
            before, after, connect_time = _run_memory(args, tmp)
            per_client = (after - before) / args.clients
            print(
                f"memory: {args.clients} idle DERP{'-over-TLS' if args.tls else ''} clients held; "
                f"relay RSS {before / 2**20:.1f} MiB -> "
                f"{after / 2**20:.1f} MiB = {per_client / 1024:.1f} KiB per client "
                f"(connected in {connect_time:.1f} s)"
            )
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(bench_relay_main(sys.argv[1:]))
