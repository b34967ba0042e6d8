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
      anything else        -> hypercorn serves the ASGI app on this connection

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
node (``tests/benchmarks/conn_memory.py`` measures it by allocation site).
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
import logging
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

from . import h2_bridge, upgrade
from .compat import ASGIWrapper, ConnectionState, Lifespan, TCPServer, WorkerContext
from .errors import HandshakeError, ProtocolError, RemoteProtocolError
from .handler import ControlHandler, NoiseRequest, NoiseResponse, Park
from .noise import Keypair, encode_error
from .wsstream import WebSocketByteStream

__all__ = [
    "ASGIApp",
    "ControlServer",
    "ServeOptions",
    "load_ssl_context",
    "serve_control",
    "with_key_endpoint",
]

log = logging.getLogger(__name__)

#: Any ASGI 3 application (a Quart-trio app, a bare coroutine function ...).
ASGIApp = Callable[..., Awaitable[None]]

_MAX_RECV: Final = 65536
#: accept(2) errors that mean "overloaded, retry soon" (as trio.serve_listeners).
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)


@dataclass(frozen=True)
class ServeOptions:
    """Tunables of :func:`serve_control`.

    Attributes:
        max_body_size: Cap on request bodies inside the tunnel (Headscale: 1 MiB).
        head_timeout: Seconds to receive one complete HTTP/1.1 request head
            on the front (slowloris guard); hypercorn's own timeouts apply
            after a hand-off.
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
    head_timeout: float = 30.0
    tls_handshake_timeout: float = 30.0
    min_protocol_version: int = 0
    send_early_payload: bool = True
    max_concurrent_streams: int = h2_bridge.DEFAULT_MAX_CONCURRENT_STREAMS
    max_buffered_bodies: int = h2_bridge.DEFAULT_MAX_BUFFERED_BODIES
    challenge_source: Callable[[], bytes] = field(default=lambda: Keypair.generate().public)
    hypercorn_config: HypercornConfig | None = field(default=None, compare=False)
    stream_close_timeout: float = 5.0


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


class _ReplayStream(trio.abc.HalfCloseableStream):
    """A plain TCP stream that first returns bytes already read (for hypercorn)."""

    def __init__(self, stream: trio.SocketStream, replay: bytes) -> None:
        self._stream = stream
        self._replay = replay

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
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Delegate."""
        await self._stream.send_all(data)

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

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], replay: bytes) -> None:
        self._stream = stream
        self._replay = replay

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
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _peer_name(stream: trio.abc.Stream) -> str:
    """Best-effort ``host:port`` of the peer, for log lines."""
    inner: object = stream
    if isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    if isinstance(inner, trio.SocketStream):
        try:
            peer = inner.socket.getpeername()
        except OSError:
            return "?"
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return str(peer)
    return "?"


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
    ``tests/benchmarks/conn_memory.py`` measures it): the first bytes are
    dropped once written; the send lock and the window event exist only
    while somebody writes or waits; and the reader of a plain TCP connection
    parks in ``wait_readable`` instead of inside ``receive_some``, whose
    coroutine chain (stream, socket, non-blocking helper) would otherwise
    stay allocated for as long as the node stays idle.
    """

    __slots__ = (
        "_closing_reason",
        "_conn",
        "_first",
        "_handler",
        "_handlers",
        "_idle",
        "_options",
        "_parked",
        "_peer",
        "_scopes",
        "_send_lock",
        "_stream",
        "_trailing",
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
                if sock is not None and not more:
                    # Wait while idle (a full read suggests more is queued, so
                    # then read again at once): with no task at all when the
                    # server has a shared waiter, else parked in wait_readable.
                    if self._idle is not None:
                        self._idle.park(sock.fileno(), self)
                        parked = True
                        return None
                    await trio.lowlevel.wait_readable(sock)
                data = bytes(await self._stream.receive_some(_MAX_RECV))
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
            if not parked:
                await self._cleanup()
        return self._closing_reason

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
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self._stream.aclose()

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
            elif isinstance(event, h2_bridge.StreamReset):
                reset_scope = self._scopes.pop(event.stream_id, None)
                if reset_scope is not None:
                    reset_scope.cancel()
                parked = self._parked.pop(event.stream_id, None)
                if parked is not None:
                    handlers.start_soon(self._close_iterator, parked)
                self._notify_window()
            elif isinstance(event, h2_bridge.WindowUpdated):
                self._notify_window()
            elif isinstance(event, h2_bridge.RequestRejected):
                log.info(
                    "%s: stream %d rejected with %d: %s",
                    self._peer,
                    event.stream_id,
                    event.status,
                    event.reason,
                )
            elif isinstance(event, h2_bridge.ConnectionTerminated):
                self._closing_reason = f"peer sent GOAWAY (code {event.error_code})"
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
                try:
                    await self._stream.send_all(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._conn.send_failed()
                    raise _ConnectionLost("write failed") from exc
            finally:
                lock.release()
        finally:
            if self._send_lock is lock and not lock.locked():
                self._send_lock = None

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
        await self._flush()
        while self._conn.pending(stream_id):
            event = self._window_changed
            if event is None:
                event = self._window_changed = trio.Event()
            await event.wait()
            await self._flush()

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
    """

    def __init__(
        self,
        *,
        server_key: bytes,
        handler: ControlHandler,
        asgi_app: ASGIApp,
        ssl_context: ssl.SSLContext | None = None,
        options: ServeOptions | None = None,
    ) -> None:
        """Create the server (no I/O yet).

        Args:
            server_key: The Noise static *private* key (persist it; clients
                only learn the public half through ``/key``).
            handler: Called for every request inside the tunnel.
            asgi_app: Serves everything that is not ``/key`` or ``/ts2021``.
            ssl_context: Terminate TLS on accepted connections if given.
            options: Tunables; see :class:`ServeOptions`.
        """
        # Loaded once: every handshake reuses the key object (see Keypair).
        self._server_key = Keypair.from_private_bytes(server_key)
        self.server_public = self._server_key.public
        self._handler = handler
        self._ssl_context = ssl_context
        self._options = options or ServeOptions()
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
        (EMFILE and friends) is logged and retried after 100 ms.
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
                    nursery.start_soon(self.handle_stream, stream)

    async def handle_stream(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection; never raises (failures are logged).

        The set-up (TLS, front, handshake) returns before the session runs,
        so that none of its objects or coroutine frames stay alive beside an
        idle tunnel.
        """
        peer = _peer_name(stream)
        owned = False  # by the session, which closes it when it ends
        try:
            session = await self._handle(stream, peer)
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
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await stream.aclose()

    async def _handle(self, raw: trio.SocketStream, peer: str) -> _NoiseSession | None:
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
                log.info("%s: TLS handshake timed out", peer)
                return None
            except trio.BrokenResourceError as exc:
                log.info("%s: TLS handshake failed: %r", peer, exc.__cause__ or exc)
                return None
            if tls.selected_alpn_protocol() == "h2":
                await self._hand_off(tls, b"")
                return None
            stream = tls
        front = upgrade.FrontConnection(server_public=self.server_public)
        while True:
            event = front.next_event()
            if isinstance(event, upgrade.NeedData):
                try:
                    with trio.fail_after(self._options.head_timeout):
                        data = bytes(await stream.receive_some(_MAX_RECV))
                except trio.TooSlowError:
                    log.info("%s: no complete request head in time", peer)
                    return None
                front.receive_data(data)
            elif isinstance(event, upgrade.SendResponse):
                await stream.send_all(event.data)
                if event.status >= 400:
                    log.info("%s: front answered %d: %s", peer, event.status, event.reason)
                else:
                    log.debug("%s: front answered %d: %s", peer, event.status, event.reason)
                if event.close:
                    return None
            elif isinstance(event, upgrade.HandOff):
                log.debug("%s: handing the connection to hypercorn", peer)
                await self._hand_off(stream, event.replay)
                return None
            elif isinstance(event, upgrade.Upgrade):
                return await self._noise(
                    stream, peer, event.initiation, event.trailing, websocket=False
                )
            elif isinstance(event, upgrade.WebSocketUpgrade):
                await stream.send_all(event.response)
                ws = WebSocketByteStream(stream, client=False, trailing=event.trailing)
                return await self._noise(ws, peer, event.initiation, b"", websocket=True)
            else:  # PeerClosed
                return None

    async def _hand_off(
        self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream], replay: bytes
    ) -> None:
        """Let hypercorn serve the ASGI app on this connection (see module docstring)."""
        wrapped: trio.abc.Stream
        if isinstance(stream, trio.SSLStream):
            wrapped = _ReplaySSLStream(stream, replay)
        else:
            wrapped = _ReplayStream(stream, replay)
        server = TCPServer(
            self._hyper_app,
            self._hyper_config,
            self._hyper_context,
            ConnectionState(self._lifespan_state.copy()),
            # TCPServer is annotated with SSLStream but duck-types plain
            # streams (it catches the AttributeError of do_handshake).
            cast("trio.SSLStream[trio.SocketStream]", wrapped),
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
            stream, conn, self._handler, opts, peer, first=first, trailing=trailing
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
        task_status: Receives the bound port via ``task_status.started(port)``.

    Cancellation: runs until cancelled; see :meth:`ControlServer.serve`.
    """
    server = ControlServer(
        server_key=server_key,
        handler=handler,
        asgi_app=asgi_app,
        ssl_context=ssl_context,
        options=options,
    )
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("control server listening on %s:%d (tls=%s)", host, bound, ssl_context is not None)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(server.serve, listeners))
        task_status.started(bound)
