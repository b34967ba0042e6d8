"""Map messages to bytes: every shared value encoded and framed once (sans-I/O).

Role in the pipeline: :mod:`projections.mapviews` decides what each map stream is
sent, as values (a :class:`~projections.mapviews.cursor.FullMap` first, then
:class:`~projections.mapviews.peersets.MapMessage` updates); this module turns them
into the bytes of the stream's DATA chunks, framed by :mod:`.mapframe`. One
:class:`MapWire` serves every stream of a server.

**Encode once.** Many streams are sent the same value: every member of a visibility
class moving between two versions gets the one diff message, streams whose own parts
are equal share one message, and full maps share the peers of their class. So the
bytes are cached by the identity of the values they encode, which projections keep
stable for exactly this, and held weakly: an entry lives as long as its value, so
the bytes go with the versions and messages that no stream holds any more.

=============================  ===================================================
key (kept by projections)      bytes kept here
=============================  ===================================================
``Peer``                       its JSON (a ``tailcfg.Node``), for every class
                               that shows this peer
``MapMessage``                 its JSON, and its frame per compression
``PeerSet.lineage``            the full-map pieces of the newest version of that
                               lineage that built any (classes that see the
                               same peers share one peer set, so one lineage)
=============================  ===================================================

**Full maps in pieces.** A full map is its body (everything but the peers) with a
``Peers`` array spliced in by hand, its peers' JSON in id order cut into pieces of
``chunk`` peers::

    piece     JSON                                                shared by the class
    head      body without its "}" + ',"Peers":[' + first peers   no (this stream's)
    chunk k   "," + the JSON of chunk k's peers                   yes, unless the
                                                                  stream's node is in it
    tail      "]}"                                                yes (one for all)

A piece that holds the stream's own node is rebuilt without it; a node alone in the
class (or with no peer) gets the body alone. Compressed, each piece is its own zstd
frame, and a shared piece is compressed once: a zstd decoder reads concatenated
frames as one message (tailscale's ``zstdframe.AppendDecode`` takes "zero or more
frames"; see :func:`.mapframe.frame_pieces`). A new version of the same ids (peers
coming online, moving endpoints) patches the pieces of the version before: the peer
set's journal (``PeerSet.changed_since``) names the peers that changed, and only their
JSON and the chunks holding them are new. When peers came or went, every piece whose
peers' JSON is the very same objects as in the version before is taken over, with its
compressed frame. Either way a version costs only the pieces it changed.

Nothing here does I/O or reads a clock; the caches are plain memory.
"""

from __future__ import annotations

import bisect
import weakref
from typing import Final

import msgspec

from projections.mapviews.cursor import FullMap
from projections.mapviews.peersets import Lineage, MapMessage, Peer, PeerSet

from .mapframe import compress_piece, frame_map_response, frame_pieces

__all__ = ["CHUNK", "MapWire"]

#: Peers per shared piece of a full map.
CHUNK: Final = 128

_encoder: Final = msgspec.json.Encoder()


class _Piece:
    """A shared piece of full maps: ``lead`` and its peers' JSON, joined only when
    asked for and compressed once.

    Streams are compressed: the compressed frame is kept, so the joined JSON (as
    large as the peers' JSON itself) would otherwise be a second copy of every peer
    kept for nothing.
    """

    __slots__ = ("_frame", "lead", "parts")

    def __init__(self, parts: tuple[bytes, ...], lead: bytes = b",") -> None:
        self.parts = parts
        self.lead = lead
        self._frame: bytes | None = None

    def json(self) -> bytes:
        return self.lead + b",".join(self.parts)

    def compressed(self) -> bytes:
        """The piece as one zstd frame (made by the first stream that sends it).

        Kept as a copy of its own size: python-zstandard returns a frame in a buffer
        of the input's worst-case compressed size (``ZSTD_compressBound``), about five
        times a peer chunk's frame, and a piece is kept as long as its class (issue
        19: 1.2 KiB per node at 2,000 corp nodes).
        """
        if self._frame is None:
            self._frame = bytes(memoryview(compress_piece(self.json())))
        return self._frame


#: The end of every full map's pieces (closes ``Peers`` and the message), compressed
#: once for all.
_TAIL: Final = _Piece((b"]}",), lead=b"")
_TAIL.compressed()


class _Pieces:
    """The full-map pieces of one version of a class's peer set (held weakly)."""

    __slots__ = ("chunks", "ids", "link", "parts", "version")

    def __init__(self, version: PeerSet, ids: list[int], parts: list[bytes], chunks: list[_Piece]) -> None:
        self.version = weakref.ref(version)
        #: The version's journal entry: what changed since is known after it is gone.
        self.link = version.link
        self.ids = ids
        self.parts = parts
        self.chunks = chunks


class _Encoded:
    """A message's JSON and its frames by compression."""

    __slots__ = ("frames", "json")

    def __init__(self, json: bytes) -> None:
        self.json = json
        self.frames: dict[bool, bytes] = {}


class MapWire:
    """The bytes of map messages for every stream of one server (see the module
    docstring).

    Args:
        chunk: peers per shared piece of a full map (tests make it small).
    """

    __slots__ = ("_messages", "_peers", "_pieces", "chunk")

    def __init__(self, chunk: int = CHUNK) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, not {chunk}")
        self.chunk = chunk
        self._peers: weakref.WeakKeyDictionary[Peer, bytes] = weakref.WeakKeyDictionary()
        self._messages: weakref.WeakKeyDictionary[MapMessage, _Encoded] = weakref.WeakKeyDictionary()
        self._pieces: weakref.WeakKeyDictionary[Lineage, _Pieces] = weakref.WeakKeyDictionary()

    # -- updates ---------------------------------------------------------------------

    def message_json(self, msg: MapMessage) -> bytes:
        """The JSON of ``msg`` (encoded once)."""
        return self._encoded(msg).json

    def frame(self, msg: MapMessage, compress: bool) -> bytes:
        """``msg`` framed for a stream (see :func:`.mapframe.frame_map_response`),
        made once per compression for every stream given the same object."""
        encoded = self._encoded(msg)
        frame = encoded.frames.get(compress)
        if frame is None:
            frame = encoded.frames[compress] = frame_map_response(encoded.json, compress)
        return frame

    def _encoded(self, msg: MapMessage) -> _Encoded:
        encoded = self._messages.get(msg)
        if encoded is None:
            encoded = self._messages[msg] = _Encoded(_encoder.encode(msg.response))
        return encoded

    # -- full maps ---------------------------------------------------------------------

    def full_map_json(self, full: FullMap) -> bytes:
        """The JSON of a full map (for uncompressed streams, tests and benchmarks)."""
        return b"".join(p if isinstance(p, bytes) else p.json() for p in self._full_map_pieces(full))

    def frame_full(self, full: FullMap, compress: bool) -> bytes:
        """A full map framed for a stream; its shared pieces are compressed once."""
        raw: list[bytes] = []
        done: list[bool] = []
        pending: list[bytes] = []
        for piece in self._full_map_pieces(full):
            if isinstance(piece, bytes):
                pending.append(piece)
                continue
            if pending:
                raw.append(b"".join(pending))
                done.append(False)
                pending = []
            if compress:
                raw.append(piece.compressed())
                done.append(True)
            else:
                raw.append(piece.json())
                done.append(False)
        if pending:
            raw.append(b"".join(pending))
            done.append(False)
        return frame_pieces(raw, compress, compressed=done)

    def _full_map_pieces(self, full: FullMap) -> list[_Piece | bytes]:
        """The full map as pieces whose concatenation is its JSON: this stream's own
        bytes, and shared :class:`_Piece` objects (see the module docstring)."""
        body = _encoder.encode(full.body)
        if full.peers is None:
            return [body]
        pieces = self._pieces_of(full.peers)
        ids, parts, exclude, size = pieces.ids, pieces.parts, full.exclude, self.chunk
        if not ids or ids == [exclude]:
            return [body]
        out: list[_Piece | bytes] = []
        head = [body[:-1], b',"Peers":[']
        first = True
        for k, chunk in enumerate(pieces.chunks):
            lo, hi = k * size, min((k + 1) * size, len(ids))
            mine = ids[lo] <= exclude <= ids[hi - 1]
            if not first and not mine:
                out.append(chunk)
                continue
            members = [parts[i] for i in range(lo, hi) if ids[i] != exclude]
            if not members:
                continue
            piece = b",".join(members)
            if first:
                head.append(piece)
                out.append(b"".join(head))
                first = False
            else:
                out.append(b"," + piece)
        out.append(_TAIL)
        return out

    def _pieces_of(self, peers: PeerSet) -> _Pieces:
        """The pieces of ``peers`` (built once per version; full maps are built from
        current versions, so one entry per class is kept, by its lineage)."""
        older = self._pieces.get(peers.lineage)
        if older is not None:
            if older.version() is peers:
                return older
            patched = self._patch(older, peers)
            if patched is not None:
                self._pieces[peers.lineage] = patched
                return patched
        ids = sorted(peers.peers)
        parts = [self._peer_json(peers.peers[i]) for i in ids]
        chunks = self._take_over(parts, older.chunks if older is not None else [])
        pieces = self._pieces[peers.lineage] = _Pieces(peers, ids, parts, chunks)
        return pieces

    def _patch(self, older: _Pieces, peers: PeerSet) -> _Pieces | None:
        """The pieces of ``peers`` from ``older``'s, of an earlier version with the same
        ids (a reconnect herd's presence changes, a peer's endpoints): only the changed
        peers' JSON and the chunks holding them are new, at the cost of the change, not
        of the class. ``None`` when the journal does not reach ``older``'s version or
        peers came or went (then the pieces are rebuilt)."""
        changed = peers.changed_since(older.link)
        if changed is None:
            return None
        ids, current = older.ids, peers.peers
        moved: list[tuple[int, Peer]] = []
        for nid in changed:
            at = bisect.bisect_left(ids, nid)
            was = at < len(ids) and ids[at] == nid
            peer = current.get(nid)
            if was != (peer is not None):
                return None  # a peer came or went: the chunks shift
            if peer is not None:
                moved.append((at, peer))
        parts, chunks, size = list(older.parts), list(older.chunks), self.chunk
        dirty: set[int] = set()
        for at, peer in moved:
            json = self._peer_json(peer)
            if json is not parts[at]:
                parts[at] = json
                dirty.add(at // size)
        for k in dirty:
            chunks[k] = _Piece(tuple(parts[k * size : (k + 1) * size]))
        return _Pieces(peers, ids, parts, chunks)

    def _take_over(self, parts: list[bytes], older: list[_Piece]) -> list[_Piece]:
        """The shared pieces for ``parts``; a piece whose peers' JSON is the very same
        objects as in one of ``older`` is taken over (with its compressed frame)."""
        by_first: dict[int, list[_Piece]] = {}
        for piece in older:
            by_first.setdefault(id(piece.parts[0]), []).append(piece)
        out: list[_Piece] = []
        for i in range(0, len(parts), self.chunk):
            group = tuple(parts[i : i + self.chunk])
            for candidate in by_first.get(id(group[0]), ()):
                if len(candidate.parts) == len(group) and all(
                    a is b for a, b in zip(candidate.parts, group, strict=True)
                ):
                    out.append(candidate)
                    break
            else:
                out.append(_Piece(group))
        return out

    def _peer_json(self, peer: Peer) -> bytes:
        """A peer's JSON, encoded once while the peer lives (shared by every class and
        version that shows this peer object)."""
        json = self._peers.get(peer)
        if json is None:
            # Kept as a copy of its own size: msgspec returns its output buffer, half
            # as large again as the JSON (kept as long as the peer: issue 19).
            json = self._peers[peer] = bytes(memoryview(_encoder.encode(peer.wire)))
        return json
