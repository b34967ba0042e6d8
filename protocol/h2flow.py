"""HTTP/2 helpers shared by both ends: flow-controlled DATA queues, compact settings.

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
large windows but do respect WINDOW_UPDATE (control-protocol.md §5.2).

Memory of idle connections: a tunnel lives for days, mostly idle, and
``h2`` stores small things in ``collections.deque`` objects, each of which
allocates a 64-slot block (~0.6 KiB) even for one value.
:class:`CompactSettings` is a drop-in ``h2.settings.Settings`` that keeps the
current values in one dict and the values still waiting for acknowledgement
in another (empty once SETTINGS were acknowledged); ``h2``'s own pair of
Settings objects costs ~9 KiB per connection, a third of an idle tunnel.
:func:`compact_header_tables` does the same for the two HPACK dynamic tables.

Invariants:

* Bytes of one stream leave in order; ``end_stream`` is sent with (or right
  after) the last queued byte, never before.
* Queued bytes are stored as chunks with a read offset, so draining a large
  body costs O(body), not O(body^2).
* A stream that ``h2`` reports closed (peer reset, our reset) is dropped
  silently: its bytes would have nowhere to go.
* :class:`CompactSettings` behaves exactly like ``h2.settings.Settings``
  (same defaults and key order, same validation and error codes, values
  become current only on ``acknowledge()``); only the storage differs. The
  same holds for the HPACK tables after :func:`compact_header_tables`.
"""

from __future__ import annotations

import binascii
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Final

import h2.connection
import h2.errors
import h2.exceptions
import h2.settings
import hyperframe.frame

__all__ = ["CompactSettings", "OutboundQueues", "compact_header_tables"]

_Code = h2.settings.SettingCodes | int
_SC = h2.settings.SettingCodes
_PROTOCOL_ERROR: Final = h2.errors.ErrorCodes.PROTOCOL_ERROR


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


def _invalid_setting(code: _Code, value: int) -> h2.errors.ErrorCodes | None:
    """The error code for an out-of-range setting value (RFC 9113 §6.5.2), else ``None``.

    The same rules, in the same order, as ``h2.settings`` applies on writes.
    """
    if code == _SC.ENABLE_PUSH or code == _SC.ENABLE_CONNECT_PROTOCOL:
        return None if value in (0, 1) else _PROTOCOL_ERROR
    if code == _SC.INITIAL_WINDOW_SIZE:
        ok = 0 <= value <= 2**31 - 1
        return None if ok else h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
    if code == _SC.MAX_FRAME_SIZE:
        return None if 2**14 <= value <= 2**24 - 1 else _PROTOCOL_ERROR
    if code == _SC.MAX_HEADER_LIST_SIZE:
        return None if value >= 0 else _PROTOCOL_ERROR
    return None


#: Settled settings shared by every connection that has them (see CompactSettings).
_SETTLED: dict[tuple[tuple[_Code, int | None], ...], dict[_Code, int | None]] = {}
#: At most this many distinct sets are remembered (clients choose their settings).
_SETTLED_MAX: Final = 64


def _settled(current: dict[_Code, int | None]) -> dict[_Code, int | None]:
    """The shared dict equal to ``current`` (it may be ``current`` itself)."""
    key = tuple(current.items())
    shared = _SETTLED.get(key)
    if shared is None:
        if len(_SETTLED) >= _SETTLED_MAX:
            # The oldest goes (its connections keep their dict); common sets come
            # back at once, so odd ones cannot crowd them out.
            del _SETTLED[next(iter(_SETTLED))]
        shared = _SETTLED[key] = current
    return shared


class CompactSettings(h2.settings.Settings):
    """``h2.settings.Settings`` that stores plain ints instead of a deque per setting.

    While nothing is pending, the current values live in a dict shared by every
    connection with the same settings (nearly all clients send the same), copied
    on the next change.

    Assign instances to ``H2Connection.local_settings`` and
    ``H2Connection.remote_settings`` right after creating the connection,
    before any frame is sent or received. ``h2`` uses settings only through
    the public mapping interface (get, set, ``update``, ``items``, the named
    properties, ``acknowledge``), all of which behave as in the base class:

    * ``settings[code] = value`` validates and *proposes* a value; it becomes
      current at the next :meth:`acknowledge` (values queue up in order).
    * ``settings[code]`` is the current value; a code first proposed and not
      yet acknowledged raises ``KeyError`` (it still counts in ``len`` and
      iteration, as in ``h2``).
    """

    def __init__(
        self, client: bool = True, initial_values: Mapping[_SC, int] | None = None
    ) -> None:
        """Defaults of RFC 9113 (``ENABLE_PUSH`` = 1 for a client), then ``initial_values``.

        Raises:
            h2.exceptions.InvalidSettingsValueError: An initial value is out of range.
        """
        # The base __init__ is not called: it would build the deques we avoid.
        self._client = client
        current: dict[_Code, int | None] = {
            _SC.HEADER_TABLE_SIZE: 4096,
            _SC.ENABLE_PUSH: int(client),
            _SC.INITIAL_WINDOW_SIZE: 65535,
            _SC.MAX_FRAME_SIZE: 16384,
            _SC.ENABLE_CONNECT_PROTOCOL: 0,
        }
        for code, value in (initial_values or {}).items():
            self._check(code, value)
            current[code] = value
        self._current = _settled(current)
        self._shared = True  # _current may be another instance's: copy before a change
        # Proposed values per code, oldest first; absent when nothing is pending.
        self._pending: dict[_Code, list[int]] = {}

    def _own(self) -> dict[_Code, int | None]:
        """``_current``, made this instance's own before a change."""
        if self._shared:
            self._current, self._shared = dict(self._current), False
        return self._current

    @staticmethod
    def _check(code: _Code, value: int) -> None:
        error = _invalid_setting(code, value)
        if error is not None:
            raise h2.exceptions.InvalidSettingsValueError(
                f"Setting {code} has invalid value {value}", error_code=error
            )

    def acknowledge(self) -> dict[_Code, h2.settings.ChangedSetting]:
        """Make the oldest proposed value of every code current; return what changed."""
        changed: dict[_Code, h2.settings.ChangedSetting] = {}
        if not self._pending:
            return changed
        current = self._own()
        for code in list(current):  # key order, like h2
            queued = self._pending.get(code)
            if not queued:
                continue
            old, new = current[code], queued.pop(0)
            current[code] = new
            if not queued:
                del self._pending[code]
            changed[code] = h2.settings.ChangedSetting(code, old, new)
        if not self._pending:
            self._pending = {}  # a dict keeps its grown table; a fresh one has none
            self._current, self._shared = _settled(current), True
        return changed

    def __getitem__(self, key: _Code) -> int:
        value = self._current[key]
        if value is None:  # proposed, never acknowledged
            raise KeyError(key)
        return value

    def __setitem__(self, key: _Code, value: int) -> None:
        self._check(key, value)
        if key not in self._current:
            self._own()[key] = None
        self._pending.setdefault(key, []).append(value)

    def __delitem__(self, key: _Code) -> None:
        del self._own()[key]
        self._pending.pop(key, None)

    def __iter__(self) -> Iterator[_Code]:
        return iter(self._current)

    def __len__(self) -> int:
        return len(self._current)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CompactSettings):
            return self._current == other._current and self._pending == other._pending
        return NotImplemented

    __hash__ = h2.settings.Settings.__hash__


class _DynamicEntries(list[tuple[bytes, bytes]]):
    """An HPACK dynamic table's entries, newest first, on a list instead of a deque."""

    __slots__ = ()

    def appendleft(self, entry: tuple[bytes, bytes]) -> None:
        """Add the newest entry (hpack's only deque-specific call)."""
        self.insert(0, entry)


def compact_header_tables(conn: h2.connection.H2Connection) -> bool:
    """Keep the HPACK dynamic tables of ``conn`` in lists; call before any frame moves.

    ``hpack.table.HeaderTable`` holds its entries in a deque (~0.6 KiB even
    when empty) and uses only ``appendleft``, ``pop``, ``clear``, ``len``,
    indexing and iteration on it, which a list does as well. A table holds
    at most ``HEADER_TABLE_SIZE / 32`` entries (128 for the default 4 KiB),
    so inserting at the front of a list is as cheap as on a deque.

    Returns:
        Whether both tables were converted. If a future ``hpack`` stores its
        entries differently, nothing is touched and ``False`` comes back.
    """
    tables = (conn.encoder.header_table, conn.decoder.header_table)
    if not all(type(getattr(t, "dynamic_entries", None)) is deque for t in tables):
        return False
    for table in tables:
        entries = _DynamicEntries(table.dynamic_entries)
        table.dynamic_entries = entries  # type: ignore[assignment]  # same operations
    return True


# -- h2's trace line --------------------------------------------------------------------

_original_data_repr: Final = getattr(hyperframe.frame, "_raw_data_repr", None)


def _data_repr(data: bytes | None) -> str:
    """``hyperframe``'s DATA payload repr, hexlifying only the 10 bytes it shows.

    ``h2`` formats ``repr(frame)`` for a trace log line on every frame it receives,
    even with logging off, and ``hyperframe`` hexlifies the whole payload to keep 20
    hex digits of it: 33 us per 16 KiB frame, ~6 s of a 5,000-client reconnect for
    the load generator (the server receives few DATA frames). Same output.
    """
    if not data:
        return "None"
    shown = binascii.hexlify(data[:11]).decode("ascii")
    if len(shown) > 20:
        shown = shown[:20] + "..."
    return "<hex:" + shown + ">"


if _original_data_repr is not None:
    hyperframe.frame._raw_data_repr = _data_repr
