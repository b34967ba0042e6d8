"""Trio adapter of the control port: ``/key``, ``/ts2021`` and hypercorn on one socket.

Role in the pipeline: owns the listening sockets, the per-connection tasks,
deadlines and the hypercorn hand-off. All protocol decisions are made by the
sans-I/O cores: :class:`protocol.upgrade.FrontConnection` (HTTP/1.1 front),
:class:`protocol.h2_bridge.ServerConnection` (Noise + HTTP/2). Per accepted
connection::

    [TLS handshake]                      (only with ssl_context)
    FrontConnection: read request heads
      GET /key?v=N         -> answer, keep reading (keep-alive)
      /ts2021 native       -> 101 + Noise + early payload + HTTP/2  -> ControlHandler
      /ts2021 WebSocket    -> 101 + WebSocket framing + Noise + HTTP/2 -> ControlHandler
      /derp, /derp/probe…  -> the embedded DERP relay (with a DerpRoute)
      anything else        -> hypercorn serves the ASGI app on this connection
    A TLS ClientHello on a port without ssl_context -> the relay's own TLS (DerpRoute.serve_tls)

Sharing the port with hypercorn -- the choice and why
------------------------------------------------------
ASGI has no way to hijack a socket for a custom ``Upgrade``, so ``/ts2021``
cannot live inside the ASGI app (control-protocol.md §5.2). Options were (a) a
reverse proxy in front, (b) a second port, (c) our own listener that peeks at
the first request and hands every other connection to hypercorn. We do (c)
with hypercorn's own trio connection driver,
``hypercorn.trio.tcp_server.TCPServer(app, config, context, state, stream)``:
it is what ``hypercorn.trio.run.worker_serve`` spawns per accepted stream, so
the ASGI app gets hypercorn's HTTP/1.1, h2c-prior-knowledge, WebSocket,
keep-alive and timeout handling unchanged. The bytes the front already read
are replayed by :class:`_ReplayStream`, which also provides the attributes
``TCPServer`` probes: ``socket`` for plain TCP, or ``do_handshake``,
``selected_alpn_protocol`` and ``transport_stream`` for TLS (then hypercorn
sets ``scheme = https``). We also run hypercorn's ``Lifespan`` (startup and
shutdown of the Quart app) and its ``WorkerContext``, as ``worker_serve``
does. TLS connections that negotiate ALPN ``h2`` go to hypercorn directly
(Tailscale's ``/ts2021`` TLS fallback disables ALPN). Tested against
hypercorn 0.18 (``tests/protocol/test_serve.py`` covers the hand-off, TLS and
keep-alive); these are hypercorn internals, imported from :mod:`protocol.compat`
(item 6), which pins the minor version.

A connection handed to hypercorn stays there; if a later request on it asks
for ``/key`` the ASGI shim :func:`with_key_endpoint` answers it, so ``/key``
works on every connection.

Memory per connection: a node keeps its tunnel open for days and is idle
nearly all the time, so what an idle tunnel holds is the server's cost per
node (``cli/bench/conn_memory.py`` measures it by allocation site).
The set-up (the HTTP/1.1 front, the handshake) returns before the session
runs, so none of it stays alive; a session is one reader task parked in
``wait_readable`` on plain TCP, plus one task per open stream (the map long
poll) in the server's connection nursery; the send lock and the
flow-control event exist only while used. The cores trim ``h2``, HPACK and
Noise state (:mod:`protocol.h2flow`, :mod:`protocol.h2_bridge`,
:mod:`protocol.noise.transport`). Measured at 5,000 idle nodes: ~13 KiB of
RSS per plain-TCP tunnel; TLS adds ~20 KiB, most of it OpenSSL's own state.

Error handling: a peer's garbage (:class:`~protocol.errors.RemoteProtocolError`)
closes only that connection, with an INFO log line naming the reason. Our own
bugs (handler exceptions, :class:`~protocol.errors.LocalProtocolError`) are
logged with a traceback; handler failures become a 500 or a stream reset. No
per-connection failure can take the listener down.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import os
import select
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Final, cast

import h2.errors
import trio
from hypercorn.config import Config as HypercornConfig

from wire.sockets import peer_address, peer_name
from wire.wsstream import WebSocketStream

from . import h2_bridge, h2flow, upgrade
from .compat import ASGIWrapper, BusyAwareTCPServer, ConnectionState, Lifespan, WorkerContext
from .errors import HandshakeError, ProtocolError, RemoteProtocolError
from .handler import ControlHandler, NoiseRequest, NoiseResponse, Park
from .noise import Keypair, encode_error

__all__ = [
    "LOOPBACK_NETWORKS",
    "REFUSAL_REASONS",
    "SLOW_READER_KINDS",
    "TIMEOUT_KINDS",
    "ASGIApp",
    "ConnectionStats",
    "ControlServer",
    "DerpRoute",
    "ServeOptions",
    "load_ssl_context",
    "serve_control",
    "with_key_endpoint",
]

log = logging.getLogger(__name__)

#: Any ASGI 3 application (a Quart-trio app, a bare coroutine function ...).
ASGIApp = Callable[..., Awaitable[None]]

_MAX_RECV: Final = 65536
#: Writes go out in pieces of this size; each must be taken within write_timeout.
_WRITE_PIECE: Final = 65536
#: accept(2) errors that mean "overloaded, retry soon" (as trio.serve_listeners).
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)


#: Addresses whose connections only the global cap limits: a reverse proxy on
#: this host (every client then comes from its address) and local tools.
LOOPBACK_NETWORKS: Final = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


#: The request paths of a DERP relay (Tailscale's derper serves the same set).
DERP_PATHS: Final = frozenset({"/derp", "/derp/probe", "/derp/latency-check", "/generate_204"})

#: First byte of a TLS record carrying a handshake (a ClientHello); no HTTP method starts so.
_TLS_HANDSHAKE_RECORD: Final = 0x16


@dataclass(frozen=True)
class DerpRoute:
    """The embedded DERP relay, served on the control port (as Headscale serves ``/derp``).

    The control port stays ignorant of DERP: it only hands connections over.

    Attributes:
        serve_http: Serves a connection whose first request is for one of
            :data:`DERP_PATHS` (replayed from its first byte; already inside TLS when
            the control port terminates TLS). Takes the stream and the TCP stream
            under it (for the peer's address).
        serve_tls: On a control port *without* TLS: serves a connection that opens
            with a TLS ClientHello (replayed) by terminating TLS with the relay's own
            certificate (self-signed, pinned by ``CertName`` in the DERP map) and then
            serving DERP. ``None``: such connections go to hypercorn as before.
    """

    serve_http: Callable[[trio.abc.Stream, trio.SocketStream], Awaitable[None]]
    serve_tls: Callable[[trio.abc.Stream, trio.SocketStream], Awaitable[None]] | None = None


@dataclass(frozen=True)
class ServeOptions:
    """Tunables of :func:`serve_control`.

    Attributes:
        max_body_size: Cap on request bodies inside the tunnel (Headscale: 1 MiB).
        head_timeout: Seconds to receive one *whole* HTTP/1.1 request head on
            the front (slowloris guard: the deadline is set when the request
            starts, not renewed by each read); also how long a kept-alive
            front connection may wait for its next request.
        body_timeout: Seconds to receive a request body once its head
            arrived: inside the tunnel per HTTP/2 stream (the stream is then
            answered 408 and reset), and on hypercorn connections for a whole
            request (the connection is then closed).
        tunnel_idle_timeout: Seconds a Noise tunnel may stay with no request
            being handled and no long poll open (then GOAWAY and close). A
            node's map long poll counts as open, however quiet.
        write_timeout: Seconds a connection may make no progress taking what
            we send (socket writes, or HTTP/2 flow-control window for a
            response) before it is closed as a slow reader.
        max_outgoing_buffer: Cap on the bytes held for one connection that
            the peer has not taken yet (queued for window, framed, or
            written only in part); above it the connection is closed as a
            slow reader. Must exceed the largest full map.
        max_connections: Connections open at once (all kinds); more are
            closed as soon as they are accepted.
        max_connections_per_address: Connections open at once from one
            address (IPv6: one /64); ``cap_exempt`` addresses are not counted.
        cap_exempt: Networks the per-address cap ignores (default loopback:
            a reverse proxy on this host).
        tls_handshake_timeout: Seconds for the TLS handshake.
        min_protocol_version: Close tunnels of clients below this capability
            version right after the handshake, like Headscale's early-noise
            check (it uses 113). 0 disables the check.
        send_early_payload: Send the ``nodeKeyChallenge`` early payload on
            native upgrades (never on WebSocket ones, as Go).
        max_concurrent_streams: ``SETTINGS_MAX_CONCURRENT_STREAMS``.
        max_buffered_bodies: Cap on incomplete request-body bytes buffered
            per connection (memory bound against half-sent bodies).
        challenge_source: Returns the per-connection ``nodeKeyChallenge``
            public key (32 bytes; its private half is never needed). Inject
            for deterministic tests (style rule 13).
        hypercorn_config: Config for the hand-off; ``None`` = defaults.
        stream_close_timeout: Seconds granted to a streaming response's
            ``aclose()`` after a reset or disconnect.
    """

    max_body_size: int = h2_bridge.DEFAULT_MAX_BODY_SIZE
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    tunnel_idle_timeout: float = 180.0
    write_timeout: float = 30.0
    max_outgoing_buffer: int = 16 << 20
    max_connections: int = 10_000
    max_connections_per_address: int = 512
    cap_exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = LOOPBACK_NETWORKS
    tls_handshake_timeout: float = 10.0
    min_protocol_version: int = 0
    send_early_payload: bool = True
    max_concurrent_streams: int = h2_bridge.DEFAULT_MAX_CONCURRENT_STREAMS
    max_buffered_bodies: int = h2_bridge.DEFAULT_MAX_BUFFERED_BODIES
    challenge_source: Callable[[], bytes] = field(default=lambda: Keypair.generate().public)
    hypercorn_config: HypercornConfig | None = field(default=None, compare=False)
    stream_close_timeout: float = 5.0


#: Why a connection was refused at accept (``ConnectionStats.refused``).
REFUSAL_REASONS: Final = ("max_connections", "max_connections_per_address")
#: Which deadline closed something (``ConnectionStats.timeouts``).
TIMEOUT_KINDS: Final = (
    "tls_handshake",  # the TLS handshake took too long
    "head",  # a request head did not arrive whole in time (slowloris)
    "keepalive",  # a kept-alive front connection sent no next request in time
    "body",  # a request body inside the tunnel stalled (stream answered 408)
    "http_body",  # a request on a hypercorn connection stalled (connection closed)
    "tunnel_idle",  # a tunnel had nothing open for tunnel_idle_timeout
)
#: How a slow reader was detected (``ConnectionStats.slow_readers``).
SLOW_READER_KINDS: Final = (
    "buffer",  # its outgoing buffer exceeded max_outgoing_buffer
    "write_stall",  # the socket took nothing for write_timeout
    "window_stall",  # it gave no flow-control window for write_timeout
)


class ConnectionStats:
    """Counters of the control port, read by ``/metrics`` (:mod:`cli.web`).

    Attributes:
        accepted: Connections accepted and admitted.
        open: Connections open now (admitted, not yet closed).
        refused: Connections closed at accept, by reason (:data:`REFUSAL_REASONS`).
        timeouts: Deadlines that fired, by kind (:data:`TIMEOUT_KINDS`).
        slow_readers: Connections closed as slow readers (:data:`SLOW_READER_KINDS`).
    """

    __slots__ = ("accepted", "open", "refused", "slow_readers", "timeouts")

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self.timeouts = dict.fromkeys(TIMEOUT_KINDS, 0)
        self.slow_readers = dict.fromkeys(SLOW_READER_KINDS, 0)


class _Admitted:
    """One admitted connection's place in the counts; given back once, on close."""

    __slots__ = ("_key", "_table")

    def __init__(self, table: _Admission, key: str | None) -> None:
        self._table: _Admission | None = table
        self._key = key

    def release(self) -> None:
        table, self._table = self._table, None
        if table is not None:
            table.release(self._key)


class _Admission:
    """The connection caps: how many are open, in total and per address."""

    __slots__ = ("_by_address", "_exempt", "_last_warning", "_options", "_stats")

    #: Seconds between two warnings about refused connections.
    _WARN_EVERY: Final = 60.0

    def __init__(self, options: ServeOptions, stats: ConnectionStats) -> None:
        self._options = options
        self._stats = stats
        self._by_address: dict[str, int] = {}
        self._exempt = options.cap_exempt
        self._last_warning = -math.inf

    def address_key(self, sockaddr: object) -> str | None:
        """What the per-address cap counts: the IPv4 address or the IPv6 /64;
        ``None`` for exempt addresses and non-IP sockets."""
        if not isinstance(sockaddr, tuple) or not sockaddr:
            return None
        try:
            ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self._exempt):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def admit(self, sockaddr: object) -> _Admitted | str:
        """Count a new connection in, or return why it is refused."""
        opts, stats = self._options, self._stats
        if stats.open >= opts.max_connections:
            return self._refuse("max_connections", sockaddr)
        key = self.address_key(sockaddr)
        if key is not None:
            if self._by_address.get(key, 0) >= opts.max_connections_per_address:
                return self._refuse("max_connections_per_address", sockaddr)
            self._by_address[key] = self._by_address.get(key, 0) + 1
        stats.open += 1
        stats.accepted += 1
        return _Admitted(self, key)

    def release(self, key: str | None) -> None:
        self._stats.open -= 1
        if key is not None:
            left = self._by_address.pop(key) - 1
            if left:
                self._by_address[key] = left

    def _refuse(self, reason: str, sockaddr: object) -> str:
        self._stats.refused[reason] += 1
        now = trio.current_time()
        if now - self._last_warning >= self._WARN_EVERY:
            self._last_warning = now
            log.warning(
                "refusing connections (%s reached, e.g. from %s); %d refused so far",
                reason,
                sockaddr[0] if isinstance(sockaddr, tuple) and sockaddr else "?",
                sum(self._stats.refused.values()),
            )
        return reason


def load_ssl_context(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    *,
    alpn: tuple[str, ...] = ("h2", "http/1.1"),
) -> ssl.SSLContext:
    """Build the server TLS context for :func:`serve_control` from PEM files.

    With ``h2`` in ``alpn``, browsers (and Go's ``/key`` fetch) may negotiate
    HTTP/2, which hypercorn then serves directly; Tailscale's ``/ts2021``
    TLS fallback offers no ALPN and stays on HTTP/1.1, as the upgrade needs.

    Raises:
        OSError, ssl.SSLError: Unreadable or mismatched files.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def with_key_endpoint(app: ASGIApp, server_public: bytes) -> ASGIApp:
    """Wrap an ASGI app so that ``GET /key`` is answered on hypercorn connections too.

    Same answers as the front: 400 without an integer ``v``, an empty 200 for
    ``v < 39``, else the JSON key document.
    """
    body = upgrade.key_response_body(server_public)

    async def key_shim(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != upgrade.KEY_PATH:
            await app(scope, receive, send)
            return
        if scope.get("method") != "GET":
            await app(scope, receive, send)
            return
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        status, payload, ctype = 400, b"missing or invalid v parameter\n", b"text/plain"
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "v":
                try:
                    version = int(value)
                except ValueError:
                    break
                if version < upgrade.NOISE_CAPABILITY_VERSION:
                    status, payload, ctype = 200, b"", b"text/plain"
                else:
                    status, payload, ctype = 200, body, b"application/json"
                break
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", ctype),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return key_shim


class _HandOffGuard:
    """The deadlines of a connection served by hypercorn.

    hypercorn bounds the wait for a request head (its keep-alive timer runs
    until a head is complete) but, with its default ``read_timeout=None``,
    not a request in progress: a client that sent a head and then stalls its
    body would hold the connection forever. :class:`~protocol.compat.BusyAwareTCPServer`
    tells this guard when hypercorn's protocol goes busy (a request head arrived) and
    idle again (the response went out); reads while busy share one deadline,
    ``body_timeout`` after the head, so a body trickled byte by byte does not
    renew it. Writes that take nothing for ``write_timeout`` fail (hypercorn
    shields its writes, so a peer that never reads would otherwise keep
    the task forever).
    """

    __slots__ = ("_options", "_peer", "_stats", "deadline")

    def __init__(self, options: ServeOptions, stats: ConnectionStats, peer: str) -> None:
        self._options = options
        self._stats = stats
        self._peer = peer
        self.deadline = math.inf

    def request_active(self, active: bool) -> None:
        """hypercorn's protocol went busy (a request started) or idle."""
        if not active:
            self.deadline = math.inf
        elif self.deadline == math.inf:
            self.deadline = trio.current_time() + self._options.body_timeout

    async def receive(
        self, receive: Callable[[int | None], Awaitable[bytes | bytearray]], max_bytes: int | None
    ) -> bytes:
        """``receive(max_bytes)`` before the deadline, else ``trio.TooSlowError``
        (hypercorn's reader takes that as the end of the connection)."""
        try:
            with trio.fail_at(self.deadline):
                return bytes(await receive(max_bytes))
        except trio.TooSlowError:
            self._stats.timeouts["http_body"] += 1
            log.info("%s: request not received in time, closing", self._peer)
            raise

    async def send(
        self,
        send: Callable[[bytes | bytearray | memoryview], Awaitable[None]],
        data: bytes | bytearray | memoryview,
    ) -> None:
        """``send(data)``; ``trio.BrokenResourceError`` if the peer takes nothing
        for ``write_timeout`` (hypercorn then closes the connection)."""
        with trio.move_on_after(self._options.write_timeout) as stall:
            await send(data)
        if stall.cancelled_caught:
            self._stats.slow_readers["write_stall"] += 1
            log.info("%s: slow reader: nothing written for %gs, closing", self._peer, self._options.write_timeout)
            raise trio.BrokenResourceError("slow reader")


class _ReplayStream(trio.abc.HalfCloseableStream):
    """A plain TCP stream that first returns bytes already read (for hypercorn),
    reading and writing under a :class:`_HandOffGuard`."""

    def __init__(self, stream: trio.SocketStream, replay: bytes, guard: _HandOffGuard) -> None:
        self._stream = stream
        self._replay = replay
        self._guard = guard

    @property
    def socket(self) -> trio.socket.SocketType:
        """The socket; hypercorn reads the peer and local addresses from it."""
        return self._stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return the replayed bytes once (whole), then read the socket.

        The replay may exceed ``max_bytes``; hypercorn reads with 64 KiB
        and the front never holds more than one request head.
        """
        if self._replay:
            data, self._replay = self._replay, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._guard.receive(self._stream.receive_some, max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Delegate (with the write deadline)."""
        await self._guard.send(self._stream.send_all, data)

    async def wait_send_all_might_not_block(self) -> None:
        """Delegate."""
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Delegate (hypercorn half-closes plain TCP after a response)."""
        await self._stream.send_eof()

    async def aclose(self) -> None:
        """Delegate."""
        await self._stream.aclose()


class _ReplaySSLStream(trio.abc.Stream):
    """The TLS twin of :class:`_ReplayStream` (the TLS handshake is already done)."""

    def __init__(
        self, stream: trio.SSLStream[trio.SocketStream], replay: bytes, guard: _HandOffGuard
    ) -> None:
        self._stream = stream
        self._replay = replay
        self._guard = guard

    @property
    def transport_stream(self) -> trio.SocketStream:
        """The TCP stream under TLS (hypercorn reads ``.socket`` from it)."""
        return self._stream.transport_stream

    async def do_handshake(self) -> None:
        """Delegate; returns at once because the handshake is already done."""
        await self._stream.do_handshake()

    def selected_alpn_protocol(self) -> str | None:
        """The negotiated ALPN protocol (``None`` or ``http/1.1`` here)."""
        alpn: str | None = self._stream.selected_alpn_protocol()
        return alpn

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._replay:
            data, self._replay = self._replay, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._guard.receive(self._stream.receive_some, max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._guard.send(self._stream.send_all, data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Prepended(trio.abc.Stream):
    """A stream that first returns bytes already read, for the DERP relay (no request
    deadlines: a DERP connection lives as long as the client stays)."""

    def __init__(self, stream: trio.abc.Stream, replay: bytes) -> None:
        self.transport_stream = stream
        self._replay = replay

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._replay:
            data, self._replay = self._replay, b""
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.transport_stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


class _ConnectionLost(Exception):
    """Internal: a write failed; the session must end."""


class _IdleReaders:
    """Sessions whose reader parked, and the one task that waits for all of them.

    An idle tunnel's reader would otherwise be a task parked in ``wait_readable``
    (with its coroutine chain and epoll registration, ~2 KiB per node). Parked
    sessions' sockets sit in one epoll set (one-shot); when a socket becomes
    readable (data, EOF, error) its session resumes reading in a new task. When
    the server stops, every parked session is ended here.
    """

    __slots__ = ("_epoll", "_sessions")

    _EVENTS: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._sessions: dict[int, _NoiseSession] = {}

    def park(self, fd: int, session: _NoiseSession) -> None:
        self._sessions[fd] = session
        try:
            self._epoll.modify(fd, self._EVENTS)  # registered before, fired since
        except FileNotFoundError:
            self._epoll.register(fd, self._EVENTS)

    def unpark(self, fd: int, session: _NoiseSession) -> bool:
        """Take ``session`` out of the set (a timer now concerns it); ``False``
        if it was not parked (its reader runs, or is about to)."""
        if self._sessions.get(fd) is not session:
            return False
        del self._sessions[fd]
        # Still registered (one-shot, armed): a late event finds no session and
        # is ignored; the next park() re-arms it.
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in self._epoll.poll(0):
                    session = self._sessions.pop(fd, None)
                    if session is not None:
                        session.resume_reading()
        finally:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            with trio.CancelScope(shield=True):
                for session in sessions:
                    await session.end("server stopped")
            self._epoll.close()


def _idle_readers() -> _IdleReaders | None:
    """Where epoll exists (Linux), the shared waiter for idle readers."""
    return _IdleReaders() if hasattr(select, "epoll") else None


class _NoiseSession:
    """Runs one upgraded connection: reader loop, handler tasks, writer lock.

    Invariants: exactly one task reads; writes are serialised by
    ``_send_lock`` and always take the *current* ``data_to_send()`` inside the
    lock, so records leave in nonce order; every handler task runs in its own
    cancel scope, cancelled by the stream's RST_STREAM or by the end of the
    session (handler tasks live in the nursery passed to :meth:`run`).

    Memory (this object lives as long as the node is connected, usually idle;
    ``cli/bench/conn_memory.py`` measures it): the first bytes are
    dropped once written; the send lock and the window event exist only
    while somebody writes or waits; and the reader of a plain TCP connection
    parks in ``wait_readable`` instead of inside ``receive_some``, whose
    coroutine chain (stream, socket, non-blocking helper) would otherwise
    stay allocated for as long as the node stays idle.

    Deadlines and slow readers (issue 14). Three timers apply, all read from
    :meth:`_deadline` by the reader, which waits for data under a cancel scope
    with that deadline (``_wait``) and acts when it passes (:meth:`_on_deadline`):

    * each incomplete request body must be complete ``body_timeout`` after its
      head (``_bodies``), else its stream is answered 408 and reset;
    * a tunnel with no request being handled and no long poll open (``_scopes``
      and ``_parked`` empty) is closed ``tunnel_idle_timeout`` after the last
      one ended (``_idle_since``). Incomplete requests do not count as open:
      trickling bodies cannot keep a tunnel alive.

    A reader only parks in the shared waiter when no timer runs (the usual
    state of a node: its long poll is open). When a handler ends the last
    open stream, :meth:`_rearm` moves the deadline of a waiting reader, or
    takes a parked one out of the waiter and starts it, so the idle timer runs.
    Writes are bounded by :meth:`_abort`: a connection whose outgoing buffer
    (what the core holds plus what a writer has not written yet, ``_unsent``)
    passes ``max_outgoing_buffer``, whose socket takes nothing for
    ``write_timeout``, or that grants no flow-control window to a waiting
    response for ``write_timeout`` is closed at once: its handlers and reader
    are cancelled and nothing more is written.
    """

    __slots__ = (
        "_admitted",
        "_bodies",
        "_closing_reason",
        "_conn",
        "_first",
        "_handler",
        "_handlers",
        "_idle",
        "_idle_since",
        "_options",
        "_parked",
        "_peer",
        "_reader",
        "_scopes",
        "_send_lock",
        "_stats",
        "_stream",
        "_trailing",
        "_unsent",
        "_wait",
        "_window_changed",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: h2_bridge.ServerConnection,
        handler: ControlHandler,
        options: ServeOptions,
        peer: str,
        *,
        first: bytes,
        trailing: bytes,
        stats: ConnectionStats,
        admitted: _Admitted | None = None,
    ) -> None:
        self._stream = stream
        self._conn = conn
        self._handler = handler
        self._options = options
        self._peer = peer
        self._first = first  # our first write (101, handshake response, SETTINGS)
        self._trailing = trailing  # client bytes that arrived with the upgrade
        # Created on demand, dropped when unused (see _send_locked, _send_body).
        self._send_lock: trio.Lock | None = None
        self._window_changed: trio.Event | None = None
        self._scopes: dict[int, trio.CancelScope] = {}
        # Long polls that yielded Park: their iterators, with no task (see _drive).
        self._parked: dict[int, AsyncIterator[bytes | Park]] = {}
        self._handlers: trio.Nursery | None = None
        self._idle: _IdleReaders | None = None
        self._closing_reason = ""
        self._stats = stats
        self._admitted = admitted  # released when the connection closes
        # Timers (see the class docstring); no request has been handled yet.
        self._idle_since = trio.current_time()
        self._bodies: dict[int, float] | None = None  # stream id -> body deadline
        self._reader: trio.CancelScope | None = None  # the running reader's scope
        self._wait: trio.CancelScope | None = None  # its wait for data, with the deadline
        self._unsent = 0  # bytes the current writer took but has not written yet

    def _plain_socket(self) -> trio.socket.SocketType | None:
        """The socket under a plain TCP stream, which may be read and written directly;
        ``None`` for TLS and WebSocket streams (they hold bytes the socket does not show)."""
        return self._stream.socket if isinstance(self._stream, trio.SocketStream) else None

    @property
    def machine_key(self) -> bytes:
        """The client's machine public key (for log lines)."""
        return self._conn.machine_key

    async def run(self, handlers: trio.Nursery, *, resumed: bool = False) -> str | None:
        """Serve until EOF, GOAWAY or an error; return the reason for the log, or
        ``None`` when the reader parked in the server's shared waiter (see
        :class:`_IdleReaders`; ``resumed``: it was woken there, read at once).

        Args:
            handlers: Where the handler tasks run (the server's connection
                nursery). Each runs in its own cancel scope; when the session
                ends, all of them are cancelled, and they finish their cleanup
                (closing response iterators) on their own, like the request
                goroutines of Go's HTTP/2 server. A nursery per session would
                cost ~1 KiB more per idle node.
        """
        sock = self._plain_socket()
        self._handlers = handlers
        parked = False
        try:
            with trio.CancelScope() as reader:  # cancelled by _abort
                self._reader = reader
                first, self._first = self._first, b""
                if first:
                    await self._write(first)
                del first
                trailing, self._trailing = self._trailing, b""
                if trailing:
                    await self._on_data(trailing, handlers)
                del trailing
                more = resumed  # a resumed reader was woken because there is something to read
                while not self._closing_reason:
                    deadline = self._deadline()
                    if (
                        sock is not None
                        and not more
                        and self._idle is not None
                        and deadline == math.inf
                    ):
                        # Idle, no timer running: wait with no task at all in
                        # the server's shared waiter (_rearm takes it out when
                        # a timer starts).
                        self._idle.park(sock.fileno(), self)
                        parked = True
                        return None
                    data: bytes | None = None
                    with trio.CancelScope(deadline=deadline) as wait:
                        self._wait = wait
                        try:
                            if sock is not None and not more:
                                # Wait while idle (a full read suggests more is
                                # queued, so then read again at once) outside
                                # receive_some, whose coroutine chain would stay.
                                await trio.lowlevel.wait_readable(sock)
                            data = bytes(await self._stream.receive_some(_MAX_RECV))
                        finally:
                            self._wait = None
                    if data is None:  # the deadline passed
                        await self._on_deadline()
                        more = False
                        continue
                    if not data:
                        self._closing_reason = "peer closed the connection"
                        break
                    more = len(data) == _MAX_RECV
                    await self._on_data(data, handlers)
                    del data  # not kept alive while parked
        except RemoteProtocolError as exc:
            self._closing_reason = f"protocol error: {exc.reason}"
            with trio.move_on_after(1):
                await self._flush()  # h2's GOAWAY, if any
        except (trio.BrokenResourceError, trio.ClosedResourceError, _ConnectionLost):
            self._closing_reason = self._closing_reason or "connection lost"
        finally:
            self._reader = None
            if not parked:
                await self._cleanup()
        return self._closing_reason

    # -- deadlines --------------------------------------------------------------------

    def _deadline(self) -> float:
        """When the reader must next act on a timer (``inf``: none runs)."""
        deadline = math.inf
        if self._bodies:
            deadline = min(self._bodies.values())
        if not self._scopes and not self._parked:
            deadline = min(deadline, self._idle_since + self._options.tunnel_idle_timeout)
        return deadline

    def _track_bodies(self) -> None:
        """Start the body deadline of requests whose head just arrived; forget
        those that completed or were reset."""
        partial = self._conn.partial_streams()
        bodies = self._bodies
        if not partial:
            self._bodies = None
            return
        if bodies is None:
            bodies = self._bodies = {}
        for stream_id in [s for s in bodies if s not in partial]:
            del bodies[stream_id]
        if len(bodies) < len(partial):
            deadline = trio.current_time() + self._options.body_timeout
            for stream_id in partial:
                bodies.setdefault(stream_id, deadline)

    async def _on_deadline(self) -> None:
        """A timer of :meth:`_deadline` passed: expire bodies, close an idle tunnel."""
        now = trio.current_time()
        if self._bodies:
            expired = [s for s, deadline in self._bodies.items() if deadline <= now]
            for stream_id in expired:
                del self._bodies[stream_id]
                if self._conn.expire_request(stream_id):
                    self._stats.timeouts["body"] += 1
                    log.info("%s: stream %d: request body not received in time", self._peer, stream_id)
            if not self._bodies:
                self._bodies = None
            if expired:
                await self._flush()
        if (
            not self._scopes
            and not self._parked
            and now >= self._idle_since + self._options.tunnel_idle_timeout
        ):
            self._stats.timeouts["tunnel_idle"] += 1
            self._closing_reason = "idle tunnel (no request and no long poll open)"
            # GOAWAY first: Go's client then dials anew for its next request.
            self._conn.close(h2.errors.ErrorCodes.NO_ERROR, "idle")
            with trio.move_on_after(1):
                await self._flush()

    def _stream_ended(self) -> None:
        """A handler task ended its stream: the last one starts the idle timer."""
        if self._scopes or self._parked or self._closing_reason:
            return
        self._idle_since = trio.current_time()
        self._rearm()

    def _rearm(self) -> None:
        """The deadline may have moved: tell the reader, wherever it waits."""
        wait = self._wait
        if wait is not None:
            wait.deadline = self._deadline()
            return
        sock = self._plain_socket()
        handlers = self._handlers
        if self._idle is None or sock is None or handlers is None:
            return  # the reader runs; it reads _deadline() before it waits again
        if self._idle.unpark(sock.fileno(), self):
            try:
                handlers.start_soon(partial(self.serve, handlers, self._idle))
            except RuntimeError:  # the server stops: let its waiter end the session
                self._park_again(sock)

    def _park_again(self, sock: trio.socket.SocketType) -> None:
        """Put a session taken out of the waiter back, when no task can be started
        for it (the server stops, and its waiter then ends every parked session);
        if the waiter has already finished, the process is exiting anyway."""
        if self._idle is not None:
            with contextlib.suppress(ValueError, OSError):  # the waiter's epoll is closed
                self._idle.park(sock.fileno(), self)

    def _abort(self, reason: str, kind: str) -> None:
        """Close a slow reader now, from any task: nothing more is written, its
        handlers and reader are cancelled, the reader's end closes the socket."""
        if self._closing_reason:
            return
        self._closing_reason = reason
        self._stats.slow_readers[kind] += 1
        log.info("%s: closing a slow reader: %s", self._peer, reason)
        self._conn.send_failed()  # data_to_send() is empty from now on
        for scope in self._scopes.values():
            scope.cancel()
        self._notify_window()
        if self._reader is not None:
            self._reader.cancel()
            return
        sock = self._plain_socket()
        handlers = self._handlers
        if (
            self._idle is not None
            and sock is not None
            and handlers is not None
            and self._idle.unpark(sock.fileno(), self)
        ):
            try:
                handlers.start_soon(self.end, reason)
            except RuntimeError:  # the server stops: its waiter ends the session
                self._park_again(sock)

    def _check_outgoing(self) -> None:
        """Close the connection if its outgoing buffer passed the cap.

        Raises:
            _ConnectionLost: It did (the caller's task must stop sending).
        """
        held = self._conn.buffered_outgoing() + self._unsent
        cap = self._options.max_outgoing_buffer
        if held > cap:
            self._abort(f"{held} bytes not taken by the peer (cap {cap})", "buffer")
            raise _ConnectionLost("slow reader")

    async def _cleanup(self) -> None:
        """The session ended: cancel its handlers, close its parked streams."""
        for scope in list(self._scopes.values()):
            scope.cancel()
        self._notify_window()
        while self._parked:  # their resume() does nothing from now on
            _, stream = self._parked.popitem()
            await self._close_iterator(stream)

    async def serve(self, handlers: trio.Nursery, idle: _IdleReaders | None, *, resumed: bool = False) -> None:
        """Run (or resume) the session; once it ended, log why and close the stream.

        Returns early, with nothing closed, when the reader parked in ``idle``.
        """
        self._idle = idle
        reason: str | None = "cancelled"
        try:
            reason = await self.run(handlers, resumed=resumed)
        except Exception:
            log.exception("%s: connection handler failed", self._peer)
            reason = "internal error"
        finally:
            if reason is not None:
                await self._close(reason)

    async def _close(self, reason: str) -> None:
        log.info("%s: noise session (machine %s...) closed: %s", self._peer, self.machine_key.hex()[:16], reason)
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._stream.aclose()
        finally:
            if self._admitted is not None:
                self._admitted.release()

    def resume_reading(self) -> None:
        """The parked reader's socket is readable: read on, in a new task."""
        assert self._handlers is not None
        self._handlers.start_soon(partial(self.serve, self._handlers, self._idle, resumed=True))

    async def end(self, reason: str) -> None:
        """End a session whose reader is parked (the server stops)."""
        self._closing_reason = self._closing_reason or reason
        with trio.CancelScope(shield=True):
            await self._cleanup()
            await self._close(self._closing_reason)

    # -- reading ----------------------------------------------------------------------

    async def _on_data(self, data: bytes, handlers: trio.Nursery) -> None:
        """Feed socket bytes to the core and act on its events, then flush.

        The flush after every read carries PING ACKs, WINDOW_UPDATEs and any
        queued DATA that newly opened windows admit.
        """
        for event in self._conn.receive_data(data):
            if isinstance(event, h2_bridge.RequestReceived):
                scope = trio.CancelScope()
                self._scopes[event.stream_id] = scope
                request = replace(
                    event.request,
                    cancel=partial(self._cancel_stream, event.stream_id),
                    remote_addr=self._peer.rpartition(":")[0],
                )
                handlers.start_soon(self._serve_request, event.stream_id, request, scope)
                del request
            elif isinstance(event, h2flow.StreamReset):
                reset_scope = self._scopes.pop(event.stream_id, None)
                if reset_scope is not None:
                    reset_scope.cancel()
                parked = self._parked.pop(event.stream_id, None)
                if parked is not None:
                    handlers.start_soon(self._close_iterator, parked)
                    self._stream_ended()
                self._notify_window()
            elif isinstance(event, h2flow.WindowUpdated):
                self._notify_window()
            elif isinstance(event, h2_bridge.RequestRejected):
                log.info(
                    "%s: stream %d rejected with %d: %s",
                    self._peer,
                    event.stream_id,
                    event.status,
                    event.reason,
                )
            elif isinstance(event, h2flow.ConnectionTerminated):
                self._closing_reason = f"peer sent GOAWAY (code {event.error_code})"
        if self._bodies or self._conn.partial_streams():
            self._track_bodies()
        self._check_outgoing()  # PING ACKs, WINDOW_UPDATEs, DATA new window let out
        await self._flush()

    # -- writing --------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        await self._send_locked(lambda: data)

    async def _flush(self) -> None:
        # Take the bytes inside the lock: sealing assigns nonces in order.
        await self._send_locked(self._conn.data_to_send)

    async def _send_locked(self, take: Callable[[], bytes]) -> None:
        """Write ``take()`` to the socket, in order with every other write.

        Plain TCP writes straight away when nobody else is writing (see the
        fast path below); otherwise the send lock orders the writers. The lock
        is made on first use and dropped again when it is free with
        nobody waiting (``trio.Lock`` hands itself straight to the next
        waiter on release, so "unlocked" means "no waiters"): an idle tunnel
        holds no lock. Every writer takes the lock from ``self._send_lock``,
        and a new one is only made when no task holds or waits for the old.
        """
        lock = self._send_lock
        rest: bytes | memoryview = b""
        if lock is None or not lock.locked():
            # Nobody is writing. On plain TCP, try the write right here: nothing can
            # run between take() and the write (no await), so records stay in nonce
            # order, and a socket with room (the usual case: a small delta) costs
            # one system call and no trip through the scheduler. A write that did
            # not fit continues below, under the lock, before anybody else's.
            sock = self._plain_socket()
            fd = sock.fileno() if sock is not None else -1  # -1 once closed
            if fd >= 0:
                data = take()
                if not data:
                    return
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._conn.send_failed()
                    raise _ConnectionLost(f"write failed: {exc.strerror}") from exc
                if sent == len(data):
                    return
                rest = memoryview(data)[sent:]
        if lock is None:
            lock = self._send_lock = trio.Lock()
        try:
            if rest:
                lock.acquire_nowait()  # free: checked above, and nothing awaited since
            else:
                await lock.acquire()
            try:
                out = rest or take()
                if not out:
                    return
                await self._write_out(out)
            finally:
                lock.release()
        finally:
            if self._send_lock is lock and not lock.locked():
                self._send_lock = None

    async def _write_out(self, out: bytes | memoryview) -> None:
        """Write ``out`` (under the send lock) in pieces, each of which the peer
        must take within ``write_timeout`` (a slow reader is closed otherwise).

        Raises:
            _ConnectionLost: The write failed or stalled.
        """
        view = memoryview(out)
        timeout = self._options.write_timeout
        self._unsent = len(view)
        try:
            for start in range(0, len(view), _WRITE_PIECE):
                piece = view[start : start + _WRITE_PIECE]
                with trio.move_on_after(timeout) as stall:
                    await self._stream.send_all(piece)
                if stall.cancelled_caught:
                    self._abort(f"nothing written for {timeout:g}s", "write_stall")
                    raise _ConnectionLost("write stalled")
                self._unsent -= len(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._conn.send_failed()
            raise _ConnectionLost("write failed") from exc
        finally:
            self._unsent = 0

    def _notify_window(self) -> None:
        """Wake the tasks waiting for flow-control window (if any)."""
        event = self._window_changed
        if event is not None:
            self._window_changed = None
            event.set()

    async def _send_body(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        """Queue ``data`` and return once flow control let all of it out.

        This is the backpressure point: a streaming handler is not asked for
        its next chunk while the previous one still waits for window.
        """
        self._conn.send_data(stream_id, data, end_stream=end_stream)
        self._check_outgoing()
        await self._flush()
        waiting = self._conn.pending(stream_id)
        if not waiting:
            return
        # The peer must open window for some of it every write_timeout.
        timeout = self._options.write_timeout
        deadline = trio.current_time() + timeout
        while waiting:
            event = self._window_changed
            if event is None:
                event = self._window_changed = trio.Event()
            with trio.move_on_at(deadline):
                await event.wait()
            await self._flush()
            left = self._conn.pending(stream_id)
            if left < waiting:
                waiting, deadline = left, trio.current_time() + timeout
            elif trio.current_time() >= deadline:
                self._abort(f"no flow-control window for {timeout:g}s", "window_stall")
                raise _ConnectionLost("window stalled")

    # -- requests ---------------------------------------------------------------------

    async def _serve_request(
        self,
        stream_id: int,
        request: NoiseRequest | None,
        scope: trio.CancelScope,
        resumed: AsyncIterator[bytes | Park] | None = None,
    ) -> None:
        """Run the handler for one stream inside ``scope`` and send its answer
        (or, with ``resumed``, go on sending a parked long poll).

        ``scope`` was created by the reader before this task started, so an
        RST_STREAM that arrives first still cancels the handler at once.

        A long poll holds this task only while it has something to send: when
        it yields :class:`Park` the task ends and the iterator waits in
        ``_parked`` until its ``resume`` starts a new one (see :meth:`_drive`).
        """
        stream = resumed
        parked = False
        try:
            with scope:
                if request is not None:
                    try:
                        response = await self._handler(request)
                    except Exception:
                        log.exception(
                            "%s: handler failed for %s %s", self._peer, request.method, request.path
                        )
                        response = NoiseResponse(status=500, body=b"internal server error\n")
                    del request
                    stream = response.stream
                    body = response.body or b""
                    headers = response.headers
                    if stream is None and not any(k.lower() == "content-length" for k, _ in headers):
                        headers = (*headers, ("content-length", str(len(body))))
                    head_only = stream is None and not body
                    status = response.status
                    del response
                    if not self._conn.send_headers(stream_id, status, headers, end_stream=head_only):
                        return  # reset by the client meanwhile
                    del headers
                    self._check_outgoing()
                    await self._flush()
                    if stream is None:
                        if body:
                            await self._send_body(stream_id, body, end_stream=True)
                        return
                assert stream is not None
                parked = await self._drive(stream_id, stream)
        except _ConnectionLost:
            pass  # the reader notices too and ends the session
        except ProtocolError as exc:
            # The connection died under us (ERROR/CLOSED state): nothing to do.
            log.debug("%s: stream %d abandoned: %s", self._peer, stream_id, exc.reason)
        except Exception:
            # Our bug. This task runs in the server's nursery, so it must not
            # take other connections down with it: reset the stream instead.
            # Nothing in this handler may raise again (reset_stream never does).
            log.exception("%s: stream %d failed", self._peer, stream_id)
            self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            with contextlib.suppress(ProtocolError, _ConnectionLost), trio.move_on_after(1):
                await self._flush()
        finally:
            if self._scopes.get(stream_id) is scope:
                del self._scopes[stream_id]
            if not parked:
                self._stream_ended()
            if stream is not None and not parked:
                await self._close_iterator(stream)

    async def _drive(self, stream_id: int, stream: AsyncIterator[bytes | Park]) -> bool:
        """Send what a long poll yields until it ends (False) or parks (True).

        A parked iterator is kept in ``_parked`` with no task; the ``resume`` it
        registered starts a task that drives it again (:meth:`_resume`).
        """
        while True:
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                await self._send_body(stream_id, b"", end_stream=True)
                return False
            except Exception:
                log.exception("%s: response stream of stream %d failed", self._peer, stream_id)
                self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                await self._flush()
                return False
            if isinstance(chunk, Park):
                if self._closing_reason:
                    return False  # the session ends: the caller closes the iterator
                self._parked[stream_id] = stream
                chunk.register(partial(self._resume, stream_id))
                return True
            if chunk:
                await self._send_body(stream_id, chunk, end_stream=False)
            # Not kept while waiting for the next one: a long poll's first
            # chunk is a full map, and the next may come hours later.
            del chunk

    def _resume(self, stream_id: int) -> None:
        """Drive a parked long poll again, from a new task (see :class:`Park`)."""
        stream = self._parked.pop(stream_id, None)
        if stream is None or self._handlers is None:
            return  # ended (reset, closed) meanwhile
        if self._closing_reason:  # the session's end closes it (run)
            self._parked[stream_id] = stream
            return
        scope = trio.CancelScope()
        self._scopes[stream_id] = scope
        try:
            self._handlers.start_soon(self._serve_request, stream_id, None, scope, stream)
        except RuntimeError:  # the nursery is closing: the session closes it
            del self._scopes[stream_id]
            self._parked[stream_id] = stream

    def _cancel_stream(self, stream_id: int) -> None:
        """End a stream from the handler's side (``NoiseRequest.cancel``): cancel the
        task serving it, or close its parked iterator, and reset it with CANCEL."""
        scope = self._scopes.pop(stream_id, None)
        parked = self._parked.pop(stream_id, None)
        if scope is None and parked is None:
            return  # ended already
        if scope is not None:
            scope.cancel()
        self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self._notify_window()
        if self._handlers is None:
            return
        with contextlib.suppress(RuntimeError):  # the nursery is closing: the session ends anyway
            if parked is not None:
                self._handlers.start_soon(self._close_iterator, parked)
            self._handlers.start_soon(self._flush_quietly)

    async def _flush_quietly(self) -> None:
        """Flush, for a write nobody waits for (a connection that died is noticed by
        its reader)."""
        with contextlib.suppress(ProtocolError, _ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush()

    async def _close_iterator(self, stream: AsyncIterator[bytes | Park]) -> None:
        """``aclose()`` a response stream, shielded and with a deadline."""
        aclose = getattr(stream, "aclose", None)
        if aclose is None:
            return
        # Shielded with a deadline: the iterator's cleanup must run even though
        # we are usually here because our scope was cancelled.
        with trio.CancelScope(shield=True) as cleanup:
            cleanup.deadline = trio.current_time() + self._options.stream_close_timeout
            try:
                await aclose()
            except Exception:
                log.exception("%s: closing a response stream failed", self._peer)
        if cleanup.cancelled_caught:
            log.warning("%s: response stream did not close in time", self._peer)


class ControlServer:
    """The control port: front, Noise sessions and hypercorn, for any listeners.

    Use :func:`serve_control` unless you need custom listeners; then::

        server = ControlServer(server_key=..., handler=..., asgi_app=...)
        await nursery.start(server.serve, listeners)

    Attributes:
        server_public: Our Noise public key (what ``/key`` publishes).
        stats: The counters of :class:`ConnectionStats`.
    """

    def __init__(
        self,
        *,
        server_key: bytes,
        handler: ControlHandler,
        asgi_app: ASGIApp,
        ssl_context: ssl.SSLContext | None = None,
        options: ServeOptions | None = None,
        stats: ConnectionStats | None = None,
        derp: DerpRoute | None = None,
    ) -> None:
        """Create the server (no I/O yet).

        Args:
            server_key: The Noise static *private* key (persist it; clients
                only learn the public half through ``/key``).
            handler: Called for every request inside the tunnel.
            asgi_app: Serves everything that is not ``/key`` or ``/ts2021``.
            ssl_context: Terminate TLS on accepted connections if given.
            options: Tunables; see :class:`ServeOptions`.
            stats: Where to count connections, refusals, timeouts and slow
                readers (``/metrics`` reads it); ``None`` = a new one.
            derp: The embedded DERP relay to serve at ``/derp``, if any.
        """
        self._derp = derp
        # Loaded once: every handshake reuses the key object (see Keypair).
        self._server_key = Keypair.from_private_bytes(server_key)
        self.server_public = self._server_key.public
        self._handler = handler
        self._ssl_context = ssl_context
        self._options = options or ServeOptions()
        self.stats = stats or ConnectionStats()
        self._admission = _Admission(self._options, self.stats)
        self._hyper_config = self._options.hypercorn_config or HypercornConfig()
        self._hyper_app = ASGIWrapper(with_key_endpoint(asgi_app, self.server_public))
        self._hyper_context = WorkerContext(None)
        self._lifespan_state: dict[str, Any] = {}
        # The nursery of connection tasks while serve() runs; handler tasks go there too.
        self._connections: trio.Nursery | None = None
        self._idle: _IdleReaders | None = None

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the ASGI lifespan and accept connections until cancelled.

        Cancellation: cancelling this task stops accepting, cancels every
        connection (handler tasks included) and then runs the ASGI lifespan
        shutdown (shielded, bounded by hypercorn's ``shutdown_timeout``).
        """
        lifespan = Lifespan(self._hyper_app, self._hyper_config, self._lifespan_state)
        # The lifespan task is shielded from our caller's cancellation so that
        # the app's shutdown handlers can still run while we are cancelled;
        # it is cancelled explicitly once shutdown completed or timed out.
        lifespan_scope = trio.CancelScope(shield=True)

        async def run_lifespan(*, task_status: trio.TaskStatus[None]) -> None:
            with lifespan_scope:
                await lifespan.handle_lifespan(task_status=task_status)

        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(run_lifespan)
            await lifespan.wait_for_startup()
            try:
                async with trio.open_nursery() as connections:
                    self._connections = connections
                    self._idle = _idle_readers()
                    if self._idle is not None:
                        await connections.start(self._idle.run)
                    for listener in listeners:
                        connections.start_soon(self._accept_loop, listener, connections)
                    task_status.started()
            finally:
                self._connections = self._idle = None
                with trio.CancelScope(shield=True):
                    await self._hyper_context.terminated.set()
                    with trio.move_on_after(self._hyper_config.shutdown_timeout + 1):
                        await lifespan.wait_for_shutdown()
                    lifespan_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept connections forever; each runs :meth:`handle_stream` in ``nursery``.

        What ``trio.serve_listeners`` does, minus its per-connection wrapper
        task frame (``handle_stream`` closes the stream itself): one coroutine
        less for every connected node. Like trio, an overloaded system
        (EMFILE and friends) is logged and retried after 100 ms. Connections
        over ``max_connections`` or ``max_connections_per_address`` are closed
        as soon as they are accepted (counted in ``stats.refused``).
        """
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error(
                        "accept failed with %s (%s); retrying in 100 ms",
                        errno.errorcode[exc.errno],
                        os.strerror(exc.errno),
                    )
                    await trio.sleep(0.1)
                else:
                    admitted = self._admission.admit(peer_address(stream))
                    if isinstance(admitted, str):
                        # Refused: closed at once, before reading anything.
                        log.debug("%s: refused (%s)", peer_name(stream), admitted)
                        with trio.CancelScope(shield=True):
                            await stream.aclose()
                        continue
                    nursery.start_soon(self.handle_stream, stream, admitted)

    async def handle_stream(
        self, stream: trio.SocketStream, admitted: _Admitted | None = None
    ) -> None:
        """Serve one accepted connection; never raises (failures are logged).

        The set-up (TLS, front, handshake) returns before the session runs,
        so that none of its objects or coroutine frames stay alive beside an
        idle tunnel.

        Args:
            stream: The accepted connection.
            admitted: Its place in the connection caps (from the accept
                loop), given back when the connection closes.
        """
        peer = peer_name(stream)
        owned = False  # by the session, which closes it when it ends
        try:
            session = await self._handle(stream, peer, admitted)
            if session is not None:
                owned = True
                if self._connections is not None:
                    await session.serve(self._connections, self._idle)
                else:  # called outside serve(), e.g. with custom listeners
                    async with trio.open_nursery() as handlers:
                        await session.serve(handlers, None)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("%s: connection lost: %r", peer, exc)
        except RemoteProtocolError as exc:
            log.info("%s: closing connection: %s", peer, exc.reason)
        except Exception:
            log.exception("%s: connection handler failed", peer)
        finally:
            if not owned:
                try:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await stream.aclose()
                finally:
                    if admitted is not None:
                        admitted.release()

    async def _handle(
        self, raw: trio.SocketStream, peer: str, admitted: _Admitted | None
    ) -> _NoiseSession | None:
        """TLS (optional), then the front's decisions until one is final.

        Returns:
            The session of a successful ``/ts2021`` upgrade, ready to run;
            ``None`` when the connection was served (``/key``, hand-off to
            hypercorn) or refused here.
        """
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = raw
        if self._ssl_context is not None:
            tls = trio.SSLStream(raw, self._ssl_context, server_side=True, https_compatible=True)
            try:
                with trio.fail_after(self._options.tls_handshake_timeout):
                    await tls.do_handshake()
            except trio.TooSlowError:
                self.stats.timeouts["tls_handshake"] += 1
                log.info("%s: TLS handshake timed out", peer)
                return None
            except trio.BrokenResourceError as exc:
                log.info("%s: TLS handshake failed: %r", peer, exc.__cause__ or exc)
                return None
            if tls.selected_alpn_protocol() == "h2":
                await self._hand_off(tls, b"", peer)
                return None
            stream = tls
        front = upgrade.FrontConnection(server_public=self.server_public)
        # One deadline for a whole request head, set when the request cycle
        # starts (connection accepted, or the previous answer written): a
        # byte now and then does not renew it (slowloris).
        head_deadline = trio.current_time() + self._options.head_timeout
        started = False  # a byte of the current request arrived
        if self._derp is not None and self._derp.serve_tls is not None and stream is raw:
            # A plain control port also serves the relay's TLS (clients dial DERP over
            # https): the first byte tells a ClientHello from an HTTP request.
            try:
                with trio.fail_at(head_deadline):
                    first = bytes(await raw.receive_some(_MAX_RECV))
            except trio.TooSlowError:
                self.stats.timeouts["keepalive"] += 1
                log.debug("%s: nothing received in time", peer)
                return None
            if first and first[0] == _TLS_HANDSHAKE_RECORD:
                await self._derp.serve_tls(_Prepended(raw, first), raw)
                return None
            started = bool(first)
            front.receive_data(first)
        while True:
            event = front.next_event()
            if isinstance(event, upgrade.NeedData):
                try:
                    with trio.fail_at(head_deadline):
                        data = bytes(await stream.receive_some(_MAX_RECV))
                except trio.TooSlowError:
                    kind = "head" if started else "keepalive"
                    self.stats.timeouts[kind] += 1
                    if started:
                        log.info("%s: no complete request head in time", peer)
                    else:
                        log.debug("%s: no next request in time", peer)
                    return None
                started = started or bool(data)
                front.receive_data(data)
            elif isinstance(event, upgrade.SendResponse):
                await stream.send_all(event.data)
                head_deadline = trio.current_time() + self._options.head_timeout
                started = False
                if event.status >= 400:
                    log.info("%s: front answered %d: %s", peer, event.status, event.reason)
                else:
                    log.debug("%s: front answered %d: %s", peer, event.status, event.reason)
                if event.close:
                    return None
            elif isinstance(event, upgrade.HandOff) and self._derp is not None and event.path in DERP_PATHS:
                log.debug("%s: handing the connection to the DERP relay", peer)
                await self._derp.serve_http(_Prepended(stream, event.replay), raw)
                return None
            elif isinstance(event, upgrade.HandOff):
                log.debug("%s: handing the connection to hypercorn", peer)
                await self._hand_off(stream, event.replay, peer)
                return None
            elif isinstance(event, upgrade.Upgrade):
                return await self._noise(
                    stream, peer, event.initiation, event.trailing, websocket=False, admitted=admitted
                )
            elif isinstance(event, upgrade.WebSocketUpgrade):
                await stream.send_all(event.response)
                ws = WebSocketStream(
                    stream,
                    client=False,
                    trailing=event.trailing,
                    binary_only=True,
                    violation=RemoteProtocolError,
                )
                return await self._noise(
                    ws, peer, event.initiation, b"", websocket=True, admitted=admitted
                )
            else:  # PeerClosed
                return None

    async def _hand_off(
        self,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        replay: bytes,
        peer: str,
    ) -> None:
        """Let hypercorn serve the ASGI app on this connection (see module docstring),
        with the request deadline of :class:`_HandOffGuard`."""
        guard = _HandOffGuard(self._options, self.stats, peer)
        wrapped: trio.abc.Stream
        if isinstance(stream, trio.SSLStream):
            wrapped = _ReplaySSLStream(stream, replay, guard)
        else:
            wrapped = _ReplayStream(stream, replay, guard)
        server = BusyAwareTCPServer(
            self._hyper_app,
            self._hyper_config,
            self._hyper_context,
            ConnectionState(self._lifespan_state.copy()),
            # TCPServer is annotated with SSLStream but duck-types plain
            # streams (it catches the AttributeError of do_handshake).
            cast("trio.SSLStream[trio.SocketStream]", wrapped),
            on_busy=guard.request_active,
        )
        await server.run()

    async def _noise(
        self,
        stream: trio.abc.Stream,
        peer: str,
        initiation: bytes,
        trailing: bytes,
        *,
        websocket: bool,
        admitted: _Admitted | None,
    ) -> _NoiseSession | None:
        """Complete the handshake; return the session to run (``None``: refused)."""
        opts = self._options
        early = opts.send_early_payload and not websocket
        try:
            conn = h2_bridge.ServerConnection(
                server_private=self._server_key,
                initiation=initiation,
                challenge_public=opts.challenge_source() if early else None,
                max_body_size=opts.max_body_size,
                max_concurrent_streams=opts.max_concurrent_streams,
                max_buffered_bodies=opts.max_buffered_bodies,
            )
        except HandshakeError as exc:
            # Go writes this error record into its corked buffer and never
            # flushes it; sending it is a courtesy for debugging clients.
            head = b"" if websocket else upgrade.UPGRADE_RESPONSE
            with trio.move_on_after(1):
                await stream.send_all(head + encode_error(exc.reason))
            log.info("%s: noise handshake failed: %s", peer, exc.reason)
            return None
        if conn.protocol_version < opts.min_protocol_version:
            log.info(
                "%s: refusing client with protocol version %d < %d",
                peer,
                conn.protocol_version,
                opts.min_protocol_version,
            )
            return None
        first = conn.start()
        if not websocket:
            first = upgrade.UPGRADE_RESPONSE + first
        log.debug(
            "%s: noise session up, machine key %s..., v%d",
            peer,
            conn.machine_key.hex()[:16],
            conn.protocol_version,
        )
        return _NoiseSession(
            stream,
            conn,
            self._handler,
            opts,
            peer,
            first=first,
            trailing=trailing,
            stats=self.stats,
            admitted=admitted,
        )


async def serve_control(
    *,
    host: str,
    port: int,
    server_key: bytes,
    handler: ControlHandler,
    asgi_app: ASGIApp,
    ssl_context: ssl.SSLContext | None = None,
    options: ServeOptions | None = None,
    stats: ConnectionStats | None = None,
    derp: DerpRoute | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` and serve the control protocol and the ASGI app.

    Args:
        host: Address to bind, e.g. ``"127.0.0.1"`` or ``"0.0.0.0"``. Use one
            concrete address with ``port=0``: with several listeners each would
            get its own ephemeral port.
        port: TCP port; 0 picks a free one.
        server_key: The Noise static private key (32 bytes).
        handler: The :class:`~protocol.handler.ControlHandler` for tunnel requests.
        asgi_app: ASGI app for every other HTTP request (web UI, admin, health).
        ssl_context: If given, TLS is terminated here; build it from PEM
            files with :func:`load_ssl_context`.
        options: See :class:`ServeOptions`.
        stats: Counters to fill (see :class:`ControlServer`).
        derp: The embedded DERP relay to serve at ``/derp`` (see :class:`DerpRoute`).
        task_status: Receives the bound port via ``task_status.started(port)``.

    Cancellation: runs until cancelled; see :meth:`ControlServer.serve`.
    """
    server = ControlServer(
        server_key=server_key,
        handler=handler,
        asgi_app=asgi_app,
        ssl_context=ssl_context,
        options=options,
        stats=stats,
        derp=derp,
    )
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("control server listening on %s:%d (tls=%s)", host, bound, ssl_context is not None)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(server.serve, listeners))
        task_status.started(bound)
