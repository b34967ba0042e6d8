"""The control port's server: listeners, TLS, and the front door of every connection.

Theory of operation
-------------------
:func:`serve_control` (or :class:`ControlServer` with custom listeners) runs
hypercorn's lifespan around one connection nursery, which holds an accept loop
per listener (:mod:`protocol.serve.accept`), the idle-reader set
(:mod:`protocol.serve.idle`) and every connection's tasks.  Each admitted
connection runs :meth:`ControlServer.handle_stream`: TLS (optional), then the
front door, the sans-I/O :class:`protocol.upgrade.FrontConnection`, whose
events decide where the connection goes.  The front door reads request heads
until one is final::

    accepted ─▶ [TLS handshake, tls_handshake_timeout]     (only with ssl_context)
        │         ├─ failed or too slow ───────────────────────▶ closed
        │         └─ ALPN h2 ──────────────────────────────────▶ hypercorn
        │  plain port with DerpRoute.serve_tls: first read
        │         └─ 0x16 (a TLS ClientHello) ──────────────────▶ DERP relay's TLS
        ▼
    front: read a request head (one deadline per head: head_timeout)
        ├─ GET /key?v=N          ─▶ answer, read the next head (keep-alive)
        ├─ /ts2021 native        ─▶ 101 + Noise + early payload + HTTP/2 ─▶ session
        ├─ /ts2021 WebSocket     ─▶ 101 + WebSocket framing + Noise + HTTP/2 ─▶ session
        ├─ /derp, /derp/probe... ─▶ the embedded DERP relay (DerpRoute.serve_http)
        ├─ anything else         ─▶ hypercorn serves the ASGI app here (handoff.py)
        └─ an answer marked close, peer closed, deadline ─▶ closed

The set-up (TLS, front door, handshake) returns before the session runs, so
none of its objects or coroutine frames stay alive beside an idle tunnel;
the session then runs in the connection nursery (:mod:`protocol.serve.session`).

Invariants
----------
* One deadline per request head, set when the request cycle starts (the
  connection accepted, or the previous answer written): a byte now and then
  does not renew it (slowloris).
* ``handle_stream`` never raises: a peer's garbage
  (:class:`~protocol.errors.RemoteProtocolError`) closes only that connection
  with an INFO line; our own bugs are logged with a traceback.  No
  per-connection failure takes the listener down.
* Whoever ends a connection closes its stream and releases its
  :class:`~protocol.serve.accept.Admitted`: ``handle_stream`` unless a
  session took the connection over.

Named drops (``ConnectionStats.timeouts``): ``tls_handshake``, ``head`` (a
request head did not arrive whole in time), ``keepalive`` (no next request in
time, or nothing at all).

Cancellation: cancelling :meth:`ControlServer.serve` stops accepting, cancels
every connection (handler tasks included), ends the parked sessions and then
runs the ASGI lifespan shutdown (shielded, bounded by hypercorn's
``shutdown_timeout``).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Final

import trio

from wire.sockets import peer_name
from wire.wsstream import WebSocketStream

from .. import upgrade
from ..errors import RemoteProtocolError
from ..handler import ControlHandler
from ..noise import Keypair
from .accept import Admission, Admitted, accept_loop
from .config import MAX_RECV, ConnectionStats, ServeOptions
from .handoff import ASGIApp, Hypercorn, Prepended
from .idle import IdleReaders, idle_readers
from .session import NoiseSession, open_session

__all__ = [
    "DERP_PATHS",
    "ControlServer",
    "DerpRoute",
    "load_ssl_context",
    "serve_control",
]

log = logging.getLogger("protocol.serve")

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
        self._admission = Admission(self._options, self.stats)
        self._hypercorn = Hypercorn(asgi_app, self.server_public, self._options, self.stats)
        # The nursery of connection tasks while serve() runs; handler tasks go there too.
        self._connections: trio.Nursery | None = None
        self._idle: IdleReaders | None = None

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
        async with self._hypercorn.running():
            try:
                async with trio.open_nursery() as connections:
                    self._connections = connections
                    self._idle = idle_readers()
                    if self._idle is not None:
                        await connections.start(self._idle.run)
                    for listener in listeners:
                        connections.start_soon(
                            accept_loop, listener, connections, self._admission, self.handle_stream
                        )
                    task_status.started()
            finally:
                self._connections = self._idle = None

    async def handle_stream(
        self, stream: trio.SocketStream, admitted: Admitted | None = None
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
        self, raw: trio.SocketStream, peer: str, admitted: Admitted | None
    ) -> NoiseSession | None:
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
                await self._hypercorn.serve(tls, b"", peer)
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
                    first = bytes(await raw.receive_some(MAX_RECV))
            except trio.TooSlowError:
                self.stats.timeouts["keepalive"] += 1
                log.debug("%s: nothing received in time", peer)
                return None
            if first and first[0] == _TLS_HANDSHAKE_RECORD:
                await self._derp.serve_tls(Prepended(raw, first), raw)
                return None
            started = bool(first)
            front.receive_data(first)
        while True:
            event = front.next_event()
            if isinstance(event, upgrade.NeedData):
                try:
                    with trio.fail_at(head_deadline):
                        data = bytes(await stream.receive_some(MAX_RECV))
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
                await self._derp.serve_http(Prepended(stream, event.replay), raw)
                return None
            elif isinstance(event, upgrade.HandOff):
                log.debug("%s: handing the connection to hypercorn", peer)
                await self._hypercorn.serve(stream, event.replay, peer)
                return None
            elif isinstance(event, upgrade.Upgrade):
                tunnel: trio.abc.Stream = stream
                initiation, trailing, websocket = event.initiation, event.trailing, False
                break
            elif isinstance(event, upgrade.WebSocketUpgrade):
                await stream.send_all(event.response)
                tunnel = WebSocketStream(
                    stream,
                    client=False,
                    trailing=event.trailing,
                    binary_only=True,
                    violation=RemoteProtocolError,
                )
                initiation, trailing, websocket = event.initiation, b"", True
                break
            else:  # PeerClosed
                return None
        return await open_session(
            tunnel,
            peer,
            initiation,
            trailing,
            websocket=websocket,
            admitted=admitted,
            server_key=self._server_key,
            handler=self._handler,
            options=self._options,
            stats=self.stats,
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

