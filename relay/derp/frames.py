"""DERP wire format: frame types, byte layouts, encoders, parsers and a stream decoder.

Role in the pipeline
--------------------
This is the bottom layer of the relay.  It turns frames into bytes and bytes
into frames and nothing else: no sockets, no trio, no routing, no crypto state.
:mod:`relay.derp.server` (the relay core) and :mod:`relay.derp.client` (the
client protocol) are built on it.

Protocol version 2 (the one every Tailscale client since 2020 speaks)
---------------------------------------------------------------------
Every frame is a 5-byte header followed by ``length`` payload bytes::

    offset  size  field
    0       1     frame type (FrameType)
    1       4     payload length, big-endian uint32 (header not included)
    5       n     payload

Protocol flow (Tailscale ``derp/derp.go``)::

    Login
      client connects (after HTTP "Upgrade: DERP" or the fast-start form)
      server -> FrameServerKey    magic + server public key
      client -> FrameClientInfo   client public key + nonce + box(JSON ClientInfo)
      server -> FrameServerInfo   nonce + box(JSON ServerInfo)   [only if admitted]
    Steady state
      client -> FrameSendPacket   server -> FrameRecvPacket to the destination
      server -> FrameKeepAlive every ~60 s; either side may Ping, the other Pongs
      server -> FramePeerGone when someone we delivered packets from disconnects
    Mesh (clients that presented the region's mesh key)
      mesh -> FrameWatchConns     server floods FramePeerPresent, then streams
                                  PeerPresent / PeerGone as clients come and go
      mesh -> FrameForwardPacket  packet from a client of another relay in the region
      mesh -> FrameClosePeer      close a client's connection

Payload layouts (offsets relative to the payload, i.e. after the 5-byte header)::

    ServerKey     0x01  [0:8] magic "DERP🔑" (44 45 52 50 f0 9f 94 91)
                        [8:40] server public key; more bytes are reserved
    ClientInfo    0x02  [0:32] client public key | [32:56] nonce | [56:] box(JSON)
    ServerInfo    0x03  [0:24] nonce | [24:] box(JSON)
    SendPacket    0x04  [0:32] destination public key | [32:] packet
    RecvPacket    0x05  [0:32] source public key | [32:] packet          (v2)
    KeepAlive     0x06  empty
    NotePreferred 0x07  [0] 0x01 if this relay is the client's home, else 0x00
    PeerGone      0x08  [0:32] peer public key | [32] reason (optional, PeerGoneReason)
    PeerPresent   0x09  [0:32] peer key | [32:48] IPv6 or v4-mapped IP
                        | [48:50] port BE | [50] PeerPresentFlags   (older: just the key)
    ForwardPacket 0x0a  [0:32] source key | [32:64] destination key | [64:] packet
    WatchConns    0x10  empty
    ClosePeer     0x11  [0:32] public key of the peer to disconnect
    Ping          0x12  [0:8] opaque data (receivers tolerate trailing bytes)
    Pong          0x13  [0:8] the data of the Ping being answered
    Health        0x14  UTF-8 problem text; empty means healthy again
    Restarting    0x15  [0:4] reconnect-in ms BE | [4:8] try-for ms BE

Note the pleasant symmetry the relay core exploits: a SendPacket payload and the
RecvPacket payload it becomes have the same length (32-byte key + packet), so
the outgoing header can be computed from the incoming length alone.

Decoder contract
----------------
:class:`FrameDecoder` is fed arbitrary chunks of the byte stream and returns the
complete frames they finish, in order.  It buffers at most one partial frame and
refuses (with :class:`~relay.errors.RemoteProtocolError`) any frame whose
declared length exceeds its limit *as soon as the header arrives*, so a hostile
peer cannot make it buffer more than ``max_frame_len + 5`` bytes.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

import msgspec

from ..errors import LocalProtocolError, RemoteProtocolError
from ..keys import KEY_LEN, NONCE_LEN

__all__ = [
    "DISCO_MAGIC",
    "FRAME_HEADER_LEN",
    "KEEPALIVE_INTERVAL",
    "MAGIC",
    "MAX_CLIENT_INFO_LEN",
    "MAX_FRAME_LEN",
    "MAX_PACKET_SIZE",
    "PROTOCOL_VERSION",
    "ClientInfo",
    "FrameDecoder",
    "FrameType",
    "PeerGoneReason",
    "PeerPresent",
    "PeerPresentFlags",
    "ServerInfo",
    "decode_client_info_json",
    "decode_server_info_json",
    "encode_client_info",
    "encode_client_info_json",
    "encode_close_peer",
    "encode_forward_packet",
    "encode_frame",
    "encode_health",
    "encode_keep_alive",
    "encode_note_preferred",
    "encode_peer_gone",
    "encode_peer_present",
    "encode_ping",
    "encode_pong",
    "encode_recv_packet",
    "encode_restarting",
    "encode_send_packet",
    "encode_server_info",
    "encode_server_info_json",
    "encode_server_key",
    "encode_watch_conns",
    "looks_like_disco",
    "parse_client_info",
    "parse_close_peer",
    "parse_forward_packet",
    "parse_note_preferred",
    "parse_peer_gone",
    "parse_peer_present",
    "parse_ping",
    "parse_recv_packet",
    "parse_restarting",
    "parse_send_packet",
    "parse_server_info",
    "parse_server_key",
]

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

PROTOCOL_VERSION = 2
"""DERP protocol version we speak.

History (from ``derp.go``): version 1 (zero on the wire) had consistent box
headers; version 2 prefixes every RecvPacket payload with the source key.
We only speak version 2; older clients are long extinct.
"""

MAGIC = "DERP🔑".encode()
"""The 8-byte magic at the start of the ServerKey payload (``44 45 52 50 f0 9f 94 91``)."""

FRAME_HEADER_LEN = 5
"""One type byte plus a big-endian uint32 length."""

MAX_PACKET_SIZE = 64 << 10
"""Largest packet (bytes visible to magicsock, excluding keys and header) DERP carries."""

MAX_FRAME_LEN = 1 << 20
"""Largest frame payload our decoders accept (Tailscale's client uses the same bound)."""

MAX_CLIENT_INFO_LEN = 256 << 10
"""Largest ClientInfo payload the server reads from a not-yet-trusted client."""

KEEPALIVE_INTERVAL = 60.0
"""Seconds between server keep-alives; two missed ones mean the connection is dead."""

DISCO_MAGIC = "TS💬".encode()
"""First 6 bytes of an encrypted disco message (``54 53 f0 9f 92 ac``)."""

# disco magic (6) + sender's disco public key (32) + box nonce (24)
_DISCO_MIN_LEN = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN

_HEADER = struct.Struct(">BI")
_U16 = struct.Struct(">H")
_U32X2 = struct.Struct(">II")


class FrameType(enum.IntEnum):
    """The one-byte frame type at offset 0 of every frame header."""

    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(enum.IntEnum):
    """Why the server no longer has a path to a peer (byte 32 of PeerGone)."""

    DISCONNECTED = 0x00
    """The peer was connected here (or in the mesh) and has now left."""
    NOT_HERE = 0x01
    """The server has never heard of the destination of a (disco) packet."""
    MESH_CONN_BROKE = 0xF0
    """Invented locally when a mesh watch connection breaks; never sent on the wire."""


class PeerPresentFlags(enum.IntFlag):
    """Bit flags in byte 50 of PeerPresent; zero means "old server, unknown"."""

    IS_REGULAR = 1 << 0
    IS_MESH_PEER = 1 << 1
    IS_PROBER = 1 << 2
    NOT_IDEAL = 1 << 3


# --------------------------------------------------------------------------
# Login documents (sealed JSON)
# --------------------------------------------------------------------------


class ClientInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a client says about itself inside the sealed ClientInfo box.

    Attributes:
        version: DERP protocol version the client was built with.
        mesh_key: the region's 32-byte mesh pre-shared key, or ``None`` for
            ordinary clients.  Only mesh members may watch, forward and close.
        can_ack_pings: the client answers server Pings with Pongs.
        is_prober: the client is a monitoring prober (reported in PeerPresent).
        app_name: opaque application name for stats.
    """

    version: int = 0
    mesh_key: bytes | None = None
    can_ack_pings: bool = False
    is_prober: bool = False
    app_name: str = ""


class ServerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the server says in the sealed ServerInfo box.

    Attributes:
        version: the server's DERP protocol version.
        token_bucket_bytes_per_second: advisory client send rate (0 = unspecified).
        token_bucket_bytes_burst: advisory burst for that rate.
    """

    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0


_json_object = msgspec.json.Decoder(dict[str, object])
_json_encoder = msgspec.json.Encoder()


def _lower_keys(doc: bytes, what: str) -> dict[str, object]:
    # Go's encoding/json matches field names case-insensitively and Tailscale's
    # ClientInfo mixes tagged ("meshKey", "version") and untagged
    # ("CanAckPings", "IsProber", "AppName") names, so we fold case too.
    try:
        raw = _json_object.decode(doc)
    except msgspec.DecodeError as exc:
        raise RemoteProtocolError(f"{what} is not a JSON object: {exc}") from exc
    return {k.lower(): v for k, v in raw.items()}


def _opt_int(fields: dict[str, object], name: str, what: str) -> int:
    value = fields.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise RemoteProtocolError(f"{what}.{name} must be an integer")
    return value


def _opt_bool(fields: dict[str, object], name: str, what: str) -> bool:
    value = fields.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RemoteProtocolError(f"{what}.{name} must be a boolean")
    return value


def decode_client_info_json(doc: bytes) -> ClientInfo:
    """Decode the plaintext of a ClientInfo box.

    Unknown fields are ignored (clients are newer than servers).  The mesh key
    travels as 64 hex digits; an empty string or absent field means "none".

    Raises:
        RemoteProtocolError: not a JSON object, or a known field has the wrong type.
    """
    fields = _lower_keys(doc, "ClientInfo")
    mesh_key: bytes | None = None
    mesh = fields.get("meshkey")
    if mesh not in (None, ""):
        if not isinstance(mesh, str):
            raise RemoteProtocolError("ClientInfo.meshKey must be a string")
        try:
            mesh_key = bytes.fromhex(mesh)
        except ValueError as exc:
            raise RemoteProtocolError("ClientInfo.meshKey is not hexadecimal") from exc
        if len(mesh_key) != KEY_LEN:
            raise RemoteProtocolError("ClientInfo.meshKey must be 32 bytes")
    app_name = fields.get("appname", "")
    if app_name is None:
        app_name = ""
    if not isinstance(app_name, str):
        raise RemoteProtocolError("ClientInfo.AppName must be a string")
    return ClientInfo(
        version=_opt_int(fields, "version", "ClientInfo"),
        mesh_key=mesh_key,
        can_ack_pings=_opt_bool(fields, "canackpings", "ClientInfo"),
        is_prober=_opt_bool(fields, "isprober", "ClientInfo"),
        app_name=app_name,
    )


def encode_client_info_json(info: ClientInfo) -> bytes:
    """Encode ClientInfo exactly as Tailscale's client does (same names, same omissions)."""
    doc: dict[str, object] = {}
    if info.mesh_key is not None:
        doc["meshKey"] = info.mesh_key.hex()
    if info.version:
        doc["version"] = info.version
    doc["CanAckPings"] = info.can_ack_pings
    if info.is_prober:
        doc["IsProber"] = True
    if info.app_name:
        doc["AppName"] = info.app_name
    return _json_encoder.encode(doc)


def decode_server_info_json(doc: bytes) -> ServerInfo:
    """Decode the plaintext of a ServerInfo box (unknown fields ignored).

    Raises:
        RemoteProtocolError: not a JSON object or a field of the wrong type.
    """
    fields = _lower_keys(doc, "ServerInfo")
    return ServerInfo(
        version=_opt_int(fields, "version", "ServerInfo"),
        token_bucket_bytes_per_second=_opt_int(fields, "tokenbucketbytespersecond", "ServerInfo"),
        token_bucket_bytes_burst=_opt_int(fields, "tokenbucketbytesburst", "ServerInfo"),
    )


def encode_server_info_json(info: ServerInfo) -> bytes:
    """Encode ServerInfo with Tailscale's field names (``version`` + token bucket)."""
    doc: dict[str, object] = {}
    if info.version:
        doc["version"] = info.version
    if info.token_bucket_bytes_per_second:
        doc["TokenBucketBytesPerSecond"] = info.token_bucket_bytes_per_second
    if info.token_bucket_bytes_burst:
        doc["TokenBucketBytesBurst"] = info.token_bucket_bytes_burst
    return _json_encoder.encode(doc)


# --------------------------------------------------------------------------
# Encoders: one function per frame type
# --------------------------------------------------------------------------


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    """Return header + payload for any frame type.

    Raises:
        LocalProtocolError: ``payload`` is longer than :data:`MAX_FRAME_LEN`.
    """
    if len(payload) > MAX_FRAME_LEN:
        raise LocalProtocolError(f"frame payload of {len(payload)} bytes exceeds {MAX_FRAME_LEN}")
    return _HEADER.pack(frame_type, len(payload)) + payload


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_LEN:
        raise LocalProtocolError(f"{what} must be {KEY_LEN} bytes, got {len(key)}")


def _check_packet(packet: bytes) -> None:
    if len(packet) > MAX_PACKET_SIZE:
        raise LocalProtocolError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET_SIZE}")


def encode_server_key(server_public: bytes) -> bytes:
    """ServerKey (0x01): magic + server public key."""
    _check_key(server_public, "server key")
    return encode_frame(FrameType.SERVER_KEY, MAGIC + server_public)


def encode_client_info(client_public: bytes, sealed_info: bytes) -> bytes:
    """ClientInfo (0x02): client public key + ``nonce || box(JSON ClientInfo)``."""
    _check_key(client_public, "client key")
    return encode_frame(FrameType.CLIENT_INFO, client_public + sealed_info)


def encode_server_info(sealed_info: bytes) -> bytes:
    """ServerInfo (0x03): ``nonce || box(JSON ServerInfo)``."""
    return encode_frame(FrameType.SERVER_INFO, sealed_info)


def encode_send_packet(dst: bytes, packet: bytes) -> bytes:
    """SendPacket (0x04): destination key + packet (client to server)."""
    _check_key(dst, "destination key")
    _check_packet(packet)
    return b"".join((_HEADER.pack(FrameType.SEND_PACKET, KEY_LEN + len(packet)), dst, packet))


def encode_recv_packet(src: bytes, packet: bytes) -> bytes:
    """RecvPacket (0x05): source key + packet (server to client, protocol v2)."""
    _check_key(src, "source key")
    _check_packet(packet)
    return b"".join((_HEADER.pack(FrameType.RECV_PACKET, KEY_LEN + len(packet)), src, packet))


def encode_forward_packet(src: bytes, dst: bytes, packet: bytes) -> bytes:
    """ForwardPacket (0x0a): source key + destination key + packet (mesh only)."""
    _check_key(src, "source key")
    _check_key(dst, "destination key")
    _check_packet(packet)
    header = _HEADER.pack(FrameType.FORWARD_PACKET, 2 * KEY_LEN + len(packet))
    return b"".join((header, src, dst, packet))


def encode_keep_alive() -> bytes:
    """KeepAlive (0x06): no payload."""
    return _HEADER.pack(FrameType.KEEP_ALIVE, 0)


def encode_note_preferred(preferred: bool) -> bytes:
    """NotePreferred (0x07): one byte, 1 if this relay is the client's home."""
    return encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def encode_peer_gone(peer: bytes, reason: PeerGoneReason) -> bytes:
    """PeerGone (0x08): peer key + reason byte.

    Raises:
        LocalProtocolError: ``reason`` is :attr:`PeerGoneReason.MESH_CONN_BROKE`,
            which exists only locally and must never go on the wire.
    """
    _check_key(peer, "peer key")
    if reason is PeerGoneReason.MESH_CONN_BROKE:
        raise LocalProtocolError("MESH_CONN_BROKE is a local-only reason")
    return encode_frame(FrameType.PEER_GONE, peer + bytes((reason,)))


def encode_peer_present(
    peer: bytes,
    ip: str | None,
    port: int,
    flags: PeerPresentFlags,
) -> bytes:
    """PeerPresent (0x09): key + 16-byte IP + port + flags (51 bytes, current servers).

    Args:
        peer: the connected client's key.
        ip: its remote address (IPv4 is sent v4-mapped), or ``None`` if unknown
            (sent as ``::``).
        port: its remote port (0 if unknown).
        flags: :class:`PeerPresentFlags`; never zero from a modern server.
    """
    _check_key(peer, "peer key")
    addr = b"\x00" * 16
    if ip is not None:
        parsed = ipaddress.ip_address(ip)
        if isinstance(parsed, ipaddress.IPv4Address):
            parsed = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + parsed.packed)
        addr = parsed.packed
    payload = peer + addr + _U16.pack(port & 0xFFFF) + bytes((int(flags) & 0xFF,))
    return encode_frame(FrameType.PEER_PRESENT, payload)


def encode_watch_conns() -> bytes:
    """WatchConns (0x10): no payload (mesh clients only)."""
    return _HEADER.pack(FrameType.WATCH_CONNS, 0)


def encode_close_peer(peer: bytes) -> bytes:
    """ClosePeer (0x11): key of the client to disconnect (mesh clients only)."""
    _check_key(peer, "peer key")
    return encode_frame(FrameType.CLOSE_PEER, peer)


def encode_ping(data: bytes) -> bytes:
    """Ping (0x12): 8 opaque bytes the other side echoes in a Pong."""
    if len(data) != 8:
        raise LocalProtocolError("ping data must be 8 bytes")
    return encode_frame(FrameType.PING, data)


def encode_pong(data: bytes) -> bytes:
    """Pong (0x13): the 8 bytes of the Ping being answered."""
    if len(data) != 8:
        raise LocalProtocolError("pong data must be 8 bytes")
    return encode_frame(FrameType.PONG, data)


def encode_health(problem: str) -> bytes:
    """Health (0x14): problem text; the empty string clears the problem."""
    return encode_frame(FrameType.HEALTH, problem.encode())


def encode_restarting(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    """Restarting (0x15): two big-endian uint32 millisecond durations."""
    return encode_frame(FrameType.RESTARTING, _U32X2.pack(reconnect_in_ms, try_for_ms))


# --------------------------------------------------------------------------
# Payload parsers: one function per frame type, each on the payload only
# --------------------------------------------------------------------------


def parse_server_key(payload: bytes) -> bytes:
    """Return the server public key from a ServerKey payload.

    Extra trailing bytes are allowed (reserved for future use).

    Raises:
        RemoteProtocolError: short payload or wrong magic.
    """
    if len(payload) < len(MAGIC) + KEY_LEN or payload[: len(MAGIC)] != MAGIC:
        raise RemoteProtocolError("invalid server greeting")
    return bytes(payload[len(MAGIC) : len(MAGIC) + KEY_LEN])


def parse_client_info(payload: bytes) -> tuple[bytes, bytes]:
    """Split a ClientInfo payload into ``(client_public_key, sealed_box)``.

    Raises:
        RemoteProtocolError: shorter than key + nonce, or longer than
            :data:`MAX_CLIENT_INFO_LEN`.
    """
    if len(payload) < KEY_LEN + NONCE_LEN:
        raise RemoteProtocolError("short client info")
    if len(payload) > MAX_CLIENT_INFO_LEN:
        raise RemoteProtocolError("long client info")
    return bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:])


def parse_server_info(payload: bytes) -> bytes:
    """Return the sealed box of a ServerInfo payload.

    Raises:
        RemoteProtocolError: shorter than a nonce or longer than 1 MiB + nonce.
    """
    if len(payload) < NONCE_LEN:
        raise RemoteProtocolError("short server info frame")
    if len(payload) > NONCE_LEN + MAX_FRAME_LEN:
        raise RemoteProtocolError("long server info frame")
    return bytes(payload)


def parse_send_packet(payload: bytes) -> tuple[bytes, bytes]:
    """Split a SendPacket payload into ``(destination_key, packet)``.

    Raises:
        RemoteProtocolError: shorter than a key, or packet over :data:`MAX_PACKET_SIZE`.
    """
    if len(payload) < KEY_LEN:
        raise RemoteProtocolError("short send packet frame")
    if len(payload) - KEY_LEN > MAX_PACKET_SIZE:
        raise RemoteProtocolError(f"data packet of {len(payload) - KEY_LEN} bytes is too long")
    return bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:])


def parse_recv_packet(payload: bytes) -> tuple[bytes, bytes]:
    """Split a v2 RecvPacket payload into ``(source_key, packet)``.

    Raises:
        RemoteProtocolError: shorter than a key.
    """
    if len(payload) < KEY_LEN:
        raise RemoteProtocolError("short recv packet frame")
    return bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:])


def parse_forward_packet(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a ForwardPacket payload into ``(source_key, destination_key, packet)``.

    Raises:
        RemoteProtocolError: shorter than two keys, or packet too long.
    """
    if len(payload) < 2 * KEY_LEN:
        raise RemoteProtocolError("short forward packet frame")
    if len(payload) - 2 * KEY_LEN > MAX_PACKET_SIZE:
        raise RemoteProtocolError("forwarded packet is too long")
    return (
        bytes(payload[:KEY_LEN]),
        bytes(payload[KEY_LEN : 2 * KEY_LEN]),
        bytes(payload[2 * KEY_LEN :]),
    )


def parse_note_preferred(payload: bytes) -> bool:
    """Return the preferred flag of a NotePreferred payload.

    Raises:
        RemoteProtocolError: the payload is not exactly one byte.
    """
    if len(payload) != 1:
        raise RemoteProtocolError("NotePreferred frame has the wrong size")
    return payload[0] != 0


def parse_peer_gone(payload: bytes) -> tuple[bytes, PeerGoneReason | int]:
    """Return ``(peer_key, reason)`` from a PeerGone payload.

    A payload of exactly 32 bytes (pre-reason servers) means DISCONNECTED.
    Unknown reason bytes are returned as plain ints.

    Raises:
        RemoteProtocolError: shorter than a key.
    """
    if len(payload) < KEY_LEN:
        raise RemoteProtocolError("short peer gone frame")
    reason: PeerGoneReason | int = PeerGoneReason.DISCONNECTED
    if len(payload) > KEY_LEN:
        raw = payload[KEY_LEN]
        try:
            reason = PeerGoneReason(raw)
        except ValueError:
            reason = raw
    return bytes(payload[:KEY_LEN]), reason


class PeerPresent(msgspec.Struct, frozen=True, kw_only=True):
    """A decoded PeerPresent frame.

    Attributes:
        key: the connected client's public key.
        ip: its remote IP as text (v4-mapped addresses unmapped), or ``None``
            when the server did not send one.
        port: its remote port (0 when unknown).
        flags: :class:`PeerPresentFlags` bits; 0 when the server sent none.
    """

    key: bytes
    ip: str | None = None
    port: int = 0
    flags: int = 0


def parse_peer_present(payload: bytes) -> PeerPresent:
    """Decode a PeerPresent payload, tolerating the shorter forms of older servers.

    Raises:
        RemoteProtocolError: shorter than a key.
    """
    if len(payload) < KEY_LEN:
        raise RemoteProtocolError("short peer present frame")
    key = bytes(payload[:KEY_LEN])
    if len(payload) < KEY_LEN + 18:
        return PeerPresent(key=key)
    v6 = ipaddress.IPv6Address(bytes(payload[KEY_LEN : KEY_LEN + 16]))
    ip = str(v6.ipv4_mapped) if v6.ipv4_mapped is not None else str(v6)
    (port,) = _U16.unpack_from(payload, KEY_LEN + 16)
    flags = payload[KEY_LEN + 18] if len(payload) > KEY_LEN + 18 else 0
    return PeerPresent(key=key, ip=ip, port=port, flags=flags)


def parse_close_peer(payload: bytes) -> bytes:
    """Return the key of a ClosePeer payload.

    Raises:
        RemoteProtocolError: the payload is not exactly one key.
    """
    if len(payload) != KEY_LEN:
        raise RemoteProtocolError("ClosePeer frame has the wrong size")
    return bytes(payload)


def parse_ping(payload: bytes) -> bytes:
    """Return the 8 data bytes of a Ping or Pong payload.

    Trailing bytes up to 1000 are tolerated (room for future extensions), as
    Tailscale's server does.

    Raises:
        RemoteProtocolError: shorter than 8 bytes or longer than 1000.
    """
    if len(payload) < 8:
        raise RemoteProtocolError(f"short ping: {len(payload)} bytes")
    if len(payload) > 1000:
        raise RemoteProtocolError(f"ping body too large: {len(payload)} bytes")
    return bytes(payload[:8])


def parse_restarting(payload: bytes) -> tuple[int, int]:
    """Return ``(reconnect_in_ms, try_for_ms)`` of a Restarting payload.

    Raises:
        RemoteProtocolError: shorter than 8 bytes.
    """
    if len(payload) < 8:
        raise RemoteProtocolError("short server restarting frame")
    reconnect, try_for = _U32X2.unpack_from(payload, 0)
    return int(reconnect), int(try_for)


def looks_like_disco(packet: bytes | memoryview) -> bool:
    """Report whether ``packet`` looks like an encrypted disco message.

    Disco packets (NAT-traversal pings, call-me-maybe) are small and precious:
    the relay queues them separately so bulk traffic cannot starve them, and
    only answers them with PeerGone(NOT_HERE).
    """
    return len(packet) >= _DISCO_MIN_LEN and packet[: len(DISCO_MAGIC)] == DISCO_MAGIC


# --------------------------------------------------------------------------
# Stream decoder
# --------------------------------------------------------------------------


class FrameDecoder:
    """Incremental frame splitter for one direction of one connection.

    Feed it whatever the transport produced; it returns every frame completed
    by that chunk as ``(frame_type, payload)`` with ``payload`` an independent
    ``bytes`` object (safe to queue after the chunk is gone).

    The common case (no partial frame pending) slices frames straight out of
    the chunk; only the tail of a frame that straddles two chunks is buffered,
    in a ``bytearray`` so that a large frame arriving in many small TLS records
    costs linear, not quadratic, copying.

    Args:
        max_frame_len: largest payload accepted.  A header announcing more
            raises :class:`~relay.errors.RemoteProtocolError` immediately.
    """

    __slots__ = ("_max", "_partial", "_want")

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN) -> None:
        self._max = max_frame_len
        # Invariant: _partial holds a strict prefix of one frame (header
        # included); _want is its full length once the header is known, else 0.
        self._partial = bytearray()
        self._want = 0

    @property
    def max_frame_len(self) -> int:
        """The payload limit; may be changed (e.g. raised after login)."""
        return self._max

    @max_frame_len.setter
    def max_frame_len(self, value: int) -> None:
        self._max = value

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame currently held."""
        return len(self._partial)

    def complete(self, data: bytes) -> tuple[tuple[int, bytes] | None, int]:
        """Finish the pending partial frame with bytes from the start of ``data``.

        For callers that scan complete frames in place themselves (the relay
        core's hot path) and only need the decoder for frames that straddle
        chunks.  Consumes no more than the pending frame needs.

        Returns:
            ``(frame, consumed)``: the completed frame (``None`` if ``data``
            was not enough; then all of it was consumed) and how many bytes of
            ``data`` were used.

        Raises:
            RemoteProtocolError: the pending frame's header exceeds the limit.
        """
        partial = self._partial
        pos = 0
        n = len(data)
        if self._want == 0:
            take = FRAME_HEADER_LEN - len(partial)
            partial += data[:take]
            pos = min(take, n)
            if len(partial) < FRAME_HEADER_LEN:
                return None, pos
            _, length = _HEADER.unpack_from(partial, 0)
            if length > self._max:
                raise RemoteProtocolError(f"frame of {length} bytes exceeds limit {self._max}")
            self._want = FRAME_HEADER_LEN + length
        need = self._want - len(partial)
        partial += data[pos : pos + need]
        pos = min(pos + need, n)
        if len(partial) < self._want:
            return None, pos
        frame = (partial[0], bytes(partial[FRAME_HEADER_LEN:]))
        partial.clear()
        self._want = 0
        return frame, pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        """Consume ``data`` and return the frames it completes, in order.

        Raises:
            RemoteProtocolError: a frame header announces a payload longer than
                the limit.  The decoder must not be used afterwards.
        """
        if type(data) is not bytes:
            data = bytes(data)  # payloads must be immutable, independent bytes
        frames: list[tuple[int, bytes]] = []
        pos = 0
        n = len(data)
        if self._partial:
            frame, pos = self.complete(data)
            if frame is None:
                return frames
            frames.append(frame)
        unpack_from = _HEADER.unpack_from
        limit = self._max
        while pos + FRAME_HEADER_LEN <= n:
            ftype, length = unpack_from(data, pos)
            if length > limit:
                raise RemoteProtocolError(f"frame of {length} bytes exceeds limit {limit}")
            end = pos + FRAME_HEADER_LEN + length
            if end > n:
                self._want = FRAME_HEADER_LEN + length
                break
            frames.append((ftype, data[pos + FRAME_HEADER_LEN : end]))
            pos = end
        if pos < n:
            self._partial += data[pos:]
        return frames
