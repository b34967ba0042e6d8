"""The Noise session: one upgraded ``/ts2021`` connection, from handshake to close.

Theory of operation
-------------------
After the front door's ``Upgrade`` (native or WebSocket), :func:`open_session`
completes the Noise handshake with the sans-I/O
:class:`protocol.h2_bridge.ServerConnection` (Noise + HTTP/2) and returns a
:class:`NoiseSession`; the front door's objects and frames are gone before it
runs.  The session moves bytes between the socket and the core and runs one
handler task per HTTP/2 stream; every decision is the core's::

    socket ─▶ reader ─▶ conn.receive_data ─▶ RequestReceived ─▶ handler task (own scope)
                 │                          StreamReset ──────▶ cancel its scope
                 │                          WindowUpdated ────▶ wake waiting bodies
                 └─ flush ◀── conn.data_to_send ◀── handler's headers / body chunks

States of a session (the reader's view)::

    open_session ──invalid initiation / version too low──▶ refused (handle_stream closes)
         │
         ▼  first write: [101 (native)] + handshake response + early payload + SETTINGS
    reading ◀──resume_reading (readable, deadline) / _rearm (it moved)────────┐
      │  │ plain TCP, nothing left to read, deadline not passed               │
      │  └─────────────────────────────────────────────▶ parked (in IdleReaders, no task)
      │ EOF, GOAWAY, protocol error, write failed,                            │ _abort, or
      │ idle deadline, _abort                                                 │ the server stops
      ▼                                                                       ▼
    closing: cancel handler scopes, close parked long polls ◀──────── end(reason)
      ▼
    closed: stream closed (shielded, 1 s), Admitted released, one INFO line

A long poll that yields :class:`~protocol.handler.Park` holds no task while
it waits: its iterator sits in ``_parked`` until the ``resume`` it registered
starts a new task that drives it again.

Invariants
----------
* Exactly one party reads the socket: the reader task, or the idle-reader
  set while the session is parked (:mod:`protocol.serve.idle`).
* Records leave in nonce order: every write takes the *current*
  ``data_to_send()`` with nothing awaited before it is written (the direct
  write on plain TCP, :func:`wire.sockets.write_nowait`) or under the send lock.
* Every handler task runs in its own cancel scope, created by the reader
  before the task starts, so an RST_STREAM that arrives first still cancels it;
  all handler scopes are cancelled when the session ends.
* A session that ends has its long polls' iterators closed (shielded, within
  ``stream_close_timeout``) and its place in the connection caps released.

Named drops (counted in :class:`~protocol.serve.config.ConnectionStats`)
---------------------------------------------------------------------------
* ``timeouts["body"]``: a request body was not complete ``body_timeout``
  after its head; the stream is answered 408 and reset.
* ``timeouts["tunnel_idle"]``: nothing open for ``tunnel_idle_timeout``;
  GOAWAY, then close.
* ``slow_readers["buffer"]``, ``["write_stall"]``, ``["window_stall"]``:
  the peer does not take what we send; the connection is closed at once.

Refused at the handshake (logged, not counted): an invalid initiation (an
error record is sent as a courtesy), a client below ``min_protocol_version``.

Memory
------
A node keeps its tunnel open for days and is idle nearly all the time, so
what an idle session holds is the server's cost per node
(``cli/bench/conn_memory.py`` measures it by allocation site): a
parked reader (no task) or one task in ``wait_readable``, plus one task per
open stream in the server's connection nursery; the send lock and the
flow-control event exist only while used.  The cores trim ``h2``, HPACK and
Noise state (:mod:`protocol.h2flow`, :mod:`protocol.h2_bridge`,
:mod:`protocol.noise.transport`).  Measured at 5,000 idle nodes: ~13 KiB of
RSS per plain-TCP tunnel; TLS adds ~20 KiB, most of it OpenSSL's own state.

Error handling: a peer's garbage (:class:`~protocol.errors.RemoteProtocolError`)
closes only its connection, with an INFO line naming the reason; our own bugs
in a handler become a 500 or a stream reset, logged with a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial
from typing import Final, TypeVar

import h2.errors
import trio

from wire.sockets import plain_socket, write_nowait

from .. import h2_bridge, h2flow, upgrade
from ..errors import HandshakeError, ProtocolError, RemoteProtocolError
from ..handler import ControlHandler, NoiseRequest, NoiseResponse, Park
from ..noise import Keypair, encode_error
from .accept import Admitted
from .config import MAX_RECV, ConnectionStats, ServeOptions
from .idle import IdleReaders

__all__ = ["NoiseSession", "open_session"]

log = logging.getLogger("protocol.serve")

#: Writes go out in pieces of this size; each must be taken within write_timeout.
_WRITE_PIECE: Final = 65536


_V = TypeVar("_V")


class _ConnectionLost(Exception):
    """Internal: a write failed; the session must end."""


def _pop_dropping_empty(table: dict[int, _V] | None, key: int) -> tuple[_V | None, dict[int, _V] | None]:
    """``table.pop(key, None)`` and what the owner keeps afterwards: ``table``, or
    ``None`` once it is empty. An emptied dict keeps the table it grew, and an idle
    tunnel (its long poll parked, no task) would hold it for days (issue 19, memory)."""
    if table is None:
        return None, None
    found = table.pop(key, None)
    return found, table or None


class _ParkedStreams:
    """Parked long polls' iterators by stream id (what ``NoiseSession._parked`` needs of
    a dict): the first in two slots, any more in a dict made when needed.

    An idle tunnel parks exactly one stream, its map long poll, for days: a dict
    holding one entry is ~220 bytes, these slots a few dozen (issue 19, memory).
    """

    __slots__ = ("_id", "_more", "_stream")

    def __init__(self) -> None:
        self._id = 0
        self._stream: AsyncIterator[bytes | Park] | None = None
        self._more: dict[int, AsyncIterator[bytes | Park]] | None = None

    def __len__(self) -> int:
        return (self._stream is not None) + (len(self._more) if self._more is not None else 0)

    def __bool__(self) -> bool:
        return self._stream is not None or self._more is not None

    def __contains__(self, stream_id: int) -> bool:
        if self._stream is not None and self._id == stream_id:
            return True
        return self._more is not None and stream_id in self._more

    def __setitem__(self, stream_id: int, stream: AsyncIterator[bytes | Park]) -> None:
        more = self._more
        if (self._stream is None and (more is None or stream_id not in more)) or self._id == stream_id:
            self._id, self._stream = stream_id, stream
        elif more is None:
            self._more = {stream_id: stream}
        else:
            more[stream_id] = stream

    def pop(self, stream_id: int, default: None = None) -> AsyncIterator[bytes | Park] | None:
        """The iterator parked for ``stream_id``, taken out; ``None`` if there is none."""
        if self._stream is not None and self._id == stream_id:
            stream, self._stream, self._id = self._stream, None, 0
            return stream
        found, self._more = _pop_dropping_empty(self._more, stream_id)
        return found

    def popitem(self) -> tuple[int, AsyncIterator[bytes | Park]]:
        """Any parked stream, taken out (``KeyError`` when there is none)."""
        if self._stream is not None:
            item = (self._id, self._stream)
            self._stream, self._id = None, 0
            return item
        if self._more is None:
            raise KeyError("no parked stream")
        item = self._more.popitem()
        if not self._more:
            self._more = None
        return item


class _StreamCallback:
    """A session's callback for one of its streams: the session and the stream id in
    two slots (48 bytes), where ``functools.partial`` of a bound method took a partial,
    its argument tuple and the bound method (about 250 bytes). An idle node's long
    poll holds three of them, for as long as it stays connected (issue 19, memory)."""

    __slots__ = ("session", "stream_id")

    def __init__(self, session: NoiseSession, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id


class _Resume(_StreamCallback):
    """The ``resume`` of a parked long poll (:meth:`NoiseSession._resume`)."""

    __slots__ = ()

    def __call__(self) -> None:
        self.session._resume(self.stream_id)


class _SendNow(_StreamCallback):
    """The ``send_now`` of a parked long poll (:meth:`NoiseSession._send_now`)."""

    __slots__ = ()

    def __call__(self, data: bytes) -> bool:
        return self.session._send_now(self.stream_id, data)


class _Cancel(_StreamCallback):
    """A request's ``cancel`` (:meth:`NoiseSession._cancel_stream`)."""

    __slots__ = ()

    def __call__(self) -> None:
        self.session._cancel_stream(self.stream_id)


class NoiseSession:
    """Runs one upgraded connection: reader loop, handler tasks, writer lock
    (states and invariants: see the module docstring).

    Memory: this object lives as long as the node is connected, usually idle.
    The first bytes are dropped once written; the send lock and the window
    event exist only while somebody writes or waits; and the reader of a plain
    TCP connection waits in ``wait_readable`` (or parks, with no task at all)
    instead of inside ``receive_some``, whose coroutine chain (stream, socket,
    non-blocking helper) would otherwise stay allocated while the node idles.

    Deadlines and slow readers (issue 14). Two timers apply, both read from
    :meth:`_deadline` by the reader, which waits for data under a cancel scope
    with that deadline (``_wait``) and acts when it passes (:meth:`_on_deadline`):

    * each incomplete request body must be complete ``body_timeout`` after its
      head (``_bodies``), else its stream is answered 408 and reset;
    * a tunnel with no request being handled and no long poll open (``_scopes``
      and ``_parked`` empty) is closed ``tunnel_idle_timeout`` after the last
      one ended (``_idle_since``). Incomplete requests do not count as open:
      trickling bodies cannot keep a tunnel alive.

    A reader parks in the idle-reader set whenever it has nothing to read, with
    its deadline (none in the usual state of a node: its long poll is open; the
    idle timer while a tunnel has no stream, as between registration and the map
    poll); the set resumes it when data comes or the deadline passes. When a
    handler ends the last open stream, :meth:`_rearm` moves the deadline of a
    waiting reader, or takes a parked one out of the set and starts it, so that
    it parks again with the idle timer's deadline.
    Writes are bounded by :meth:`_abort`: a connection whose outgoing buffer
    (what the core holds plus what a writer has not written yet, ``_unsent``)
    passes ``max_outgoing_buffer``, whose socket takes nothing for
    ``write_timeout``, or that grants no flow-control window to a waiting
    response for ``write_timeout`` is closed at once: its handlers and reader
    are cancelled and nothing more is written.
    """

    __slots__ = (
        "_admitted",
        "_backlog",
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
        admitted: Admitted | None = None,
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
        # Running stream tasks' scopes; None while there is none (an idle tunnel).
        self._scopes: dict[int, trio.CancelScope] | None = None
        # Long polls that yielded Park: their iterators, with no task (see _drive).
        self._parked = _ParkedStreams()
        self._handlers: trio.Nursery | None = None
        self._idle: IdleReaders | None = None
        self._closing_reason = ""
        self._stats = stats
        self._admitted = admitted  # released when the connection closes
        # Timers (see the class docstring); no request has been handled yet.
        self._idle_since = trio.current_time()
        self._bodies: dict[int, float] | None = None  # stream id -> body deadline
        self._reader: trio.CancelScope | None = None  # the running reader's scope
        self._wait: trio.CancelScope | None = None  # its wait for data, with the deadline
        self._unsent = 0  # bytes the current writer took but has not written yet
        # Bytes a task-less write (_send_now) took but the socket did not take: the
        # next writer writes them first (see _take).
        self._backlog = b""

    @property
    def machine_key(self) -> bytes:
        """The client's machine public key (for log lines)."""
        return self._conn.machine_key

    async def run(self, handlers: trio.Nursery, *, resumed: bool = False) -> str | None:
        """Serve until EOF, GOAWAY or an error; return the reason for the log, or
        ``None`` when the reader parked in the server's shared waiter (see
        :class:`IdleReaders`; ``resumed``: it was woken there, read at once).

        Args:
            handlers: Where the handler tasks run (the server's connection
                nursery). Each runs in its own cancel scope; when the session
                ends, all of them are cancelled, and they finish their cleanup
                (closing response iterators) on their own, like the request
                goroutines of Go's HTTP/2 server. A nursery per session would
                cost ~1 KiB more per idle node.
        """
        sock = plain_socket(self._stream)
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
                        and deadline > trio.current_time()
                    ):
                        # Idle: wait with no task at all in the server's shared
                        # waiter, which resumes this reader when data comes or
                        # the deadline passes (_rearm takes it out when the
                        # deadline moves).
                        self._idle.park(sock.fileno(), self, deadline)
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
                            data = bytes(await self._stream.receive_some(MAX_RECV))
                        finally:
                            self._wait = None
                    if data is None:  # the deadline passed
                        await self._on_deadline()
                        more = False
                        continue
                    if not data:
                        self._closing_reason = "peer closed the connection"
                        break
                    more = len(data) == MAX_RECV
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
        sock = plain_socket(self._stream)
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
        for scope in (self._scopes or {}).values():
            scope.cancel()
        self._notify_window()
        if self._reader is not None:
            self._reader.cancel()
            return
        sock = plain_socket(self._stream)
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
        held = self._conn.buffered_outgoing() + self._unsent + len(self._backlog)
        cap = self._options.max_outgoing_buffer
        if held > cap:
            self._abort(f"{held} bytes not taken by the peer (cap {cap})", "buffer")
            raise _ConnectionLost("slow reader")

    async def _cleanup(self) -> None:
        """The session ended: cancel its handlers, close its parked streams."""
        for scope in list((self._scopes or {}).values()):
            scope.cancel()
        self._notify_window()
        while self._parked:  # their resume() does nothing from now on
            _, stream = self._parked.popitem()
            await self._close_iterator(stream)

    async def serve(self, handlers: trio.Nursery, idle: IdleReaders | None, *, resumed: bool = False) -> None:
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
                self._add_scope(event.stream_id, scope)
                request = replace(
                    event.request,
                    cancel=_Cancel(self, event.stream_id),
                    remote_addr=self._peer.rpartition(":")[0],
                )
                handlers.start_soon(self._serve_request, event.stream_id, request, scope)
                del request
            elif isinstance(event, h2flow.StreamReset):
                reset_scope = self._pop_scope(event.stream_id)
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
            # not fit continues below, under the lock, before anybody else's
            # (wire.sockets explains why writing trio's socket directly is safe).
            sock = plain_socket(self._stream)
            fd = sock.fileno() if sock is not None else -1  # -1 once closed
            if fd >= 0:
                data = self._take(take)
                if not data:
                    return
                try:
                    left = write_nowait(fd, data)
                except OSError as exc:
                    self._conn.send_failed()
                    raise _ConnectionLost(f"write failed: {exc.strerror}") from exc
                if left is None:
                    return
                rest = left
        if lock is None:
            lock = self._send_lock = trio.Lock()
        try:
            if rest:
                lock.acquire_nowait()  # free: checked above, and nothing awaited since
            else:
                await lock.acquire()
            try:
                out = rest or self._take(take)
                if not out:
                    return
                await self._write_out(out)
            finally:
                lock.release()
        finally:
            if self._send_lock is lock and not lock.locked():
                self._send_lock = None

    def _take(self, take: Callable[[], bytes]) -> bytes:
        """``take()``, after the backlog a task-less write left (records in nonce order)."""
        data = take()
        if self._backlog:
            data, self._backlog = self._backlog + data, b""
        return data

    def _send_now(self, stream_id: int, data: bytes) -> bool:
        """Send ``data`` on the parked long poll ``stream_id`` at once, from whatever
        task calls (the ``send_now`` of :class:`~protocol.handler.Park`: the map
        streams' keep-alive ticker sends idle streams their keep-alive so, with no
        task and no resumption of the stream).

        Only when that needs no wait: the stream is still parked, the session open,
        on plain TCP, nobody writing, and the stream has nothing waiting for
        flow-control window. Then the DATA frame is sealed and written right here
        (nothing is awaited between taking the bytes and writing them, so records
        stay in nonce order); what the socket does not take at once is the backlog,
        which a flush task writes, before anybody else's bytes (:meth:`_take`).

        Returns:
            Whether it was sent; ``False``: nothing was (the caller resumes the
            stream, which sends it the usual way).
        """
        if stream_id not in self._parked or self._closing_reason or self._handlers is None:
            return False
        lock = self._send_lock
        sock = plain_socket(self._stream)
        fd = sock.fileno() if sock is not None else -1
        if fd < 0 or (lock is not None and lock.locked()) or self._conn.pending(stream_id):
            return False
        try:
            self._conn.send_data(stream_id, data, end_stream=False)
        except ProtocolError:
            return False  # the connection failed or is closing: resumed, the stream finds out
        try:
            self._check_outgoing()
        except _ConnectionLost:
            return True  # closing: nothing more is written; the session ends its streams
        out = self._take(self._conn.data_to_send)
        if not out:
            return True  # held for flow-control window: the reader's flush sends it
        try:
            left = write_nowait(fd, out)
        except OSError:
            self._conn.send_failed()  # the reader sees the connection end
            return True
        if left is not None:
            self._backlog = bytes(left)
            with contextlib.suppress(RuntimeError):  # the nursery is closing: the session ends anyway
                self._handlers.start_soon(self._flush_quietly)
        return True

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
            # One cancel scope for the whole write, its deadline moved on per piece
            # (a scope per piece cost a few percent of a restart's fan-out of full maps).
            with trio.CancelScope() as stall:
                for start in range(0, len(view), _WRITE_PIECE):
                    piece = view[start : start + _WRITE_PIECE]
                    stall.deadline = trio.current_time() + timeout
                    await self._stream.send_all(piece)
                    self._unsent -= len(piece)
            if stall.cancelled_caught:
                self._abort(f"nothing written for {timeout:g}s", "write_stall")
                raise _ConnectionLost("write stalled")
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
            if self._scopes is not None and self._scopes.get(stream_id) is scope:
                self._pop_scope(stream_id)
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
                chunk.register(
                    _Resume(self, stream_id),
                    _SendNow(self, stream_id) if plain_socket(self._stream) is not None else None,
                )
                return True
            if chunk:
                await self._send_body(stream_id, chunk, end_stream=False)
            # Not kept while waiting for the next one: a long poll's first
            # chunk is a full map, and the next may come hours later.
            del chunk

    def _pop_scope(self, stream_id: int) -> trio.CancelScope | None:
        """Forget the task scope of a stream; ``None`` if it has none. The last one out
        leaves no dict (see :func:`_pop_dropping_empty`)."""
        scope, self._scopes = _pop_dropping_empty(self._scopes, stream_id)
        return scope

    def _add_scope(self, stream_id: int, scope: trio.CancelScope) -> None:
        """Remember the task scope of a stream (see :meth:`_pop_scope`)."""
        if self._scopes is None:
            self._scopes = {}
        self._scopes[stream_id] = scope

    def _resume(self, stream_id: int) -> None:
        """Drive a parked long poll again, from a new task (see :class:`Park`)."""
        stream = self._parked.pop(stream_id, None)
        if stream is None or self._handlers is None:
            return  # ended (reset, closed) meanwhile
        if self._closing_reason:  # the session's end closes it (run)
            self._parked[stream_id] = stream
            return
        scope = trio.CancelScope()
        self._add_scope(stream_id, scope)
        try:
            self._handlers.start_soon(self._serve_request, stream_id, None, scope, stream)
        except RuntimeError:  # the nursery is closing: the session closes it
            self._pop_scope(stream_id)
            self._parked[stream_id] = stream

    def _cancel_stream(self, stream_id: int) -> None:
        """End a stream from the handler's side (``NoiseRequest.cancel``): cancel the
        task serving it, or close its parked iterator, and reset it with CANCEL."""
        scope = self._pop_scope(stream_id)
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


async def open_session(
    stream: trio.abc.Stream,
    peer: str,
    initiation: bytes,
    trailing: bytes,
    *,
    websocket: bool,
    admitted: Admitted | None,
    server_key: Keypair,
    handler: ControlHandler,
    options: ServeOptions,
    stats: ConnectionStats,
) -> NoiseSession | None:
    """Complete the handshake; return the session to run (``None``: refused).

    Args:
        stream: The upgraded stream (plain, TLS, or WebSocket-framed).
        peer: ``host:port`` for log lines.
        initiation: The client's Noise initiation message (from the upgrade).
        trailing: Client bytes that arrived after it, with the upgrade.
        websocket: A WebSocket upgrade: the 101 was sent already, and no
            early payload goes out (as Go).
        admitted: The connection's place in the caps, released on close.
        server_key: Our Noise static key.
        handler: Called for every request inside the tunnel.
        options: The tunables.
        stats: Where the session counts timeouts and slow readers.
    """
    opts = options
    early = opts.send_early_payload and not websocket
    try:
        conn = h2_bridge.ServerConnection(
            server_private=server_key,
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
    return NoiseSession(
        stream,
        conn,
        handler,
        opts,
        peer,
        first=first,
        trailing=trailing,
        stats=stats,
        admitted=admitted,
    )

