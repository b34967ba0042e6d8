"""Every reliance on the internals of h2, hpack, hyperframe and hypercorn, in one place.

Role in the pipeline: the HTTP/2 core (:mod:`protocol.h2_bridge`, and through
:mod:`protocol.h2flow` the client core) and the control port's adapter
(:mod:`protocol.serve`) use these libraries through their public APIs only.
Whatever depends on a private attribute, a class layout or an undocumented
call lives here instead, so that an upgrade has one file to read and one test
file to run (``tests/protocol/test_compat.py``), and the upper bounds in
``pyproject.toml`` (h2 < 4.5, hpack < 4.3, hyperframe < 6.2, hypercorn < 0.19:
the minor versions verified) say which versions that file was checked with.

Why a module of :mod:`protocol`, not a package of its own: only the control
protocol runs h2 and hypercorn. The relay speaks HTTP/1.1 (h11) and WebSocket
(wsproto) through their public APIs, and relay and protocol may not import each
other (``tests/test_packaging.py``), so nothing else would ever import it.
Nothing here does I/O: the sans-I/O HTTP/2 cores use items 1-5, and only the
trio adapter (:mod:`protocol.serve`) uses item 6, hypercorn's trio driver.

What each item relies on, what it buys, and what happens when upstream changes
(every item has guard tests that fail when the internal it relies on changes;
where the table says "detected", the running code also falls back to the stock
behaviour by itself):

====  ==========  =====================================================  =====================================
item  library     internal relied on                                      fallback if it changes
====  ==========  =====================================================  =====================================
1     h2          ``H2Connection._frame_dispatch_table``: a dict of       detected: the stock dict stays
                  bound methods, built in ``__init__``, only indexed by
                  frame class (:class:`CompactH2Connection`, ~0.6 KiB
                  per connection)
2     h2          ``H2Connection.MAX_CLOSED_STREAMS`` read by             none: guard test;
                  ``__init__`` as the size of its closed-stream record    detected: the stock
                  (:class:`CompactH2Connection`, up to ~6 MiB per         record stays
                  tunnel); that record, ``_closed_streams``, is a
                  mapping h2 only assigns to, tests with ``in`` and
                  indexes (:class:`_ClosedStreams`, ~0.4 KiB)
3     h2          ``local_settings``/``remote_settings`` are plain        none: guard test
                  attributes, used only through ``Settings``' public
                  mapping interface, and ``Settings``' inherited methods
                  use nothing but it (:class:`CompactSettings`, ~9 KiB)
4     hpack       ``HeaderTable.dynamic_entries`` is a deque used only    detected: the deques stay
                  through ``appendleft``, ``pop``, ``clear``, ``len``,
                  indexing and iteration (:func:`compact_header_tables`);
                  ``Encoder.huffman_coder`` is a ``HuffmanEncoder`` that  detected: the encoder
                  only reads its two code tables, so one is shared by     keeps its own
                  every connection (~0.15 KiB each)
5     hyperframe  ``hyperframe.frame._raw_data_repr(data)``, called by    detected: not installed
                  the frames' ``__repr__`` (:func:`install_cheap_data_repr`)
6     hypercorn   the per-connection driver ``worker_serve`` uses:        none: guard test
                  ``TCPServer(app, config, context, state, stream)``,
                  ``Lifespan``, ``WorkerContext``, ``ASGIWrapper``,
                  ``ConnectionState`` (re-exported below; the hand-off
                  in :mod:`protocol.serve.handoff` explains why); and
                  ``TCPServer.protocol_send(event)`` receiving the
                  protocol's ``Updated(idle=...)`` events
                  (:class:`BusyAwareTCPServer`: the request deadline of
                  hand-off connections)
7     h2          ``H2Connection._data_to_send``: the serialised frames   detected: counts 0
                  ``data_to_send()`` has not handed out yet, a bytearray
                  (:func:`unsent_bytes`, for capping a connection's
                  outgoing buffer)
====  ==========  =====================================================  =====================================

Upstream, item 5 is a plain cost bug. The issue we would file at
python-hyper/hyperframe (with a pointer to python-hyper/h2)::

    Title: Frame.__repr__ hexlifies the whole payload to show 20 hex digits

    ``_raw_data_repr(data)`` runs ``binascii.hexlify(data)`` over the entire
    payload, decodes it to str, and then keeps the first 20 characters. For a
    16 KiB DATA frame that is a 32 KiB string built and thrown away: about
    33 us per frame on a 2020-era x86 core, O(payload) for an O(1) result.

    This matters because h2 calls ``repr(frame)`` eagerly for every frame it
    receives (``H2Connection._receive_frame``:
    ``self.config.logger.trace("Received frame: %s", repr(frame))``), even
    with the default ``DummyLogger``, whose ``trace`` is a no-op. A client
    receiving 5,000 streams of map data spent ~6 s of CPU in this function.

    Suggested fix (same output, byte for byte): hexlify only what is shown,
    ``binascii.hexlify(data[:11])`` (11 bytes give 22 digits, so the "..."
    suffix still appears exactly when the payload is longer than 10 bytes).
    Separately, h2 could pass ``frame`` instead of ``repr(frame)`` so that
    logging's lazy %-formatting skips the work when the logger is off; we
    would file that at python-hyper/h2.

    Versions: hyperframe 6.1.0, h2 4.4.1, CPython 3.11.

Invariants:

* Every class and function here behaves exactly like the stock object it
  replaces (``tests/protocol/test_transport_memory.py`` checks them against
  the stock ones with Hypothesis); only storage or cost differs.
* Nothing outside this module names a private attribute of these libraries
  (``tests/protocol/test_compat.py`` scans the tree).
"""

from __future__ import annotations

import binascii
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings
import h2.stream
import h2.utilities
import hpack.hpack
import hpack.huffman
import hyperframe.frame
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Event, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

__all__ = [
    "ASGIWrapper",
    "BusyAwareTCPServer",
    "CompactH2Connection",
    "CompactSettings",
    "ConnectionState",
    "Lifespan",
    "TCPServer",
    "WorkerContext",
    "compact_header_tables",
    "install_cheap_data_repr",
    "unsent_bytes",
]

_Code = h2.settings.SettingCodes | int
_SC = h2.settings.SettingCodes
_PROTOCOL_ERROR: Final = h2.errors.ErrorCodes.PROTOCOL_ERROR


# -- items 1, 2 and 7: h2's connection ----------------------------------------------------

def _dispatch_names() -> dict[type, str]:
    """Frame class -> name of the ``H2Connection`` method that receives it.

    Read from a probe connection, so it follows whatever ``h2`` maps; empty
    if ``h2`` no longer keeps a dict of bound methods (then nothing is swapped).
    """
    probe = h2.connection.H2Connection()
    table = getattr(probe, "_frame_dispatch_table", None)
    if not isinstance(table, dict):
        return {}
    names: dict[type, str] = {}
    for frame_type, method in table.items():
        name = getattr(method, "__name__", "")
        if getattr(method, "__self__", None) is not probe or getattr(probe, name, None) != method:
            return {}
        names[frame_type] = name
    return names


_DISPATCH_NAMES: Final = _dispatch_names()


class _FrameDispatch:
    """``h2``'s frame dispatch table as a view: one slot instead of 12 bound methods.

    ``H2Connection`` builds, per connection, a dict from frame class to a
    bound method (~0.6 KiB) and only ever looks frames up in it; this looks
    the same names up on the connection when a frame arrives.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: h2.connection.H2Connection) -> None:
        self._conn = conn

    def __getitem__(self, frame_type: type) -> Callable[..., object]:
        method: Callable[..., object] = getattr(self._conn, _DISPATCH_NAMES[frame_type])
        return method


class CompactH2Connection(h2.connection.H2Connection):
    """``h2``'s connection, remembering fewer closed streams, dispatching via a view (items 1, 2).

    ``h2`` records how every closed stream ended (``MAX_CLOSED_STREAMS``,
    65536 by default) so that a late frame on a stream *reset* earlier gets
    a RST_STREAM instead of a connection error. A tunnel lives for days and
    carries a stream per lite map update, so that record would grow to
    ~6 MiB per connection. Late frames arrive within one round trip, when at
    most ``SETTINGS_MAX_CONCURRENT_STREAMS`` streams can have been open, so
    remembering that many closed streams keeps the behaviour.

    The frame dispatch table becomes a :class:`_FrameDispatch` (same lookups,
    ~0.6 KiB less per connection) when ``h2``'s table has the expected shape, and
    the closed-stream record a :class:`_ClosedStreams` when it is ``h2``'s empty
    ``SizeLimitDict``.
    """

    def __init__(self, config: h2.config.H2Configuration, *, closed_streams: int) -> None:
        self.MAX_CLOSED_STREAMS = closed_streams  # read by the base __init__
        super().__init__(config=config)
        if _DISPATCH_NAMES and set(_DISPATCH_NAMES) == set(self._frame_dispatch_table):
            self._frame_dispatch_table = _FrameDispatch(self)  # type: ignore[assignment]
        record = getattr(self, "_closed_streams", None)
        if type(record) is h2.utilities.SizeLimitDict and not record:
            self._closed_streams = _ClosedStreams(closed_streams)


class _ClosedStreams(dict[int, h2.stream.StreamClosedBy | None]):
    """``h2``'s record of how closed streams ended, the oldest forgotten past
    ``limit`` (item 2): what ``h2.utilities.SizeLimitDict`` does, on a plain dict
    (insertion-ordered) with no instance ``__dict__``. A connection with a few
    closed streams holds ~230 bytes instead of ~660 (an ``OrderedDict`` and the
    dict of its one attribute)."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: int, value: h2.stream.StreamClosedBy | None) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            del self[next(iter(self))]


def unsent_bytes(conn: h2.connection.H2Connection) -> int:
    """Bytes of frames ``conn`` has serialised but ``data_to_send()`` not yet returned (item 7).

    ``h2`` has no public way to ask; it appends every frame to ``_data_to_send``,
    a bytearray, and ``data_to_send()`` empties it. If that attribute changes
    shape, this counts 0 (the guard test fails first).
    """
    framed = getattr(conn, "_data_to_send", None)
    return len(framed) if isinstance(framed, bytearray | bytes) else 0


# -- item 3: h2's settings ---------------------------------------------------------------


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
    """``h2.settings.Settings`` that stores plain ints instead of a deque per setting (item 3).

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


# -- item 4: hpack's dynamic tables ------------------------------------------------------


class _DynamicEntries(list[tuple[bytes, bytes]]):
    """An HPACK dynamic table's entries, newest first, on a list instead of a deque."""

    __slots__ = ()

    def appendleft(self, entry: tuple[bytes, bytes]) -> None:
        """Add the newest entry (hpack's only deque-specific call)."""
        self.insert(0, entry)


def _shared_huffman() -> hpack.huffman.HuffmanEncoder | None:
    """One Huffman encoder for every connection's HPACK encoder, if hpack's still
    holds nothing but the request code tables (read, never written, by ``encode``)."""
    coder = hpack.hpack.Encoder().huffman_coder
    if type(coder) is not hpack.huffman.HuffmanEncoder or set(vars(coder)) != {
        "huffman_code_list", "huffman_code_list_lengths"
    }:
        return None
    return coder


_SHARED_HUFFMAN: Final = _shared_huffman()


def compact_header_tables(conn: h2.connection.H2Connection) -> bool:
    """Keep the HPACK dynamic tables of ``conn`` in lists, and share its Huffman
    encoder; call before any frame moves.

    ``hpack.table.HeaderTable`` holds its entries in a deque (~0.6 KiB even
    when empty) and uses only ``appendleft``, ``pop``, ``clear``, ``len``,
    indexing and iteration on it, which a list does as well. A table holds
    at most ``HEADER_TABLE_SIZE / 32`` entries (128 for the default 4 KiB),
    so inserting at the front of a list is as cheap as on a deque.

    Every ``hpack.hpack.Encoder`` makes its own ``HuffmanEncoder`` of the same two
    module-level code tables, which it only reads: the connection's encoder takes the
    one :data:`_SHARED_HUFFMAN` instead (an object and its ``__dict__`` less per
    connection), when its own is that same stateless kind.

    Returns:
        Whether both tables were converted. If a future ``hpack`` stores its
        entries differently, nothing is touched and ``False`` comes back.
    """
    coder = getattr(conn.encoder, "huffman_coder", None)
    if (
        _SHARED_HUFFMAN is not None
        and type(coder) is hpack.huffman.HuffmanEncoder
        and coder.huffman_code_list is _SHARED_HUFFMAN.huffman_code_list
        and coder.huffman_code_list_lengths is _SHARED_HUFFMAN.huffman_code_list_lengths
        and set(vars(coder)) == {"huffman_code_list", "huffman_code_list_lengths"}
    ):
        conn.encoder.huffman_coder = _SHARED_HUFFMAN
    tables = (conn.encoder.header_table, conn.decoder.header_table)
    if not all(type(getattr(t, "dynamic_entries", None)) is deque for t in tables):
        return False
    for table in tables:
        entries = _DynamicEntries(table.dynamic_entries)
        table.dynamic_entries = entries  # type: ignore[assignment]  # same operations
    return True


# -- item 5: hyperframe's payload repr (h2 formats one for every received frame) ----------

#: hyperframe's own function, if it still has one by that name.
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


def install_cheap_data_repr() -> bool:
    """Replace ``hyperframe.frame._raw_data_repr`` with :func:`_data_repr` (idempotent).

    Both ends of our HTTP/2 call it when :mod:`protocol.h2flow` is imported.

    Returns:
        Whether it is installed; ``False`` if ``hyperframe`` no longer has the
        function (then its frames keep their own repr).
    """
    if _original_data_repr is None:
        return False
    hyperframe.frame._raw_data_repr = _data_repr
    return True


# -- item 6: hypercorn's per-connection driver --------------------------------------------
#
# protocol.serve reads the first request of every control-port connection itself and
# hands the connections that are not ours to hypercorn, the way
# hypercorn.trio.run.worker_serve does for each accepted stream. What it relies on,
# all checked by tests/protocol/test_compat.py:
#
# * ``TCPServer(app, config, context, state, stream)`` and ``await server.run()``;
#   it probes the stream for ``do_handshake``/``selected_alpn_protocol``/
#   ``transport_stream`` (TLS) or ``socket`` (plain TCP), which the replaying
#   streams of protocol.serve.handoff provide;
# * ``Lifespan(app, config, state)`` with ``handle_lifespan(task_status=...)``,
#   ``wait_for_startup()`` and ``wait_for_shutdown()``;
# * ``WorkerContext(max_requests)`` and its ``terminated`` event (``await ....set()``);
# * ``ASGIWrapper(app)`` and ``ConnectionState(dict)``.


# -- item 6: hypercorn's driver, telling when a request is in progress -------------------------


class BusyAwareTCPServer(TCPServer):
    """hypercorn's per-connection driver, calling ``on_busy(True)`` when its
    protocol goes busy (``Updated(idle=False)``: a request head arrived) and
    ``on_busy(False)`` when it is idle again (its keep-alive timer starts then).

    hypercorn sends these events to ``protocol_send``, which it hands to its
    protocol as the send callback; everything else passes through unchanged.
    """

    def __init__(
        self,
        app: ASGIWrapper,
        config: HypercornConfig,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SSLStream[trio.SocketStream],
        *,
        on_busy: Callable[[bool], None],
    ) -> None:
        super().__init__(app, config, context, state, stream)
        self._on_busy = on_busy

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            self._on_busy(not event.idle)
        await super().protocol_send(event)
