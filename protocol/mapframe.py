"""Framing of ``/machine/map`` stream messages (sans-I/O).

Role in the pipeline: the control handler encodes each :class:`MapResponse` to
JSON and passes it through :func:`frame_map_response`; the resulting bytes are
one DATA chunk of the long-poll HTTP/2 response. The client side
(:class:`MapFrameDecoder`) undoes it. Layout (docs/control-protocol.md §8.2, §8.3)::

    off len  field
      0   4  N, uint32 LITTLE-endian (yes: unlike everything else here)
      4   N  one complete zstd frame (compressed) or raw JSON (Compress == "")

Rules the clients impose:

* v1.90 / HEAD always send ``Compress: "zstd"`` and always run the payload
  through a zstd decoder, keep-alives included; there is no sniffing.
* Never send ``N = 0``: empty input decodes to nothing and JSON fails.
* Frames are independent (no shared dictionary or stream). Go servers use the
  "fastest" level with a checksum; we use level 1 with a checksum.
* The client remembers the bytes of the first message that decodes to exactly
  ``{"KeepAlive":true}`` and short-circuits identical later frames, so the
  keep-alive frame is a module constant (:data:`KEEPALIVE_FRAME_ZSTD`).
"""

from __future__ import annotations

import struct
import threading
from typing import Final

import zstandard

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "KEEPALIVE_FRAME_RAW",
    "KEEPALIVE_FRAME_ZSTD",
    "KEEPALIVE_JSON",
    "MAX_MAP_FRAME",
    "MapFrameDecoder",
    "compress_piece",
    "frame_map_response",
    "frame_pieces",
    "keepalive_frame",
]

_LENGTH: Final = struct.Struct("<I")
#: A defensive cap for the client side (HEAD's ``tsp`` library uses 4 MiB
#: compressed; Go's tailscaled has none). Decompressed size is capped too.
MAX_MAP_FRAME: Final = 64 << 20

#: The canonical keep-alive body, compact separators.
KEEPALIVE_JSON: Final = b'{"KeepAlive":true}'

# zstandard compressor objects are not thread-safe; the server may build maps
# in worker threads, so each thread gets its own.
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    compressor: zstandard.ZstdCompressor | None = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = zstandard.ZstdCompressor(level=1, write_checksum=True)
        _local.compressor = compressor
    return compressor


def frame_map_response(json_bytes: bytes, compress: bool) -> bytes:
    """Frame one encoded MapResponse: ``[u32 LE length][zstd frame | JSON]``.

    Args:
        json_bytes: The JSON of one MapResponse; must not be empty.
        compress: ``True`` when the request said ``Compress: "zstd"``.

    Raises:
        LocalProtocolError: ``json_bytes`` is empty (it would yield a frame
            the client cannot decode).
    """
    if not json_bytes:
        raise LocalProtocolError("refusing to frame an empty map response")
    payload = _compressor().compress(json_bytes) if compress else json_bytes
    return _LENGTH.pack(len(payload)) + payload


def frame_pieces(pieces: list[bytes], compress: bool, *, compressed: list[bool] | None = None) -> bytes:
    """Frame one message given as consecutive pieces of its JSON.

    With ``compress`` each piece becomes its own zstd frame, unless
    ``compressed[i]`` says piece ``i`` already is one (a cached shared piece);
    the client's decoder reads concatenated frames as one message (tailscale's
    ``zstdframe.AppendDecode`` takes "zero or more frames"). Without it the
    pieces are joined.
    """
    if not compress:
        return frame_map_response(b"".join(pieces), False)
    flags = compressed or [False] * len(pieces)
    out = [b"", *(piece if done else compress_piece(piece) for piece, done in zip(pieces, flags, strict=True))]
    # The length goes in front before the one join: a full map is megabytes, and
    # joining it first and prepending the length after would copy it twice.
    out[0] = _LENGTH.pack(sum(map(len, out)))
    return b"".join(out)


def compress_piece(json_bytes: bytes) -> bytes:
    """One zstd frame of part of a message (see :func:`frame_pieces`)."""
    return _compressor().compress(json_bytes)


#: The framed keep-alive for zstd streams (identical bytes every time).
KEEPALIVE_FRAME_ZSTD: Final = frame_map_response(KEEPALIVE_JSON, compress=True)
#: The framed keep-alive for uncompressed streams.
KEEPALIVE_FRAME_RAW: Final = frame_map_response(KEEPALIVE_JSON, compress=False)


def keepalive_frame(compress: bool) -> bytes:
    """Return the constant framed keep-alive for the stream's compression."""
    return KEEPALIVE_FRAME_ZSTD if compress else KEEPALIVE_FRAME_RAW


class MapFrameDecoder:
    """Client-side splitter of the map stream into JSON messages.

    Feed DATA chunks in order; each call returns the JSON bodies completed by
    it (decompressed when ``compressed``). Record and DATA boundaries are
    irrelevant: a frame may span many chunks and a chunk may hold many frames.
    """

    __slots__ = ("_buffer", "_compressed", "_decompressor", "_max_frame")

    def __init__(self, *, compressed: bool = True, max_frame: int = MAX_MAP_FRAME) -> None:
        self._compressed = compressed
        self._max_frame = max_frame
        self._buffer = bytearray()
        self._decompressor = zstandard.ZstdDecompressor()


    def receive_data(self, data: bytes) -> list[bytes]:
        """Return the JSON of every message completed by ``data``.

        Raises:
            RemoteProtocolError: Zero or oversized length, or a frame that is
                not a valid single zstd frame.
        """
        buf = self._buffer
        buf += data
        out: list[bytes] = []
        pos = 0
        while len(buf) - pos >= 4:
            (length,) = _LENGTH.unpack_from(buf, pos)
            if length == 0:
                raise RemoteProtocolError("zero-length map frame")
            if length > self._max_frame:
                raise RemoteProtocolError(f"map frame of {length} bytes is too large")
            if len(buf) - pos - 4 < length:
                break
            payload = bytes(buf[pos + 4 : pos + 4 + length])
            pos += 4 + length
            out.append(self._decode(payload))
        del buf[:pos]
        return out

    def _decode(self, payload: bytes) -> bytes:
        if not self._compressed:
            return payload
        try:
            # A message may be several concatenated frames (see frame_pieces).
            with self._decompressor.stream_reader(payload, read_across_frames=True) as reader:
                out = reader.read(self._max_frame + 1)
        except zstandard.ZstdError as exc:
            raise RemoteProtocolError(f"bad zstd map frame: {exc}") from None
        if len(out) > self._max_frame:
            raise RemoteProtocolError("map frame decompresses to more than the limit")
        return out
