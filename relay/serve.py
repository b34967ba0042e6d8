"""The relay's trio adapter: listeners, TLS, HTTP front, DERP streams, STUN, mesh links.

Role in the pipeline
--------------------
This module owns every socket, deadline and task of the relay; all decisions
are delegated to the sans-I/O pieces (:mod:`relay.http_front`,
:mod:`relay.derp.server`, :mod:`relay.stun`).  It is the one function the CLI
glue calls, :func:`serve_relay`, whether the relay runs embedded in
``tailledger serve`` or alone as ``tailledger relay``::

    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, config, authorizer)
        region = relay.derp_region(host_name="derp.example.com")  # for the DERP map
        ...
        relay.revoke(node_key)          # a node lost its authorization
        nursery.cancel_scope.cancel()   # shut everything down

Task layout (structured concurrency, rule 19)::

    serve_relay ─┬─ TCP listener(s) ── one task per connection
                 │                      ├─ TLS handshake + HTTP request (deadline)
                 │                      └─ DERP: reader task + writer task
                 ├─ STUN (serve_stun) ── one UDP socket per address family
                 ├─ keep-alive ticker and write-timeout watchdog (one each, for all clients)
                 └─ one task per mesh peer (reconnects forever) + its ForwardPacket pump

A DERP connection's reader never waits for anything but its own socket: it
hands each chunk to the core, which queues the packets on the destinations'
bounded queues.  Then, on plain TCP, the reader itself flushes those
destinations with one non-blocking ``write(2)`` each (most batches leave this
way, with no task switch); whatever the kernel does not take at once, and
everything on TLS or WebSocket streams, goes to the destination's writer task.
A writer that cannot finish a write within ``write_timeout`` gets its
connection closed by a watchdog (counted as write errors), like Tailscale's
2-second TCP write deadline.

Cancellation: cancelling the nursery that started :func:`serve_relay` closes
all listeners and connections; nothing outlives it.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket as _stdsocket
import ssl
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import h11
import msgspec
import trio

from .auth import Authorizer
from .certs import (
    TlsMaterial,
    generate_meta_cert,
    load_cert_files,
    load_or_create_self_signed,
    load_or_create_server_key,
    server_ssl_context,
)
from .client import DerpClient, connect_derp
from .derp import frames as f
from .derp.client import PeerGoneReceived, PeerPresentReceived
from .derp.server import (
    DEFAULT_QUEUE_DEPTH,
    DupPolicy,
    ForwardQueue,
    KeyLimitPolicy,
    RelayCore,
    RelayStats,
    ServerConn,
)
from .errors import ConfigError, NotStunError, RelayError, StunError
from .http_front import DerpUpgrade, PlainResponse, WebSocketUpgrade, route_request
from .keys import parse_private_key, public_key_of, short_key
from .stun import DEFAULT_STUN_PORT, binding_response, parse_binding_request
from .wsstream import WebSocketStream

if TYPE_CHECKING:
    from projections.derpmap import DERPNode, DERPRegion

__all__ = [
    "HttpStats",
    "IoStats",
    "MeshPeer",
    "RelayConfig",
    "RelayServer",
    "StunServer",
    "StunStats",
    "serve_relay",
    "serve_stun",
]

log = logging.getLogger("tailledger.relay")

_RECV_SIZE = 65536
_MAX_HTTP_HEAD = 16 << 10


class MeshPeer(msgspec.Struct, frozen=True, kw_only=True):
    """Another relay of the same region to mesh with.

    Attributes:
        url: its DERP URL, ``https://host:port/derp`` (or ``http://`` behind a proxy).
        cert_name: ``sha256-raw:<hex>`` pin when it uses a self-signed certificate.
        dial_host: address to connect to instead of the URL's host (e.g. a
            private VPC address), as ``derper --mesh-with host/dialhost`` does.
    """

    url: str
    cert_name: str | None = None
    dial_host: str | None = None


class RelayConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything :func:`serve_relay` needs.

    Attributes:
        data_dir: where the server key and the self-signed certificate live.
        listen_host: address for the DERP/HTTP(S) listener; ``None`` = all.
        listen_port: its port (443 in production; 0 picks a free one); ``None``: no
            listener of its own, connections are handed over by another server
            (:meth:`RelayServer.serve_handed_off`, the control port's ``/derp``).
        tls: ``"self-signed"`` (generated on first start, pinned via CertName),
            ``"files"`` (``cert_file`` + ``key_file``), or ``"off"`` (plain
            HTTP, for running behind a TLS-terminating proxy).
        cert_file: PEM certificate (leaf first, then chain) for ``tls="files"``.
        key_file: its PEM private key.
        hostnames: names and IP literals clients use to reach the relay; the
            self-signed certificate covers them and the first one becomes the
            DERP node's ``HostName``.
        stun: run the STUN server.
        stun_host: STUN bind address; ``None`` = all IPv4 and IPv6 addresses.
        stun_port: STUN UDP port (3478; 0 picks a free one).
        stun_required: a STUN port that cannot be bound stops the relay; when false
            the relay runs without STUN (a warning), for a default port that is taken.
        private_key: ``privkey:<hex>`` to use instead of the key file.
        mesh_key: the region's mesh key (64 hex digits); enables meshing.
        mesh_with: the other relays of the region.
        queue_depth: per-client packet queue bound.
        dup_policy: what to do when a node key is connected twice (see
            :class:`relay.derp.server.DupPolicy`).
        rate_limit: bytes per second one node key may send through the relay
            (SendPacket frames); 0 = unlimited.  Excess packets are dropped as
            ``rate_limited``.
        rate_burst: the rate bucket's size in bytes (at least one maximum-size
            frame, :data:`relay.derp.server.MIN_RATE_BURST`).
        max_conns_per_key: concurrent connections one node key may hold; 0 =
            unlimited.
        key_limit_policy: ``"close_oldest"`` (a newcomer beyond the cap closes
            the key's oldest connection) or ``"refuse_new"`` (it is refused);
            see :class:`relay.derp.server.KeyLimitPolicy`.
        write_timeout: seconds a write to one client may take before that client
            is disconnected; ``None`` disables it.
        handshake_timeout: seconds allowed for TLS + HTTP + DERP login.
        keepalive_interval: seconds between keep-alives (plus up to 5 s jitter).
        websocket: accept DERP over WebSocket.
        meta_cert: present the meta certificate that enables fast start.
        mesh_retry: seconds between mesh reconnection attempts.
    """

    data_dir: str
    listen_host: str | None = None
    listen_port: int | None = 443
    tls: Literal["self-signed", "files", "off"] = "self-signed"
    cert_file: str | None = None
    key_file: str | None = None
    hostnames: tuple[str, ...] = ()
    stun: bool = True
    stun_host: str | None = None
    stun_port: int = DEFAULT_STUN_PORT
    stun_required: bool = True
    private_key: str | None = None
    mesh_key: str | None = None
    mesh_with: tuple[MeshPeer, ...] = ()
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    dup_policy: Literal["last_writer_is_active", "disable_fighters"] = "last_writer_is_active"
    rate_limit: int = 0
    rate_burst: int = 0
    max_conns_per_key: int = 0
    key_limit_policy: Literal["close_oldest", "refuse_new"] = "close_oldest"
    write_timeout: float | None = 2.0
    handshake_timeout: float = 10.0
    keepalive_interval: float = f.KEEPALIVE_INTERVAL
    websocket: bool = True
    meta_cert: bool = True
    mesh_retry: float = 2.0


class HttpStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters of the relay's HTTP front door.

    Attributes:
        connections: TCP connections accepted.
        tls_failures: TLS handshakes that failed (a TLS error) or timed out.
        tls_abandoned: TLS handshakes the client gave up on (closed or reset the
            connection), e.g. a latency probe it no longer needed.
        requests: HTTP requests parsed.
        derp_upgrades: streams switched to DERP after a 101 response.
        derp_fast_start: streams switched to DERP with ``Derp-Fast-Start: 1``.
        websocket_upgrades: streams switched to DERP over WebSocket.
    """

    connections: int
    tls_failures: int
    tls_abandoned: int
    requests: int
    derp_upgrades: int
    derp_fast_start: int
    websocket_upgrades: int


class IoStats(msgspec.Struct, frozen=True, kw_only=True):
    """How the relay's DERP bytes moved (diagnostics for the hot path).

    Attributes:
        reads: chunks read from clients.
        direct_writes: batches written by the reader task right after routing.
        partial_writes: direct writes the kernel did not take whole (the rest
            went to the connection's writer task).
        task_writes: batches written by writer tasks.
        write_timeouts: connections closed by the write-timeout watchdog.
    """

    reads: int
    direct_writes: int
    partial_writes: int
    task_writes: int
    write_timeouts: int


class StunStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters of the STUN server."""

    requests: int
    responses: int
    not_stun: int
    malformed: int


class StunServer:
    """Handle returned by :func:`serve_stun` (via ``task_status``)."""

    def __init__(self) -> None:
        self.addresses: list[tuple[str, int]] = []
        self._requests = 0
        self._responses = 0
        self._not_stun = 0
        self._malformed = 0

    @property
    def port(self) -> int:
        """The UDP port actually bound (useful with ``port=0``)."""
        return self.addresses[0][1]

    def stats(self) -> StunStats:
        """Snapshot of the counters."""
        return StunStats(
            requests=self._requests,
            responses=self._responses,
            not_stun=self._not_stun,
            malformed=self._malformed,
        )

    def handle_datagram(self, data: bytes, ip: str, port: int) -> bytes | None:
        """Answer one datagram (pure apart from counting); ``None`` means stay silent."""
        try:
            txid = parse_binding_request(data)
        except NotStunError:
            self._not_stun += 1
            return None
        except StunError:
            self._malformed += 1
            return None
        self._requests += 1
        return binding_response(txid, ip, port)


async def _stun_loop(sock: trio.socket.SocketType, server: StunServer) -> None:
    while True:
        try:
            data, addr = await sock.recvfrom(2048)
        except OSError as exc:  # e.g. ICMP port unreachable surfacing on Linux
            if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                continue
            raise
        reply = server.handle_datagram(data, addr[0], addr[1])
        if reply is not None:
            try:
                await sock.sendto(reply, addr)
                server._responses += 1
            except OSError:
                continue


async def serve_stun(
    host: str | None = None,
    port: int = DEFAULT_STUN_PORT,
    *,
    task_status: trio.TaskStatus[StunServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer STUN binding requests on UDP until cancelled.

    Args:
        host: address to bind; ``None`` binds ``0.0.0.0`` and (if available)
            ``::`` with the same port.
        port: UDP port; 0 picks a free one (the IPv6 socket then reuses it).
        task_status: receives the :class:`StunServer` once the sockets are bound.
    """
    server = StunServer()
    socks: list[trio.socket.SocketType] = []
    try:
        if host is None:
            targets: list[tuple[int, str]] = [(_stdsocket.AF_INET, "0.0.0.0")]
            if _stdsocket.has_ipv6:
                targets.append((_stdsocket.AF_INET6, "::"))
        else:
            infos = await trio.socket.getaddrinfo(host, port, type=_stdsocket.SOCK_DGRAM)
            targets = [(infos[0][0], str(infos[0][4][0]))]
        bound_port = port
        for family, addr in targets:
            sock = trio.socket.socket(family, _stdsocket.SOCK_DGRAM)
            if family == _stdsocket.AF_INET6:
                sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 1)
            try:
                await sock.bind((addr, bound_port))
            except OSError:
                sock.close()
                if family == _stdsocket.AF_INET6 and host is None:
                    continue  # no IPv6 here; IPv4 alone is fine
                raise
            socks.append(sock)
            sockname = sock.getsockname()
            bound_port = int(sockname[1])
            server.addresses.append((str(sockname[0]), bound_port))
        async with trio.open_nursery() as nursery:
            for sock in socks:
                nursery.start_soon(_stun_loop, sock, server)
            task_status.started(server)
    finally:
        for sock in socks:
            sock.close()


class _Wakeup:
    """A level-triggered wake-up for one writer task, at the lowest cost trio allows.

    The core calls :meth:`set` (synchronously, from whichever task enqueued
    something); the writer awaits :meth:`wait`.  Parking uses
    ``wait_task_rescheduled`` directly: no Event object per wait, which matters
    because this happens once per batch of packets per connection.
    """

    __slots__ = ("_flag", "_task")

    def __init__(self) -> None:
        self._flag = False
        self._task: trio.lowlevel.Task | None = None

    def set(self) -> None:
        self._flag = True
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        if self._flag:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            self._task = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        self._flag = False


class _ConnIO:
    """The adapter's per-connection write state.

    Writes take one of two paths:

    * **Direct** (plain TCP only): after the reader task has handed a chunk to
      the core, it flushes every connection the chunk queued packets for with
      one non-blocking ``write(2)`` each, in the same task.  Most batches
      leave this way, without waking another task.  Whatever the kernel does
      not take right away becomes ``pending`` and goes to the writer task.
    * **Writer task**: sends ``pending`` and anything queued later, blocking
      as long as needed (bounded by the write-timeout watchdog).  While it
      owns the socket (``busy``) nobody writes directly, so bytes never
      interleave.

    The write-timeout watchdog reads ``started``: a per-write ``fail_after``
    would cost a cancel scope and a deadline registration per batch.
    """

    __slots__ = (
        "busy",
        "conn",
        "dirty",
        "fd",
        "packets",
        "pending",
        "scope",
        "started",
        "timed_out",
        "wake",
    )

    def __init__(self, conn: ServerConn, fd: int | None) -> None:
        self.conn = conn
        self.fd = fd  # set only for plain TCP sockets, the only ones we write directly
        self.wake = _Wakeup()
        self.scope = trio.CancelScope()
        self.busy = False
        self.dirty = False
        self.pending: memoryview | None = None
        self.packets = 0
        self.started: float | None = None
        self.timed_out = False


def _peer_of(stream: trio.abc.Stream) -> tuple[str, int] | None:
    inner: object = stream
    while isinstance(inner, trio.SSLStream | WebSocketStream):
        inner = inner.transport_stream if isinstance(inner, trio.SSLStream) else inner.transport
    if isinstance(inner, trio.SocketStream):
        try:
            name = inner.socket.getpeername()
        except OSError:
            return None
        if isinstance(name, tuple) and len(name) >= 2:
            return str(name[0]), int(name[1])
    return None


class RelayServer:
    """A running relay; returned by :func:`serve_relay` through ``task_status``.

    Attributes:
        config: the configuration it runs with.
        core: the sans-I/O relay core (for stats and tests).
        public_key: the relay's DERP public key.
        cert_name: ``sha256-raw:<hex>`` of the served certificate, ``None`` with TLS off.
        derp_port: the TCP port actually bound.
        stun: the STUN server handle, or ``None`` when STUN is disabled.
    """

    def __init__(
        self,
        config: RelayConfig,
        core: RelayCore,
        ssl_context: ssl.SSLContext | None,
        tls: TlsMaterial | None,
    ) -> None:
        self.config = config
        self.core = core
        self.public_key = core.public_key
        self.cert_name = tls.cert_name if tls is not None else None
        self._ssl = ssl_context
        self.derp_port = 0
        self.stun: StunServer | None = None
        self._nursery: trio.Nursery | None = None
        self._watches: set[_ConnIO] = set()
        self._dirty: list[_ConnIO] = []
        self._receiving = False
        self._io_counts = {k: 0 for k in IoStats.__struct_fields__}
        self._mesh_key: bytes | None = None
        self._http_counts = {k: 0 for k in HttpStats.__struct_fields__}

    # -- the API used by the embedding program --------------------------

    def revoke(self, node_key: bytes) -> int:
        """Disconnect every connection of ``node_key`` now; return how many.

        Call this when the event log says the node lost its authorization;
        the authorizer must already answer ``False`` for it, or the client
        simply reconnects.
        """
        return len(self.core.revoke(node_key))

    def reauthorize(self) -> int:
        """Re-check every connected client against the authorizer; return how many were closed."""
        return len(self.core.reauthorize())

    def add_mesh_peer(self, peer: MeshPeer) -> None:
        """Start a mesh link to ``peer`` now (in addition to ``config.mesh_with``).

        Useful when the region's relays learn of each other at run time.

        Raises:
            ConfigError: the relay has no mesh key.
            RuntimeError: the relay is not running.
        """
        if self._mesh_key is None:
            raise ConfigError("meshing needs a mesh_key")
        if self._nursery is None:
            raise RuntimeError("relay is not running")
        self._nursery.start_soon(self._mesh, peer, self._mesh_key)

    def stats(self) -> RelayStats:
        """Counters of the DERP core (drops by reason, packets, refusals...)."""
        return self.core.stats()

    def io_stats(self) -> IoStats:
        """Counters of reads and of the two write paths."""
        return IoStats(**self._io_counts)

    def http_stats(self) -> HttpStats:
        """Counters of the HTTP front door (upgrades by kind, TLS failures)."""
        return HttpStats(**self._http_counts)

    @property
    def url(self) -> str:
        """The DERP URL of this relay on the first configured host name."""
        scheme = "http" if self._ssl is None else "https"
        host = self.config.hostnames[0] if self.config.hostnames else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.derp_port}/derp"

    def derp_node(
        self,
        *,
        region_id: int = 999,
        host_name: str | None = None,
        ipv4: str | None = None,
        ipv6: str | None = None,
        name: str | None = None,
        public_derp_port: int | None = None,
        public_stun_port: int | None = None,
    ) -> DERPNode:
        """This relay as a DERP map node (see :func:`projections.derpmap.embedded_region`).

        Ports default to the ones actually bound; pass the public ones when a
        proxy or NAT sits in front.
        """
        region = self.derp_region(
            region_id=region_id,
            host_name=host_name,
            ipv4=ipv4,
            ipv6=ipv6,
            node_name=name,
            public_derp_port=public_derp_port,
            public_stun_port=public_stun_port,
        )
        assert region.nodes
        return region.nodes[0]

    def derp_region(
        self,
        *,
        region_id: int = 999,
        region_code: str = "tailledger",
        region_name: str = "tailledger embedded DERP",
        host_name: str | None = None,
        ipv4: str | None = None,
        ipv6: str | None = None,
        node_name: str | None = None,
        public_derp_port: int | None = None,
        public_stun_port: int | None = None,
    ) -> DERPRegion:
        """This relay as a one-node DERP region, ready for :func:`projections.derpmap.merge_derp_maps`.

        Host name defaults to the first configured host name, ports to the
        bound ones, CertName to the served certificate's pin when it is self-signed.
        """
        # Imported here so the relay runs even where projections is not importable.
        from projections.derpmap import embedded_region

        host = host_name or (self.config.hostnames[0] if self.config.hostnames else "127.0.0.1")
        stun_port = -1
        if self.stun is not None:
            stun_port = self.stun.port
        if public_stun_port is not None:
            stun_port = public_stun_port
        return embedded_region(
            region_id=region_id,
            region_code=region_code,
            region_name=region_name,
            host_name=host,
            derp_port=public_derp_port if public_derp_port is not None else self.derp_port,
            stun_port=stun_port,
            cert_name=self.cert_name if self.config.tls == "self-signed" else None,
            ipv4=ipv4,
            ipv6=ipv6,
            node_name=node_name,
        )

    # -- connection handling -------------------------------------------

    async def serve_handed_off(self, stream: trio.abc.Stream, tcp: trio.SocketStream) -> None:
        """Serve a connection another server accepted (the control port's ``/derp``).

        ``stream`` replays the first request from its first byte and is already inside
        TLS when the other server terminates TLS; this relay's own TLS is not used.
        ``tcp`` is the TCP stream under it (for the peer's address). Closes ``stream``.
        """
        await self._serve_connection(stream, _peer_of(tcp), tls=False, keep_alive=False)

    async def serve_handed_off_tls(self, stream: trio.abc.Stream, tcp: trio.SocketStream) -> None:
        """Like :meth:`serve_handed_off` for a connection that opens with a TLS
        ClientHello: terminate TLS with this relay's certificate, then serve DERP."""
        await self._serve_connection(stream, _peer_of(tcp), tls=self._ssl is not None, keep_alive=False)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        await self._serve_connection(tcp, _peer_of(tcp), tls=self._ssl is not None)

    async def _serve_connection(
        self, transport: trio.abc.Stream, remote: tuple[str, int] | None, *, tls: bool, keep_alive: bool = True
    ) -> None:
        """TLS (when ``tls``), then HTTP until a DERP upgrade. Without ``keep_alive``
        a plain answer closes the connection: a connection handed over by the control
        port must not go on to serve that port's other paths with the relay's 404s."""
        stream: trio.abc.Stream = transport
        counters = self._http_counts
        counters["connections"] += 1
        try:
            route: DerpUpgrade | WebSocketUpgrade | None = None
            trailing = b""
            with trio.move_on_after(self.config.handshake_timeout):
                if tls and self._ssl is not None:
                    stream = trio.SSLStream(transport, self._ssl, server_side=True)
                    try:
                        await stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        # trio wraps both: a TLS error, or the transport going away.
                        gone = not isinstance(exc.__cause__, ssl.SSLError) or isinstance(
                            exc.__cause__, ssl.SSLEOFError
                        )
                        counters["tls_abandoned" if gone else "tls_failures"] += 1
                        raise
                    except BaseException:
                        counters["tls_failures"] += 1
                        raise
                route, trailing = await self._http(stream, keep_alive=keep_alive)
            if route is None:
                return
            if isinstance(route, WebSocketUpgrade):
                counters["websocket_upgrades"] += 1
            elif route.response:
                counters["derp_upgrades"] += 1
            else:
                counters["derp_fast_start"] += 1
            if route.response:
                await stream.send_all(route.response)
            if isinstance(route, WebSocketUpgrade):
                stream = WebSocketStream(stream, client=False, trailing_data=trailing)
                trailing = b""
            await self._serve_derp(stream, trailing, remote, route.ideal_node)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
            ssl.SSLError,
            OSError,
        ) as exc:
            log.debug("relay: connection from %s ended: %r", remote, exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def _http(
        self, stream: trio.abc.Stream, *, keep_alive: bool = True
    ) -> tuple[DerpUpgrade | WebSocketUpgrade | None, bytes]:
        """Serve HTTP requests until one upgrades to DERP or the client leaves."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HTTP_HEAD)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_RECV_SIZE)
                conn.receive_data(bytes(data))
                if not data and conn.their_state is not h11.DONE:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                self._http_counts["requests"] += 1
                route = route_request(
                    event.method,
                    event.target,
                    list(event.headers),
                    server_public=self.public_key,
                    websocket=self.config.websocket,
                )
                if not isinstance(route, PlainResponse):
                    return route, conn.trailing_data[0]
                head_only = event.method == b"HEAD"
                if not keep_alive:
                    route = msgspec.structs.replace(route, headers=[*route.headers, (b"Connection", b"close")])
                await self._respond(stream, conn, route, head_only)
                continue
            if isinstance(event, h11.EndOfMessage | h11.Data):
                continue
            if event is h11.PAUSED:
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return None, b""
                conn.start_next_cycle()
                continue
            return None, b""  # ConnectionClosed and anything unexpected

    async def _respond(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        route: PlainResponse,
        head_only: bool,
    ) -> None:
        headers = [*route.headers]
        body = b"" if route.status in (204, 304) else route.body
        if route.status not in (204, 304):
            headers.append((b"Content-Length", str(len(body)).encode()))
        out = conn.send(h11.Response(status_code=route.status, headers=headers)) or b""
        if body and not head_only:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)

    async def _serve_derp(
        self,
        stream: trio.abc.Stream,
        initial: bytes,
        remote: tuple[str, int] | None,
        ideal_node: str | None,
    ) -> None:
        core = self.core
        conn = core.accept(remote, ideal_node=ideal_node)
        fd = stream.socket.fileno() if type(stream) is trio.SocketStream else None
        io = _ConnIO(conn, fd)
        conn.waker = partial(self._on_wake, io)
        io.wake.set()  # the ServerKey frame is already queued
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream, io, nursery.cancel_scope)
                await self._reader(stream, conn, initial)
                nursery.cancel_scope.cancel()
        finally:
            if not conn.closed:
                core.connection_lost(conn, "stream ended")
            if conn.close_reason and conn.key is not None:
                log.info("relay: %s %s closed: %s", remote, short_key(conn.key), conn.close_reason)

    def _on_wake(self, io: _ConnIO) -> None:
        """The core queued bytes for (or closed) ``io.conn``.

        Inside a reader's ``receive_data`` the flush is deferred to
        :meth:`_flush_dirty` so that one chunk's packets leave in one write;
        anywhere else (keep-alives, revocation, mesh) the writer task is woken.
        """
        if self._receiving and io.fd is not None and not io.busy:
            if not io.dirty:
                io.dirty = True
                self._dirty.append(io)
        else:
            io.wake.set()

    def _flush_dirty(self) -> None:
        """Write what the last chunk queued, directly, without blocking (see :class:`_ConnIO`)."""
        dirty, self._dirty = self._dirty, []
        core = self.core
        counts = self._io_counts
        for io in dirty:
            io.dirty = False
            conn = io.conn
            if io.busy or conn.closed or io.fd is None:
                io.wake.set()
                continue
            data, packets = core.take_outgoing(conn)
            if not data:
                continue
            counts["direct_writes"] += 1
            try:
                sent = os.write(io.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                core.write_failed(conn, packets, len(data))
                io.wake.set()
                continue
            if sent < len(data):
                counts["partial_writes"] += 1
                io.pending = memoryview(data)[sent:]
                io.packets = packets
                io.busy = True
                io.wake.set()

    async def _reader(self, stream: trio.abc.Stream, conn: ServerConn, initial: bytes) -> None:
        core = self.core
        if initial:
            core.receive_data(conn, initial)
        with trio.move_on_after(self.config.handshake_timeout) as login_scope:
            while conn.state is conn.state.LOGIN:
                data = await stream.receive_some(_RECV_SIZE)
                if not data:
                    core.connection_lost(conn, "EOF during login")
                    return
                core.receive_data(conn, data)
        if login_scope.cancelled_caught:
            core.close(conn, "login timeout")
            return
        receive_data = core.receive_data
        counts = self._io_counts
        while not conn.closed:
            try:
                data = await stream.receive_some(_RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                core.connection_lost(conn, "read error")
                return
            if not data:
                core.connection_lost(conn, "EOF")
                return
            counts["reads"] += 1
            self._receiving = True
            try:
                receive_data(conn, data)
            finally:
                self._receiving = False
            if self._dirty:
                self._flush_dirty()

    async def _writer(self, stream: trio.abc.Stream, io: _ConnIO, scope: trio.CancelScope) -> None:
        core = self.core
        conn = io.conn
        watching = self.config.write_timeout is not None
        if watching:
            self._watches.add(io)
        nbytes = 0
        try:
            with io.scope:
                while True:
                    await io.wake.wait()
                    if io.pending is not None:
                        data: bytes | memoryview = io.pending
                        packets = io.packets
                        io.pending = None
                    else:
                        data, packets = core.take_outgoing(conn)
                    if data:
                        self._io_counts["task_writes"] += 1
                        io.busy = True
                        nbytes = len(data)
                        io.packets = packets
                        if watching:
                            io.started = trio.current_time()
                        try:
                            await stream.send_all(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            core.write_failed(conn, packets, nbytes)
                            return
                        io.started = None
                        io.busy = False
                    if conn.closed:
                        return
            if io.timed_out:
                self._io_counts["write_timeouts"] += 1
                core.write_failed(conn, io.packets, nbytes)
        finally:
            self._watches.discard(io)
            scope.cancel()

    async def _write_watchdog(self, limit_seconds: float) -> None:
        """Close connections whose current write has taken longer than ``limit_seconds``."""
        while True:
            await trio.sleep(min(1.0, limit_seconds / 4))
            limit = trio.current_time() - limit_seconds
            for watch in list(self._watches):
                started = watch.started
                if started is not None and started < limit:
                    watch.timed_out = True
                    watch.scope.cancel()

    async def _keepalive(self) -> None:
        while True:
            # Tailscale: every 60 s plus up to 5 s of jitter; keep that ratio.
            await trio.sleep(self.config.keepalive_interval * random.uniform(1.0, 1.0 + 1 / 12))
            self.core.keepalive()

    async def _mesh_pump(self, client: DerpClient, fwd: ForwardQueue) -> None:
        """Write packets queued for a mesh peer as ForwardPacket frames."""
        wake = _Wakeup()
        fwd.waker = wake.set
        while True:
            await wake.wait()
            data = fwd.take()
            if data:
                await client.send_raw(data)

    async def _mesh(self, peer: MeshPeer, mesh_key: bytes) -> None:
        """Keep one watch+forward link to ``peer`` alive, forever."""
        while True:
            fwd = ForwardQueue(peer.url, depth=4 * self.config.queue_depth)
            try:
                client = await connect_derp(
                    peer.url,
                    self.core.private_key,
                    cert_name=peer.cert_name,
                    dial_host=peer.dial_host,
                    mesh_key=mesh_key,
                    connect_timeout=self.config.handshake_timeout,
                )
            except (OSError, RelayError, trio.TooSlowError) as exc:
                log.warning("relay: mesh %s: connect failed: %r", peer.url, exc)
                await trio.sleep(self.config.mesh_retry)
                continue
            if client.server_public == self.public_key:
                log.info("relay: mesh %s is ourselves; not meshing with it", peer.url)
                await client.aclose()
                return
            log.info("relay: mesh link to %s up", peer.url)
            try:
                async with client, trio.open_nursery() as nursery:
                    nursery.start_soon(self._mesh_pump, client, fwd)
                    await client.watch_conns()
                    while True:
                        event = await client.recv()
                        if isinstance(event, PeerPresentReceived):
                            self.core.add_forwarder(event.present.key, fwd)
                        elif isinstance(event, PeerGoneReceived):
                            self.core.remove_forwarder(event.peer, fwd)
            except* (
                OSError,
                RelayError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ) as group:
                # The nursery wraps the reader's or the pump's error in a group.
                log.warning("relay: mesh link to %s broke: %r", peer.url, group.exceptions[0])
            finally:
                fwd.close()
                self.core.remove_forwarder_everywhere(fwd)
            await trio.sleep(self.config.mesh_retry)


def _load_identity(config: RelayConfig) -> tuple[bytes, TlsMaterial | None, ssl.SSLContext | None]:
    """Blocking startup work: keys and certificates (run in a worker thread)."""
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    if config.private_key is not None:
        private_key = parse_private_key(config.private_key)
    else:
        private_key = load_or_create_server_key(config.data_dir)
    material: TlsMaterial | None = None
    ctx: ssl.SSLContext | None = None
    if config.tls == "self-signed":
        material = load_or_create_self_signed(config.data_dir, config.hostnames)
    elif config.tls == "files":
        if config.cert_file is None or config.key_file is None:
            raise ConfigError('tls="files" needs cert_file and key_file')
        material = load_cert_files(config.cert_file, config.key_file)
    if material is not None:
        meta = generate_meta_cert(public_key_of(private_key)) if config.meta_cert else None
        ctx = server_ssl_context(material, config.data_dir, meta_cert_pem=meta)
    return private_key, material, ctx


def _parse_mesh_key(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise ConfigError("mesh key must be 64 hexadecimal digits") from exc
    if len(key) != 32:
        raise ConfigError("mesh key must be 64 hexadecimal digits")
    return key


async def serve_relay(
    config: RelayConfig,
    authorizer: Authorizer,
    *,
    log_line: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[RelayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the DERP relay (and its STUN server and mesh links) until cancelled.

    Args:
        config: listener, TLS, STUN and mesh settings.
        authorizer: who may connect; consulted at every login.
        log_line: receives the core's event lines (refusals, protocol errors,
            revocations); defaults to the ``tailledger.relay`` logger.
        task_status: receives the :class:`RelayServer` once every listener is
            bound, so ``await nursery.start(serve_relay, ...)`` returns a relay
            that accepts connections.

    Raises:
        ConfigError: unusable keys, certificates, mesh settings or limits.
        OSError: a port could not be bound.

    Cancellation: cancelling closes every listener and connection; the
    function returns only by raising ``trio.Cancelled`` or an error.
    """
    mesh_key = _parse_mesh_key(config.mesh_key)
    if config.mesh_with and mesh_key is None:
        raise ConfigError("mesh_with needs a mesh_key")
    private_key, material, ctx = await trio.to_thread.run_sync(_load_identity, config)
    try:
        core = RelayCore(
            private_key,
            authorizer,
            mesh_key=mesh_key,
            queue_depth=config.queue_depth,
            dup_policy=DupPolicy(config.dup_policy),
            rate_limit=config.rate_limit,
            rate_burst=config.rate_burst,
            max_conns_per_key=config.max_conns_per_key,
            key_limit_policy=KeyLimitPolicy(config.key_limit_policy),
            clock=trio.current_time,
            log=log_line or log.info,
        )
    except ValueError as exc:  # out-of-range limits: the core says which
        raise ConfigError(str(exc)) from None
    server = RelayServer(config, core, ctx, material)
    listeners: list[trio.SocketListener] = []
    if config.listen_port is not None:
        listeners = await trio.open_tcp_listeners(config.listen_port, host=config.listen_host)
        server.derp_port = int(listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as nursery:
        server._nursery = nursery
        server._mesh_key = mesh_key
        if config.stun:
            try:
                server.stun = await nursery.start(serve_stun, config.stun_host, config.stun_port)
            except OSError as exc:
                if config.stun_required:
                    raise
                log.warning(
                    "relay: STUN NOT served: UDP port %d is taken (%s); clients of this relay learn "
                    "no public address (set derp.server.stun_listen_addr to a free one)",
                    config.stun_port, exc.strerror or exc,
                )
        nursery.start_soon(server._keepalive)
        if config.write_timeout is not None:
            nursery.start_soon(server._write_watchdog, config.write_timeout)
        for peer in config.mesh_with:
            server.add_mesh_peer(peer)
        if listeners:
            await nursery.start(trio.serve_listeners, server._handle, listeners)
        log.info(
            "relay: DERP on %s (%s), key %s%s",
            f"port {server.derp_port}" if listeners else "the control port",
            "plain HTTP" if ctx is None else "TLS",
            short_key(server.public_key),
            "" if server.stun is None else f", STUN on port {server.stun.port}",
        )
        task_status.started(server)
