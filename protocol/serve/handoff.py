"""The hand-off: connections the front door gives away, and the bytes it already read.

Theory of operation
-------------------
The front door (:mod:`protocol.serve.server`) reads the first request head of
every connection itself, so it has consumed bytes that belong to whoever
serves the connection next.  Two kinds of connection leave it that way:

* everything that is not ``/key``, ``/ts2021`` or DERP goes to **hypercorn**
  (:class:`Hypercorn`), which serves the ASGI app (web UI, admin, health) with
  its own HTTP/1.1, h2c, WebSocket, keep-alive and timeout handling;
* ``/derp`` requests and TLS ClientHellos on a plain port go to the embedded
  **DERP relay**, through :class:`Prepended`.

Either way the replay stream returns the bytes already read, whole, on the
first ``receive_some``, then reads the socket.  A connection handed off
never comes back to the front door::

    front door ──HandOff──▶ _ReplayStream / _ReplaySSLStream ──▶ hypercorn TCPServer
                                 │ reads and writes under _HandOffGuard
    front door ──/derp, ClientHello──▶ Prepended ──▶ DerpRoute (no deadlines here)

Why hypercorn's own driver and not a proxy or a second port
-----------------------------------------------------------
ASGI has no way to hijack a socket for a custom ``Upgrade``, so ``/ts2021``
cannot live inside the ASGI app (control-protocol.md §5.2).  Options were (a)
a reverse proxy in front, (b) a second port, (c) our own listener that peeks
at the first request and hands every other connection to hypercorn.  We do
(c) with ``hypercorn.trio.tcp_server.TCPServer(app, config, context, state,
stream)``: it is what ``hypercorn.trio.run.worker_serve`` spawns per accepted
stream, so the ASGI app sees no difference.  The replay streams provide the
attributes ``TCPServer`` probes: ``socket`` for plain TCP, or
``do_handshake``, ``selected_alpn_protocol`` and ``transport_stream`` for TLS
(then hypercorn sets ``scheme = https``).  :meth:`Hypercorn.running` runs
hypercorn's ``Lifespan`` (startup and shutdown of the Quart app) and
``WorkerContext``, as ``worker_serve`` does.  TLS connections that negotiate
ALPN ``h2`` go to hypercorn before the front reads anything (Tailscale's
``/ts2021`` TLS fallback disables ALPN).  These are hypercorn internals,
imported from :mod:`protocol.compat`, which pins the minor version;
``tests/protocol/test_serve.py`` covers the hand-off, TLS and keep-alive.

A connection handed to hypercorn stays there; if a later request on it asks
for ``/key``, the ASGI shim :func:`with_key_endpoint` answers it, so ``/key``
works on every connection.

Deadlines on a hypercorn connection (:class:`_HandOffGuard`)::

    idle (deadline = inf) ──request head arrived (on_busy True)──▶ busy
      ▲                       deadline = now + body_timeout, set once, not renewed
      └──────────────response went out (on_busy False)────────────┘

hypercorn bounds the wait for a request head itself (its keep-alive timer);
the guard bounds a request in progress and every write.

Named drops: ``stats.timeouts["http_body"]`` (a request not received by its
deadline: the connection is closed) and ``stats.slow_readers["write_stall"]``
(a write that took nothing for ``write_timeout``: the connection is closed).

Invariants
----------
* The replayed bytes are returned exactly once, before any byte of the socket.
* A :class:`Prepended` stream sets no deadline: a DERP connection lives as
  long as its client stays, and the relay keeps its own watchdogs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar, cast

import trio
from hypercorn.config import Config as HypercornConfig

from .. import upgrade
from ..compat import ASGIWrapper, BusyAwareTCPServer, ConnectionState, Lifespan, WorkerContext
from .config import ConnectionStats, ServeOptions

__all__ = ["ASGIApp", "Hypercorn", "Prepended", "with_key_endpoint"]

log = logging.getLogger("protocol.serve")

#: Any ASGI 3 application (a Quart-trio app, a bare coroutine function ...).
ASGIApp = Callable[..., Awaitable[None]]


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


_S = TypeVar("_S", bound=trio.abc.Stream)


class _GuardedReplay(trio.abc.Stream, Generic[_S]):
    """What both replay streams for hypercorn share: the bytes already read,
    then the wrapped stream, read and written under a :class:`_HandOffGuard`."""

    def __init__(self, stream: _S, replay: bytes, guard: _HandOffGuard) -> None:
        self._stream = stream
        self._replay = replay
        self._guard = guard

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return the replayed bytes once (whole), then read the stream.

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

    async def aclose(self) -> None:
        """Delegate."""
        await self._stream.aclose()


class _ReplayStream(_GuardedReplay[trio.SocketStream], trio.abc.HalfCloseableStream):
    """A plain TCP stream that first returns bytes already read (for hypercorn)."""

    @property
    def socket(self) -> trio.socket.SocketType:
        """The socket; hypercorn reads the peer and local addresses from it."""
        return self._stream.socket

    async def send_eof(self) -> None:
        """Delegate (hypercorn half-closes plain TCP after a response)."""
        await self._stream.send_eof()


class _ReplaySSLStream(_GuardedReplay[trio.SSLStream[trio.SocketStream]]):
    """The TLS twin of :class:`_ReplayStream` (the TLS handshake is already done)."""

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


class Prepended(trio.abc.Stream):
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


class Hypercorn:
    """hypercorn's trio driver, for every connection the front door does not keep.

    Holds what ``hypercorn.trio.run.worker_serve`` would hold for its workers:
    the ASGI app (behind the ``/key`` shim), the config, the worker context and
    the lifespan state that each connection gets a copy of.
    """

    __slots__ = ("_app", "_config", "_context", "_lifespan_state", "_options", "_stats")

    def __init__(
        self, asgi_app: ASGIApp, server_public: bytes, options: ServeOptions, stats: ConnectionStats
    ) -> None:
        self._options = options
        self._stats = stats
        self._config = options.hypercorn_config or HypercornConfig()
        self._app = ASGIWrapper(with_key_endpoint(asgi_app, server_public))
        self._context = WorkerContext(None)
        self._lifespan_state: dict[str, Any] = {}

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the ASGI lifespan around the body: startup before, shutdown after.

        Cancellation: the shutdown runs even when the body was cancelled
        (shielded, bounded by hypercorn's ``shutdown_timeout``).
        """
        lifespan = Lifespan(self._app, self._config, self._lifespan_state)
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
                yield
            finally:
                with trio.CancelScope(shield=True):
                    await self._context.terminated.set()
                    with trio.move_on_after(self._config.shutdown_timeout + 1):
                        await lifespan.wait_for_shutdown()
                    lifespan_scope.cancel()

    async def serve(
        self,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        replay: bytes,
        peer: str,
    ) -> None:
        """Let hypercorn serve the ASGI app on this connection, ``replay`` first,
        with the request deadline of :class:`_HandOffGuard`."""
        guard = _HandOffGuard(self._options, self._stats, peer)
        wrapped: trio.abc.Stream
        if isinstance(stream, trio.SSLStream):
            wrapped = _ReplaySSLStream(stream, replay, guard)
        else:
            wrapped = _ReplayStream(stream, replay, guard)
        server = BusyAwareTCPServer(
            self._app,
            self._config,
            self._context,
            ConnectionState(self._lifespan_state.copy()),
            # TCPServer is annotated with SSLStream but duck-types plain
            # streams (it catches the AttributeError of do_handshake).
            cast("trio.SSLStream[trio.SocketStream]", wrapped),
            on_busy=guard.request_active,
        )
        await server.run()
