"""HTTP/2 helpers shared by both ends: flow-controlled DATA queues, common events.

Role in the pipeline: both the server bridge (:mod:`protocol.h2_bridge`) and the
client core (:mod:`protocol.client_conn`) hand bodies to an
:class:`OutboundQueues`; it passes to ``h2`` only what the peer's stream and
connection windows admit, in frames no larger than the peer's
``MAX_FRAME_SIZE``, and keeps the rest until the peer sends WINDOW_UPDATE (or
raises its initial window through SETTINGS), when the owner calls
:meth:`OutboundQueues.flush` again.

Why it matters here: a netmap for a large tailnet is several hundred KiB while
HTTP/2's default stream window is 64 KiB, so a server that ignores flow control
either errors (``h2`` refuses) or floods a slow client. Go clients advertise
large windows but do respect WINDOW_UPDATE (docs/control-protocol.md §5.2).

The events both ends report alike (:class:`StreamReset`, :class:`WindowUpdated`,
:class:`ConnectionTerminated`) are defined here once, and
:func:`translate_common` maps ``h2``'s events to them; each end adds its own
events (requests for the server, responses for the client) to the union it
returns. Why here and not in the bottom package :mod:`wire`: only the control
protocol speaks HTTP/2 (the relay speaks HTTP/1.1 and WebSocket), so the
lowest place both users can import is this module, the same reasoning that
keeps :mod:`protocol.compat` inside :mod:`protocol`.

Importing this module installs the cheaper ``hyperframe`` payload repr
(:func:`protocol.compat.install_cheap_data_repr`): ``h2`` formats one for every
frame either end receives. The compact ``h2`` and ``hpack`` structures that keep
an idle tunnel small live in :mod:`protocol.compat` with the other reliances on
those libraries' internals.

Invariants:

* Bytes of one stream leave in order; ``end_stream`` is sent with (or right
  after) the last queued byte, never before.
* Queued bytes are stored as chunks with a read offset, so draining a large
  body costs O(body), not O(body^2).
* A stream that ``h2`` reports closed (peer reset, our reset) is dropped
  silently: its bytes would have nowhere to go.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import h2.connection
import h2.events
import h2.exceptions

from .compat import install_cheap_data_repr

__all__ = [
    "CommonEvent",
    "ConnectionTerminated",
    "OutboundQueues",
    "StreamReset",
    "WindowUpdated",
    "translate_common",
]

install_cheap_data_repr()


# -- events both ends report ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset ``stream_id``.

    The server stops the stream's handler (or closes its response iterator);
    the client ends the response it was reading.
    """

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """Flow-control windows may have grown: queued bodies may have drained."""


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY; the connection should be closed.

    Attributes:
        error_code: The GOAWAY's error code (``0``: NO_ERROR, a clean close).
        last_stream_id: The highest stream the peer says it processed.
        reason: The GOAWAY's debug data, decoded as Latin-1 (``""``: none).
    """

    error_code: int
    last_stream_id: int
    reason: str


CommonEvent = StreamReset | WindowUpdated | ConnectionTerminated


def translate_common(ev: h2.events.Event, outbound: OutboundQueues) -> CommonEvent | None:
    """Our event for an ``h2`` event both ends treat alike; ``None`` for any other.

    A reset stream's queued body bytes are dropped from ``outbound`` (they would
    have nowhere to go). ``RemoteSettingsChanged`` counts as a window update: the
    peer may have raised ``SETTINGS_INITIAL_WINDOW_SIZE``.
    """
    if isinstance(ev, h2.events.StreamReset):
        assert ev.stream_id is not None
        outbound.discard(ev.stream_id)
        code = int(ev.error_code) if ev.error_code is not None else 0
        return StreamReset(stream_id=ev.stream_id, error_code=code)
    if isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
        return WindowUpdated()
    if isinstance(ev, h2.events.ConnectionTerminated):
        return ConnectionTerminated(
            error_code=int(ev.error_code) if ev.error_code is not None else 0,
            last_stream_id=ev.last_stream_id or 0,
            reason=ev.additional_data.decode("latin-1") if ev.additional_data else "",
        )
    return None


class _Pending:
    """Bytes of one stream that did not fit the window yet."""

    __slots__ = ("chunks", "end_stream", "head_offset", "size")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.head_offset = 0  # bytes of chunks[0] already sent
        self.size = 0  # total unsent bytes
        self.end_stream = False

    def take(self, limit: int) -> bytes:
        """Remove and return up to ``limit`` bytes from the front."""
        parts: list[bytes] = []
        need = limit
        while need and self.chunks:
            head = self.chunks[0]
            available = len(head) - self.head_offset
            if available <= need:
                parts.append(head[self.head_offset :] if self.head_offset else head)
                self.chunks.popleft()
                self.head_offset = 0
                need -= available
            else:
                parts.append(head[self.head_offset : self.head_offset + need])
                self.head_offset += need
                need = 0
        taken = b"".join(parts) if len(parts) != 1 else parts[0]
        self.size -= len(taken)
        return taken


class OutboundQueues:
    """Per-stream DATA queues in front of an ``h2.connection.H2Connection``.

    The owner calls :meth:`queue` to send a body chunk and :meth:`flush`
    whenever windows may have grown (after every ``receive_data``). Neither
    method performs I/O; frames accumulate in ``conn.data_to_send()``.
    """

    __slots__ = ("_conn", "_streams")

    def __init__(self, conn: h2.connection.H2Connection) -> None:
        self._conn = conn
        self._streams: dict[int, _Pending] = {}

    def queue(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Append ``data`` to the stream and send what the windows admit.

        Args:
            stream_id: An open stream on which we may still send.
            data: Body bytes (may be empty, e.g. to only end the stream).
            end_stream: Close our side of the stream after ``data``.
        """
        pending = self._streams.get(stream_id)
        if pending is None:
            pending = self._streams[stream_id] = _Pending()
        if data:
            pending.chunks.append(data)
            pending.size += len(data)
        if end_stream:
            pending.end_stream = True
        self._flush_stream(stream_id, pending)

    def pending(self, stream_id: int) -> int:
        """Number of queued bytes of ``stream_id`` not yet handed to h2."""
        pending = self._streams.get(stream_id)
        return 0 if pending is None else pending.size

    def has_pending(self) -> bool:
        """Whether any stream still waits for window."""
        return bool(self._streams)

    def queued(self) -> int:
        """Bytes of every stream still waiting for window (summed on demand: at
        most ``SETTINGS_MAX_CONCURRENT_STREAMS`` streams, and none when idle)."""
        return sum(pending.size for pending in self._streams.values())

    def discard(self, stream_id: int) -> None:
        """Forget everything queued for ``stream_id`` (it was reset)."""
        self._forget(stream_id)

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        if not self._streams:
            # A dict keeps its grown table after deletions; an idle
            # connection should not (a fresh empty dict has none).
            self._streams = {}

    def flush(self) -> None:
        """Send queued data on every stream as far as the windows allow."""
        for stream_id, pending in list(self._streams.items()):
            self._flush_stream(stream_id, pending)

    def _flush_stream(self, stream_id: int, pending: _Pending) -> None:
        conn = self._conn
        try:
            while pending.size:
                window = conn.local_flow_control_window(stream_id)
                if window <= 0:
                    return
                limit = min(window, conn.max_outbound_frame_size, pending.size)
                chunk = pending.take(limit)
                last = pending.size == 0 and pending.end_stream
                conn.send_data(stream_id, chunk, end_stream=last)
                if last:
                    self._forget(stream_id)
                    return
            if pending.end_stream:
                conn.end_stream(stream_id)
            self._forget(stream_id)
        except h2.exceptions.NoSuchStreamError:
            # The peer reset the stream (or it was closed); nothing to send to.
            self._forget(stream_id)
