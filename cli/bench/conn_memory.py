"""Server memory per idle connected node, and where it goes (issue 7).

Run it as::

    tailledger bench conn-memory                      # 500 and 2000 nodes, transport
    tailledger bench conn-memory --nodes 5000 --mode both --tls
    tailledger bench conn-memory --primitives-only    # Python's own overheads only

A benchmark, not a test: it prints figures and asserts nothing.

Method. Every measurement runs in a fresh *server* process, with the simulated
clients in a second process, so that neither the clients' memory nor an
earlier run's allocator state pollutes the figures:

1. The server starts (``--mode transport``: :class:`protocol.ControlServer`
   with a stand-in handler whose ``/machine/map`` answer is an idle stream,
   so the netmap costs nothing; ``--mode full``: the real ``tailledger
   serve`` stack in-process, with a deny-all policy so that every node has
   no peers and the netmap stays tiny; ``--policy allow-all`` shows every node
   every other, so the figures add what a node's peers and full map cost).
2. ``--warmup`` clients connect; each registers (full mode), opens a
   ``/machine/map`` long poll and reads its first message. Once they have
   settled, the *baseline* is taken: RSS, GC-tracked objects by type, trio
   tasks, and (trace runs) a ``tracemalloc`` snapshot.
3. N more clients do the same; after they settle, the second sample is taken.
   Everything is reported *per connection* as (second - baseline) / N, so
   one-time costs (imports, caches, the first connection's lazy set-up) are
   excluded and what remains is the marginal cost of one more idle node.

Each configuration runs twice: without ``tracemalloc`` for the RSS figure
(tracing itself costs memory), and with it for the allocation sites (tracing
starts right after the baseline, so the snapshot holds only what the N
connections left allocated; tracing slows the server down several times). The
difference between RSS and traced bytes is memory Python's allocator does
not see: OpenSSL (TLS) and cryptography's Rust objects, allocator slack.
Kernel socket buffers are not in RSS at all.

Allocation sites are grouped by the innermost frame outside the standard
library (``site``) and the innermost frame in this repository that led to it
(``via``); e.g. a coroutine object is allocated in trio's ``_util.py`` but
``via protocol/serve/session.py`` names the ``start_soon`` that spawned the task.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import ssl
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
import trio.testing

from projections.tailcfg import (
    Hostinfo,
    MapRequest,
    NetInfo,
    RegisterRequest,
    RegisterResponseAuth,
)
from protocol import (
    KEEPALIVE_FRAME_ZSTD,
    ControlServer,
    Keypair,
    NoiseRequest,
    NoiseResponse,
    generate_private_key,
    load_ssl_context,
    open_control_client,
)

REPO = Path(__file__).resolve().parents[2]
_STDLIB = str(Path(os.__file__).resolve().parent)
_SELF = str(Path(__file__).resolve())
#: A child process of this benchmark (run from the checkout's root, so it imports this code).
_CHILD = (sys.executable, "-m", "cli.bench.conn_memory")

#: Where an allocation site belongs, first match wins (paths as shortened by _short).
_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("protocol/noise/", "noise records/handshake"),
    ("protocol/h2_bridge.py", "h2 bridge (ours)"),
    ("protocol/h2flow.py", "h2 bridge (ours)"),
    ("protocol/compat.py", "h2 bridge (ours)"),
    ("protocol/serve/", "serve adapter (ours)"),
    ("protocol/upgrade.py", "HTTP/1.1 front"),
    ("h11/", "HTTP/1.1 front"),
    ("wire/wsstream.py", "websocket"),
    ("protocol/control/", "control + netmap (not transport)"),
    ("protocol/mapframe.py", "control + netmap (not transport)"),
    ("projections/", "control + netmap (not transport)"),
    ("eventlog/", "event log"),
    ("protocol/", "protocol (other)"),
    ("h2/", "h2 (connection, streams, settings)"),
    ("hpack/", "hpack"),
    ("hyperframe/", "hyperframe"),
    ("trio/_ssl.py", "TLS"),
    ("ssl.py", "TLS"),
    ("trio/", "trio (tasks, scopes, sockets)"),
    ("hypercorn/", "hypercorn"),
    ("cryptography/", "cryptography"),
    ("msgspec/", "msgspec"),
    ("cli/bench/conn_memory.py", "stand-in handler (transport mode)"),
)


def _short(filename: str) -> str:
    """A readable path: repo-relative, site-packages-relative or stdlib-relative."""
    if filename.startswith(str(REPO) + os.sep):
        return filename[len(str(REPO)) + 1 :]
    marker = "site-packages" + os.sep
    if marker in filename:
        return filename.split(marker, 1)[1]
    if filename.startswith(_STDLIB + os.sep):
        return "stdlib:" + filename[len(_STDLIB) + 1 :]
    return filename


def _category(site: str) -> str:
    for prefix, name in _CATEGORIES:
        if site.startswith(prefix):
            return name
    return "python/stdlib (other)"


def _rss() -> int:
    """Resident set size of this process, in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _count_tasks() -> int:
    """Number of live trio tasks (walks the task tree from the root)."""
    count = 0
    root = trio.lowlevel.current_root_task()
    assert root is not None
    todo = [root]
    while todo:
        task = todo.pop()
        count += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


# -- allocation sites ------------------------------------------------------------------


@dataclass
class SiteTable:
    """Traced bytes and blocks keyed by (site, via)."""

    sizes: Counter[tuple[str, str]] = field(default_factory=Counter)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)


def _is_stdlib(filename: str) -> bool:
    return filename.startswith("<") or (
        filename.startswith(_STDLIB) and "site-packages" not in filename
    )


def _site_of(frames: tracemalloc.Traceback) -> tuple[str, str]:
    """(innermost non-stdlib frame, innermost frame in this repository)."""
    site = via = ""
    repo = str(REPO) + os.sep
    for frame in reversed(frames):  # innermost first
        name = frame.filename
        if not site and not _is_stdlib(name):
            site = f"{_short(name)}:{frame.lineno}"
        if name.startswith(repo) and name != _SELF:
            via = f"{_short(name)}:{frame.lineno}"
            break
    if not site:
        innermost = frames[-1]
        site = f"{_short(innermost.filename)}:{innermost.lineno}"
    return site, via


def allocation_sites(snapshot: tracemalloc.Snapshot) -> SiteTable:
    """Traced bytes and blocks of ``snapshot`` by (site, via) (see the module docstring)."""
    table = SiteTable()
    for stat in snapshot.statistics("traceback"):
        if stat.traceback[-1].filename == tracemalloc.__file__:
            continue  # tracemalloc's own bookkeeping
        key = _site_of(stat.traceback)
        table.sizes[key] += stat.size
        table.counts[key] += stat.count
    return table


@dataclass
class _Sample:
    rss: int
    objects: Counter[str]
    tasks: int
    traced: int = 0
    sites: SiteTable | None = None


def _sample(trace: bool) -> _Sample:
    gc.collect()
    rss = _rss()
    # The snapshot comes before anything this function allocates itself.
    sites = allocation_sites(tracemalloc.take_snapshot()) if trace else None
    tasks = _count_tasks()
    objects = Counter(type(o).__qualname__ for o in gc.get_objects())
    traced = sum(sites.sizes.values()) if sites is not None else 0
    return _Sample(rss=rss, objects=objects, tasks=tasks, traced=traced, sites=sites)


def _per_connection(before: _Sample, after: _Sample, n: int, top: int) -> dict[str, Any]:
    """The report of one run as plain JSON data, every figure divided by ``n``."""
    objects = after.objects.copy()
    objects.subtract(before.objects)
    result: dict[str, Any] = {
        "rss_kib": (after.rss - before.rss) / n / 1024,
        "tasks": (after.tasks - before.tasks) / n,
        "gc_objects": sum(objects.values()) / n,
        "gc_types": [(name, count / n) for name, count in objects.most_common(top)],
    }
    if before.sites is None or after.sites is None:
        return result
    sizes = after.sites.sizes.copy()
    sizes.subtract(before.sites.sizes)
    counts = after.sites.counts.copy()
    counts.subtract(before.sites.counts)
    categories: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for (site, _via), size in sizes.items():
        categories[_category(site)] += size
        files[site.rsplit(":", 1)[0]] += size
    result["traced_kib"] = (after.traced - before.traced) / n / 1024
    result["categories"] = [
        (name, size / n / 1024) for name, size in categories.most_common() if abs(size) >= n
    ]
    result["files"] = [(name, size / n / 1024) for name, size in files.most_common(top // 2)]
    result["sites"] = [
        (site, via, size / n / 1024, counts[(site, via)] / n)
        for (site, via), size in sizes.most_common(top)
    ]
    return result


# -- the server side -----------------------------------------------------------------


async def _idle_map() -> AsyncIterator[bytes]:
    """An idle map long poll: one keep-alive message, then nothing."""
    yield KEEPALIVE_FRAME_ZSTD
    await trio.sleep_forever()


async def _stand_in_handler(request: NoiseRequest) -> NoiseResponse:
    """Transport mode: ``/machine/map`` streams idly, everything else is a 404."""
    if request.path.startswith("/machine/map"):
        return NoiseResponse(
            status=200, headers=(("content-type", "application/json"),), stream=_idle_map()
        )
    return NoiseResponse(status=404, body=b"not found\n")


async def _lifespan_only_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI app for transport mode: answers the lifespan protocol, 404s the rest."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[-1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@dataclass
class _Target:
    port: int
    server_public: bytes
    auth_key: str = ""


async def _start_transport(nursery: trio.Nursery, ssl_context: ssl.SSLContext | None) -> _Target:
    server = ControlServer(
        server_key=generate_private_key(),
        handler=_stand_in_handler,
        asgi_app=_lifespan_only_app,
        ssl_context=ssl_context,
    )
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(server.serve, listeners)
    return _Target(listeners[0].socket.getsockname()[1], server.server_public)


#: ``--policy``: the policy of ``--mode full``.
_POLICIES: Final = {
    # Nobody sees anybody: what remains per node is the transport and control state.
    "deny-all": '{"acls": []}',
    # Everybody sees everybody: what a node's peers (and its full map) add to that.
    "allow-all": '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}',
}


async def _start_full(
    nursery: trio.Nursery, data: Path, ssl_context: ssl.SSLContext | None, certs: Path | None,
    policy: str = _POLICIES["deny-all"],
) -> _Target:
    import msgspec

    from cli.config import Config
    from cli.server import Services, open_server
    from eventlog import Actor, ActorKind

    settings: dict[str, object] = {
        "data_dir": str(data),
        "listen_addr": "127.0.0.1:0",
        # No /metrics listener: it is not measured, and two runs at once (or a server
        # already on the default port) would contend for 127.0.0.1:9090.
        "metrics_listen_addr": "",
        "audit": {"signing_key_file": str(data.parent / f"{data.name}-signing.key")},
    }
    if ssl_context is not None and certs is not None:
        settings["tls"] = {
            "cert_file": str(certs / "cert.pem"),
            "key_file": str(certs / "key.pem"),
        }

    async def serve(*, task_status: trio.TaskStatus[Services]) -> None:
        async with open_server(msgspec.convert(settings, type=Config)) as services:
            task_status.started(services)
            await trio.sleep_forever()

    server: Services = await nursery.start(serve)
    admin = Actor(kind=ActorKind.ADMIN, id="bench")
    await server.ops.dispatch("users.create", {"name": "bench"}, admin)
    await server.ops.dispatch("policy.set", {"text": policy}, admin)
    created = await server.ops.dispatch(
        "preauthkeys.create", {"user": "bench", "reusable": True}, admin
    )
    assert isinstance(created, dict)
    return _Target(server.port, server.noise_public, str(created["key"]))


class _Lines:
    """Line reader over a trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some()
            if not data:
                return ""
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


async def _connect_batch(proc: trio.Process, lines: _Lines, count: int) -> tuple[int, int]:
    assert proc.stdin is not None
    await proc.stdin.send_all(f"connect {count}\n".encode())
    reply = (await lines.next()).split()
    if not reply or reply[0] != "ready":
        raise RuntimeError(f"clients process answered {reply!r}")
    return int(reply[1]), int(reply[2])


async def _server_role(args: argparse.Namespace) -> dict[str, Any]:
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
    with tempfile.TemporaryDirectory(prefix="conn-memory-") as tmp:
        certs: Path | None = None
        ssl_context: ssl.SSLContext | None = None
        if args.tls:
            from tests.protocol.transport_harness import make_tls_files

            certs = Path(tmp)
            cert, key = make_tls_files(certs)
            # No ALPN: Tailscale's TLS fallback offers none, so /ts2021 stays on HTTP/1.1.
            ssl_context = load_ssl_context(cert, key, alpn=())
        async with trio.open_nursery() as nursery:
            if args.mode == "transport":
                target = await _start_transport(nursery, ssl_context)
            else:
                target = await _start_full(nursery, Path(tmp) / "data", ssl_context, certs, _POLICIES[args.policy])
            command = [
                *_CHILD,
                "--role=clients",
                f"--port={target.port}",
                f"--server-public={target.server_public.hex()}",
                f"--auth-key={target.auth_key}",
                f"--concurrency={args.concurrency}",
                *(["--tls"] if args.tls else []),
            ]
            proc = await trio.lowlevel.open_process(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO
            )
            assert proc.stdout is not None and proc.stdin is not None
            lines = _Lines(proc.stdout)
            try:
                ok, failed = await _connect_batch(proc, lines, args.warmup)
                await trio.sleep(args.settle)
                before = _sample(False)
                if args.trace:
                    # Traced from here on only: what the N connections leave
                    # allocated is exactly what the second snapshot holds, and
                    # start-up allocations need neither tracing nor sorting.
                    tracemalloc.start(args.frames)
                    before.sites = SiteTable()
                started = time.monotonic()
                ok, failed = await _connect_batch(proc, lines, args.nodes)
                connected = time.monotonic()
                await trio.sleep(args.settle)
                after = _sample(args.trace)
                print(
                    f"  ({'trace' if args.trace else 'rss'} run: {ok} connected in "
                    f"{connected - started:.0f} s, sampled in {time.monotonic() - connected:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            finally:
                await proc.stdin.aclose()
                with trio.move_on_after(30):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
            nursery.cancel_scope.cancel()
    report = _per_connection(before, after, max(ok, 1), args.top)
    report.update(
        mode=args.mode, tls=args.tls, nodes=args.nodes, connected=ok, failed=failed,
        rss_total_mib=after.rss / 2**20, traced_run=args.trace,
    )  # fmt: skip
    return report


# -- the client side --------------------------------------------------------------------


def _client_ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _hostinfo(index: int) -> Hostinfo:
    return Hostinfo(hostname=f"sim-{index}", os="linux", net_info=NetInfo(preferred_derp=1))


async def _one_client(
    index: int,
    args: argparse.Namespace,
    server_public: bytes,
    ssl_context: ssl.SSLContext | None,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Connect, register (full mode), hold a map long poll; started at its first message."""
    node = Keypair.generate()
    node_key = "nodekey:" + node.public.hex()
    async with open_control_client(
        "127.0.0.1",
        args.port,
        machine_key=Keypair.generate(),
        server_public=server_public,
        ssl_context=ssl_context,
        server_hostname="localhost",
    ) as client:
        if args.auth_key:
            register = RegisterRequest(
                version=130,
                node_key=node_key,
                auth=RegisterResponseAuth(auth_key=args.auth_key),
                hostinfo=_hostinfo(index),
            )
            for attempt in range(40):
                response = await client.register(register)
                if not response.error:
                    break
                # The server sheds load ("changing too fast"): back off and
                # retry like tailscaled does, on the same tunnel.
                await trio.sleep(random.uniform(0.5, 1.5) * min(attempt + 1, 8))
            else:
                raise RuntimeError(response.error)
        request = MapRequest(
            version=130,
            compress="zstd",
            keep_alive=True,
            node_key=node_key,
            disco_key="discokey:" + Keypair.generate().public.hex(),
            stream=True,
            hostinfo=_hostinfo(index),
            endpoints=[f"192.0.2.{index % 250 + 1}:41641", f"[2001:db8::{index:x}]:41641"],
            endpoint_types=[1, 1],
        )
        async with client.map_stream(request) as stream:
            started = False
            async for _chunk in stream.response:
                if not started:
                    started = True
                    task_status.started()


async def _clients_role(args: argparse.Namespace) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
    server_public = bytes.fromhex(args.server_public)
    ssl_context = _client_ssl_context() if args.tls else None
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    lines = _Lines(stdin)
    index = 0
    limiter = trio.CapacityLimiter(args.concurrency)
    async with trio.open_nursery() as clients:
        while command := (await lines.next()).split():
            count = int(command[1])
            ok = failed = 0

            async def start(i: int) -> None:
                nonlocal ok, failed
                async with limiter:
                    try:
                        await clients.start(_one_client, i, args, server_public, ssl_context)
                        ok += 1
                    except Exception as exc:
                        failed += 1
                        if failed <= 3:
                            print(f"client {i} failed: {exc!r}", file=sys.stderr)

            async with trio.open_nursery() as starters:
                for _ in range(count):
                    starters.start_soon(start, index)
                    index += 1
            await stdout.send_all(f"ready {ok} {failed}\n".encode())
        clients.cancel_scope.cancel()


# -- Python's own overheads --------------------------------------------------------------

#: A primitive makes ``count`` objects (or parked tasks) in ``nursery`` and
#: returns whatever keeps them alive.
_Make = Callable[[int, trio.Nursery], Awaitable[object]]


async def _park_tasks(
    count: int, nursery: trio.Nursery, fn: Callable[[], Awaitable[object]]
) -> None:
    for _ in range(count):
        nursery.start_soon(fn)


async def _nested(depth: int) -> None:
    if depth:
        await _nested(depth - 1)
    else:
        await trio.sleep_forever()


async def _in_own_nursery() -> None:
    async with trio.open_nursery():
        await trio.sleep_forever()


async def _in_cancel_scope() -> None:
    with trio.CancelScope():
        await trio.sleep_forever()


async def _socket_pairs(count: int) -> list[tuple[trio.SocketStream, trio.SocketStream]]:
    import socket as stdlib_socket

    pairs = []
    for _ in range(count):
        a, b = stdlib_socket.socketpair()
        pairs.append(
            (
                trio.SocketStream(trio.socket.from_stdlib_socket(a)),
                trio.SocketStream(trio.socket.from_stdlib_socket(b)),
            )
        )
    return pairs


async def _readers(count: int, nursery: trio.Nursery, *, direct: bool) -> object:
    """Tasks parked reading an idle socket: in ``receive_some`` or in ``wait_readable``."""
    pairs = await _socket_pairs(count)
    for reader, _writer in pairs:
        if direct:
            nursery.start_soon(trio.lowlevel.wait_readable, reader.socket)
        else:
            nursery.start_soon(reader.receive_some, 65536)
    return pairs


def _h2_server(compact: bool) -> object:
    import h2.config
    import h2.connection
    import h2.settings

    from protocol.compat import CompactSettings, compact_header_tables

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    if compact:
        conn.local_settings = CompactSettings(client=False)
        conn.remote_settings = CompactSettings(client=True)
        compact_header_tables(conn)
    conn.initiate_connection()
    conn.data_to_send()
    return conn


async def _tls_server_ends(count: int) -> object:
    """Server ends of handshaken in-memory TLS pairs (the client ends are freed)."""
    from tests.protocol.transport_harness import make_tls_files

    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_tls_files(Path(tmp))
        server_ctx = load_ssl_context(cert, key, alpn=())
    client_ctx = _client_ssl_context()
    ends = []
    for _ in range(count):
        left, right = trio.testing.memory_stream_pair()
        server_end = trio.SSLStream(left, server_ctx, server_side=True, https_compatible=True)
        client_end = trio.SSLStream(right, client_ctx, server_hostname="localhost")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_end.do_handshake)
            nursery.start_soon(client_end.do_handshake)
        async with trio.open_nursery() as nursery:  # one record each way, like a tunnel
            nursery.start_soon(client_end.send_all, b"x" * 100)
            nursery.start_soon(server_end.receive_some, 1000)
        ends.append(server_end)
    return ends


async def _many(count: int, make: Callable[[], object]) -> object:
    return [make() for _ in range(count)]


def _primitives() -> dict[str, _Make]:
    import h11
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    def key() -> bytes:
        return os.urandom(32)

    return {
        "trio task parked in sleep_forever()": lambda c, n: _park_tasks(c, n, trio.sleep_forever),
        "trio task parked 8 coroutine frames deeper": lambda c, n: _park_tasks(
            c, n, lambda: _nested(8)
        ),
        "trio task parked inside a cancel scope": lambda c, n: _park_tasks(c, n, _in_cancel_scope),
        "trio task parked inside its own nursery": lambda c, n: _park_tasks(c, n, _in_own_nursery),
        "trio.Lock": lambda c, n: _many(c, trio.Lock),
        "trio.Event": lambda c, n: _many(c, trio.Event),
        "socketpair as two trio.SocketStreams (per end)": lambda c, n: _socket_pairs(c // 2),
        "reader parked in SocketStream.receive_some (+ idle peer end)": lambda c, n: _readers(
            c // 2, n, direct=False
        ),
        "reader parked in wait_readable (+ idle peer end)": lambda c, n: _readers(
            c // 2, n, direct=True
        ),
        "h2 server connection, stock": lambda c, n: _many(c, lambda: _h2_server(False)),
        "h2 server connection, compact settings and HPACK tables": lambda c, n: _many(
            c, lambda: _h2_server(True)
        ),
        "ChaCha20Poly1305 object (native OpenSSL contexts)": lambda c, n: _many(
            c, lambda: ChaCha20Poly1305(key())
        ),
        "h11.Connection (the HTTP/1.1 front's parser)": lambda c, n: _many(
            c, lambda: h11.Connection(h11.SERVER)
        ),
        "trio.SSLStream server end after handshake": lambda c, n: _tls_server_ends(c // 8),
    }


#: Divisors: how many measured objects a primitive's ``count`` makes.
_PER_COUNT = {
    "socketpair as two trio.SocketStreams (per end)": 1,
    "reader parked in SocketStream.receive_some (+ idle peer end)": 2,
    "reader parked in wait_readable (+ idle peer end)": 2,
    "trio.SSLStream server end after handshake": 8,
}


async def _primitive_role(args: argparse.Namespace) -> dict[str, float]:
    """Measure one primitive in this fresh process: KiB per object."""
    make = _primitives()[args.primitive]
    count = args.primitive_count
    made = count // _PER_COUNT.get(args.primitive, 1)
    async with trio.open_nursery() as nursery:
        gc.collect()
        rss0 = _rss()
        if args.trace:
            tracemalloc.start(1)
        keep = await make(count, nursery)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] if args.trace else 0
        rss1 = _rss()
        nursery.cancel_scope.cancel()
    del keep
    return {"traced_kib": traced / made / 1024, "rss_kib": (rss1 - rss0) / made / 1024}


# -- orchestration -----------------------------------------------------------------------


def _run_child(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    command = [*_CHILD, *extra]
    done = subprocess.run(command, stdout=subprocess.PIPE, check=False, cwd=REPO)
    for line in done.stdout.decode().splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise RuntimeError(f"{' '.join(extra)}: no result (exit code {done.returncode})")


def _print_run(rss_run: dict[str, Any], trace_run: dict[str, Any]) -> None:
    tls = "TLS" if rss_run["tls"] else "plain TCP"
    print(
        f"\n== {rss_run['mode']}: {rss_run['connected']} idle connections ({tls}), "
        f"server RSS {rss_run['rss_total_mib']:.0f} MiB =="
    )
    if rss_run["failed"] or trace_run["failed"]:
        print(f"   !! {rss_run['failed']} / {trace_run['failed']} clients failed to connect")
    untraced = rss_run["rss_kib"] - trace_run["traced_kib"]
    print(
        f"  RSS per connection          {rss_run['rss_kib']:8.1f} KiB   (run without tracemalloc)"
    )
    print(f"  traced per connection       {trace_run['traced_kib']:8.1f} KiB   (tracemalloc run)")
    print(f"  untraced (RSS - traced)     {untraced:8.1f} KiB   (native libs, allocator slack)")
    print(f"  trio tasks per connection   {rss_run['tasks']:8.2f}")
    print(f"  GC objects per connection   {rss_run['gc_objects']:8.1f}")
    types = ", ".join(f"{name} {count:.1f}" for name, count in rss_run["gc_types"][:12])
    print(f"    by type: {types}")
    print("  traced KiB per connection, by category:")
    for name, kib in trace_run["categories"]:
        print(f"    {kib:8.2f}  {name}")
    print("  traced KiB per connection, by file:")
    for name, kib in trace_run["files"]:
        print(f"    {kib:8.2f}  {name}")
    print("  top allocation sites (KiB and blocks per connection):")
    for site, via, kib, blocks in trace_run["sites"]:
        via_text = f"   via {via}" if via and via != site else ""
        print(f"    {kib:7.2f} {blocks:6.1f}  {site}{via_text}")


def _orchestrate(args: argparse.Namespace) -> int:
    summary: list[tuple[str, int, bool, float, float]] = []
    if not args.primitives_only:
        modes = ["transport", "full"] if args.mode == "both" else [args.mode]
        for nodes in [int(x) for x in args.nodes.split(",") if x.strip()]:
            for mode in modes:
                common = [
                    "--role=server",
                    f"--mode={mode}",
                    f"--nodes={nodes}",
                    f"--warmup={args.warmup}",
                    f"--settle={args.settle}",
                    f"--top={args.top}",
                    f"--frames={args.frames}",
                    f"--concurrency={args.concurrency}",
                    f"--policy={args.policy}",
                    *(["--tls"] if args.tls else []),
                ]
                print(f"# {mode}, {nodes} nodes: RSS run ...", flush=True)
                rss_run = _run_child(args, common)
                print(f"# {mode}, {nodes} nodes: tracemalloc run ...", flush=True)
                trace_run = _run_child(args, [*common, "--trace"])
                _print_run(rss_run, trace_run)
                summary.append((mode, nodes, args.tls, rss_run["rss_kib"], trace_run["traced_kib"]))
    if args.primitives or args.primitives_only:
        print("\n== Python/library overheads, KiB per object (each in a fresh process) ==")
        print(f"  {'traced':>7} {'RSS':>7}")
        for name in _primitives():
            common = [
                "--role=primitive",
                f"--primitive={name}",
                f"--primitive-count={args.primitive_count}",
            ]
            traced = _run_child(args, [*common, "--trace"])["traced_kib"]
            rss = _run_child(args, common)["rss_kib"]
            print(f"  {traced:7.2f} {rss:7.2f}  {name}")
    if summary:
        print("\n== summary: KiB per idle connection ==")
        print(f"  {'mode':10} {'nodes':>6} {'TLS':>5} {'RSS':>8} {'traced':>8}")
        for mode, nodes, tls, rss, traced in summary:
            print(f"  {mode:10} {nodes:6d} {tls!s:>5} {rss:8.1f} {traced:8.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tailledger bench conn-memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", default="500,2000", help="comma-separated connection counts")
    parser.add_argument("--mode", choices=["transport", "full", "both"], default="transport")
    parser.add_argument("--tls", action="store_true", help="terminate TLS on the control port")
    parser.add_argument("--policy", choices=sorted(_POLICIES), default="deny-all",
                        help="the policy of --mode full (allow-all: every node sees every other)")
    parser.add_argument("--warmup", type=int, default=50, help="connections before the baseline")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before sampling")
    parser.add_argument("--top", type=int, default=30, help="allocation sites to list")
    parser.add_argument("--frames", type=int, default=10, help="tracemalloc traceback depth")
    parser.add_argument("--concurrency", type=int, default=32, help="clients connecting at once")
    parser.add_argument("--primitives", action="store_true", help="also measure Python overheads")
    parser.add_argument("--primitives-only", action="store_true")
    parser.add_argument("--primitive-count", type=int, default=4000)
    # Internal: the roles of the child processes.
    parser.add_argument("--role", choices=["orchestrator", "server", "clients", "primitive"],
                        default="orchestrator", help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--server-public", default="", help=argparse.SUPPRESS)
    parser.add_argument("--auth-key", default="", help=argparse.SUPPRESS)
    parser.add_argument("--primitive", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "orchestrator":
        return _orchestrate(args)
    if args.role == "clients":
        trio.run(_clients_role, args)
        return 0
    if args.role == "server":
        report = trio.run(_server_role, args)
    else:
        report = trio.run(_primitive_role, args)
    print("RESULT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
