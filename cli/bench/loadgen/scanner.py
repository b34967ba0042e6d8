"""The load generator's receive path, sans-I/O: map-stream frames read only when wanted.

Theory of operation
-------------------
The simulated clients share two cores with the server, and at 5,000 nodes a full map
is megabytes of JSON, so a receive path that decoded every message would measure the
load generator. :class:`MapFrameScanner` is fed the DATA chunks of one map stream and
splits them into ``[u32 LE][zstd]`` frames (``protocol/mapframe.py``); chunk and frame
boundaries are independent. At each frame header it asks whether anybody wants the
payload: if not, it counts the bytes away without buffering, decompressing or
decoding them (they were still received, decrypted and acknowledged, so the server
sees real back-pressure). Small frames are always kept and compared with the
server's constant keep-alive, so a keep-alive is never taken for a map; the first
other frame of a stream is its full map (control-protocol.md §8.5), every later one
an update.

:func:`make_decompressor` reads a message made of several zstd frames (full maps are
shared pre-compressed pieces), and :data:`view_decoder` decodes the few MapResponse
fields the sentinel client and the churn phase check.

No I/O, no clock: :mod:`cli.bench.loadgen.client` feeds it and keeps the time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec
import zstandard

from protocol import KEEPALIVE_FRAME_ZSTD, KEEPALIVE_JSON, RemoteProtocolError

__all__ = [
    "FILTER_MARKER",
    "FrameKind",
    "MapFrameScanner",
    "MapView",
    "PeerView",
    "ScannedFrame",
    "make_decompressor",
    "view_decoder",
]


#: Same defensive cap as ``protocol.mapframe`` (compressed and decompressed).
_MAX_FRAME: Final = 64 << 20
#: The zstd payload of the server's constant keep-alive frame.
_KEEPALIVE_PAYLOAD: Final = KEEPALIVE_FRAME_ZSTD[4:]
#: Frames up to this size are always buffered: they may be keep-alives, and a
#: full map or update can never be this small (it carries at least ControlTime).
_SMALL_FRAME: Final = 64
FILTER_MARKER: Final = b'"PacketFilter'  # matches PacketFilters and PacketFilter


class FrameKind(enum.Enum):
    """What a map-stream frame is, as far as the load generator can tell cheaply."""

    KEEPALIVE = "keepalive"
    #: The first non-keep-alive message of a stream: the full netmap (§8.5).
    FULL = "full"
    #: Any later message (a delta).
    UPDATE = "update"


@dataclass(frozen=True, slots=True)
class ScannedFrame:
    """One complete frame of a map stream.

    Attributes:
        kind: see :class:`FrameKind`.
        size: length of the (compressed) payload in bytes.
        payload: the zstd frame when it was kept, else ``None`` (skipped unread).
    """

    kind: FrameKind
    size: int
    payload: bytes | None


class MapFrameScanner:
    """Splits a zstd map stream into frames, reading only the ones someone wants.

    Unlike :class:`protocol.MapFrameDecoder`, which decompresses every frame, this
    asks ``want(kind)`` when a frame's header arrives and, if the answer is no,
    counts the payload bytes away without copying or decompressing them. Frames of at
    most ``_SMALL_FRAME`` bytes are always kept and checked against the keep-alive
    (``{"KeepAlive":true}``), first by bytes, then by decompressing; so a keep-alive is
    never mistaken for a full map.

    Feed DATA chunks in order; chunk and frame boundaries are independent.

    Args:
        want: decides, at the start of each non-keep-alive frame, whether its payload
            is kept. It sees the frame's kind (``FULL`` or ``UPDATE``).
        decompress: zstd decompression for keep-alive candidates.
        max_frame: largest acceptable payload.
    """

    __slots__ = (
        "_body",
        "_decompress",
        "_header",
        "_kind",
        "_max_frame",
        "_remaining",
        "_seen_map",
        "_size",
        "_want",
    )

    def __init__(
        self,
        want: Callable[[FrameKind], bool],
        decompress: Callable[[bytes], bytes],
        *,
        max_frame: int = _MAX_FRAME,
    ) -> None:
        self._want = want
        self._decompress = decompress
        self._max_frame = max_frame
        self._header = bytearray()
        # Invariant: _remaining > 0 exactly while inside a frame's payload; _body is
        # the kept part of that payload (None: skipping).
        self._remaining = 0
        self._size = 0
        self._body: bytearray | None = None
        self._kind = FrameKind.FULL
        self._seen_map = False  # has a non-keep-alive frame completed on this stream?

    def feed(self, data: bytes) -> list[ScannedFrame]:
        """Consume one chunk; return the frames it completed.

        Raises:
            RemoteProtocolError: a zero-length or oversized frame.
        """
        out: list[ScannedFrame] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._remaining == 0:
                # Header: 4 bytes, possibly split across chunks.
                need = 4 - len(self._header)
                self._header += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._header) < 4:
                    break
                self._start(int.from_bytes(self._header, "little"))
                self._header.clear()
                continue
            take = min(self._remaining, end - pos)
            if self._body is not None:
                self._body += view[pos : pos + take]
            pos += take
            self._remaining -= take
            if self._remaining == 0:
                out.append(self._finish())
        return out

    def _start(self, length: int) -> None:
        """A header arrived: check the length, classify, decide whether to keep."""
        if length == 0:
            raise RemoteProtocolError("zero-length map frame")
        if length > self._max_frame:
            raise RemoteProtocolError(f"map frame of {length} bytes is too large")
        self._remaining = self._size = length
        self._kind = FrameKind.UPDATE if self._seen_map else FrameKind.FULL
        keep = length <= _SMALL_FRAME or self._want(self._kind)
        self._body = bytearray() if keep else None

    def _finish(self) -> ScannedFrame:
        """The last payload byte arrived: settle the kind and hand the frame out."""
        payload = bytes(self._body) if self._body is not None else None
        self._body = None
        if payload is not None and self._size <= _SMALL_FRAME and self._is_keepalive(payload):
            return ScannedFrame(FrameKind.KEEPALIVE, self._size, None)
        self._seen_map = True
        if payload is not None and self._size <= _SMALL_FRAME and not self._want(self._kind):
            payload = None  # kept only to check for a keep-alive
        return ScannedFrame(self._kind, self._size, payload)

    def _is_keepalive(self, payload: bytes) -> bool:
        """Our server's constant frame, or any zstd encoding of the keep-alive JSON."""
        if payload == _KEEPALIVE_PAYLOAD:
            return True
        try:
            return self._decompress(payload) == KEEPALIVE_JSON
        except zstandard.ZstdError:
            raise RemoteProtocolError("bad zstd map frame") from None


def make_decompressor(max_size: int = _MAX_FRAME) -> Callable[[bytes], bytes]:
    """A zstd decompression function for map messages (not thread-safe).

    A message may be several concatenated zstd frames (the server sends full maps as
    shared pre-compressed pieces; tailscale's ``zstdframe.AppendDecode`` reads "zero
    or more frames"), which ``ZstdDecompressor.decompress`` would silently cut after
    the first one.

    Raises (from the returned function):
        zstandard.ZstdError: not zstd.
        RemoteProtocolError: more than ``max_size`` bytes of output.
    """
    decompressor = zstandard.ZstdDecompressor()

    def decompress(payload: bytes) -> bytes:
        reader = decompressor.decompressobj(write_size=1 << 20, read_across_frames=True)
        data: bytes = reader.decompress(payload)
        if len(data) > max_size:
            raise RemoteProtocolError("map message decompresses to more than the limit")
        return data

    return decompress


# Views for the sentinel client: the few MapResponse fields it checks.
class PeerView(msgspec.Struct):
    Key: str = ""


class MapView(msgspec.Struct):
    Node: PeerView | None = None
    Peers: list[PeerView] | None = None
    PeersChanged: list[PeerView] | None = None
    PeersRemoved: list[int] | None = None
    PacketFilters: dict[str, msgspec.Raw] | None = None
    PacketFilter: msgspec.Raw | None = None


view_decoder: Final = msgspec.json.Decoder(MapView)
