"""DERP connection I/O: how one client's bytes get in and out of the relay core.

Theory of operation
-------------------
After the HTTP front door (:mod:`relay.serve.server`) has upgraded a stream to
DERP, :meth:`DerpIO.serve` runs it as two tasks around the sans-I/O
:class:`~relay.derp.server.RelayCore`::

    socket ─▶ reader task ─▶ core.receive_data ─▶ destinations' queues
                   │                                   │ waker
                   └─ direct write(2) on plain TCP ◀───┤ (inside receive_data)
                                                       └─▶ writer task ─▶ send_all

* The **reader** never waits for anything but its own socket.  During login it
  runs under ``handshake_timeout``; afterwards it hands each chunk to the core,
  which queues the packets on the destinations' bounded queues and calls
  their wakers.
* While the reader is inside ``receive_data`` a waker only marks the
  destination dirty; after the chunk, the reader itself flushes every dirty
  plain-TCP destination with one non-blocking ``write(2)`` each
  (:meth:`DerpIO._flush_dirty`).  Most batches leave this way, with no task
  switch.  What the kernel does not take at once, and everything on TLS or
  WebSocket streams, goes to the destination's **writer** task.
* A **writer** parks on its :class:`Wakeup` and sends whatever is pending or
  queued, blocking as long as it must.

Invariants
----------
* Only one party writes a socket at a time: while a writer owns it
  (``ConnIO.busy``) nobody writes directly, so bytes never interleave.
* A write that does not finish within ``write_timeout`` gets its connection
  closed by one shared watchdog (:meth:`DerpIO.write_watchdog`), counted as a
  write timeout and a write error, like Tailscale's 2-second TCP write
  deadline.  One watchdog for all clients, reading ``ConnIO.started``, costs
  less than a cancel scope and a deadline registration per batch.
* One keep-alive ticker (:meth:`DerpIO.keepalive`) serves every client.
* When either task ends, the other is cancelled and the core is told the
  connection is gone; nothing outlives the connection's nursery.

Why it writes a trio-owned socket directly: the direct path is the relay's hot
path, and going through trio would cost a task switch per batch. The control
port does the same for its Noise records; the helpers and the argument why it
is safe are :mod:`wire.sockets`' (:func:`~wire.sockets.plain_socket`,
:func:`~wire.sockets.write_nowait`). Here the ``busy`` flag is what keeps the
writer task and the direct path from writing the same socket at once.
"""

from __future__ import annotations

import logging
import random
from functools import partial

import msgspec
import trio

from wire.sockets import format_address, plain_socket, write_nowait

from ..derp.server import RelayCore, ServerConn
from ..errors import RemoteProtocolError
from ..keys import short_key
from .config import RelayConfig

__all__ = ["ConnIO", "DerpIO", "IoStats", "Wakeup"]

log = logging.getLogger("tailledger.relay")

RECV_SIZE = 65536
"""Bytes asked of a stream per read (DERP and the HTTP front door alike)."""


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


class Wakeup:
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


class ConnIO:
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
        self.wake = Wakeup()
        self.scope = trio.CancelScope()
        self.busy = False
        self.dirty = False
        self.pending: memoryview | None = None
        self.packets = 0
        self.started: float | None = None
        self.timed_out = False


class DerpIO:
    """The DERP streams of one relay: their reader and writer tasks, and the shared tickers.

    Args:
        core: the sans-I/O relay core the streams feed.
        config: ``handshake_timeout``, ``write_timeout`` and
            ``keepalive_interval`` are read from it.
    """

    def __init__(self, core: RelayCore, config: RelayConfig) -> None:
        self.core = core
        self.config = config
        self.counts = {k: 0 for k in IoStats.__struct_fields__}
        self._watches: set[ConnIO] = set()
        self._dirty: list[ConnIO] = []
        self._receiving = False

    def stats(self) -> IoStats:
        """Counters of reads and of the two write paths."""
        return IoStats(**self.counts)

    async def serve(
        self,
        stream: trio.abc.Stream,
        initial: bytes,
        remote: tuple[str, int] | None,
        ideal_node: str | None,
    ) -> None:
        """Run one DERP stream until it ends (``initial``: bytes read past the upgrade)."""
        core = self.core
        conn = core.accept(remote, ideal_node=ideal_node)
        sock = plain_socket(stream)
        fd = sock.fileno() if sock is not None else None
        io = ConnIO(conn, fd)
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
                log.info(
                    "relay: %s %s closed: %s",
                    format_address(remote),
                    short_key(conn.key),
                    conn.close_reason,
                )

    def _on_wake(self, io: ConnIO) -> None:
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
        """Write what the last chunk queued, directly, without blocking (see :class:`ConnIO`)."""
        dirty, self._dirty = self._dirty, []
        core = self.core
        counts = self.counts
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
                rest = write_nowait(io.fd, data)
            except OSError:
                core.write_failed(conn, packets, len(data))
                io.wake.set()
                continue
            if rest is not None:
                counts["partial_writes"] += 1
                io.pending = rest
                io.packets = packets
                io.busy = True
                io.wake.set()

    async def _reader(self, stream: trio.abc.Stream, conn: ServerConn, initial: bytes) -> None:
        core = self.core
        if initial:
            core.receive_data(conn, initial)
        try:
            with trio.move_on_after(self.config.handshake_timeout) as login_scope:
                while conn.state is conn.state.LOGIN:
                    data = await stream.receive_some(RECV_SIZE)
                    if not data:
                        core.connection_lost(conn, "EOF during login")
                        return
                    core.receive_data(conn, data)
        except RemoteProtocolError as exc:  # the WebSocket under DERP (text, bad framing)
            core.transport_violation(conn, str(exc))
            return
        if login_scope.cancelled_caught:
            core.close(conn, "login timeout")
            return
        receive_data = core.receive_data
        counts = self.counts
        while not conn.closed:
            try:
                data = await stream.receive_some(RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                core.connection_lost(conn, "read error")
                return
            except RemoteProtocolError as exc:
                core.transport_violation(conn, str(exc))
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

    async def _writer(self, stream: trio.abc.Stream, io: ConnIO, scope: trio.CancelScope) -> None:
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
                        self.counts["task_writes"] += 1
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
                self.counts["write_timeouts"] += 1
                core.write_failed(conn, io.packets, nbytes)
        finally:
            self._watches.discard(io)
            scope.cancel()

    async def write_watchdog(self, limit_seconds: float) -> None:
        """Close connections whose current write has taken longer than ``limit_seconds``."""
        while True:
            await trio.sleep(min(1.0, limit_seconds / 4))
            limit = trio.current_time() - limit_seconds
            for watch in list(self._watches):
                started = watch.started
                if started is not None and started < limit:
                    watch.timed_out = True
                    watch.scope.cancel()

    async def keepalive(self) -> None:
        """Queue a keep-alive frame for every client, every ``keepalive_interval`` (plus jitter)."""
        while True:
            # Tailscale: every 60 s plus up to 5 s of jitter; keep that ratio.
            await trio.sleep(self.config.keepalive_interval * random.uniform(1.0, 1.0 + 1 / 12))
            self.core.keepalive()
