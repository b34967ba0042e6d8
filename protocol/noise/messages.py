"""Wire layouts of Tailscale's ``controlbase`` messages (pure bytes <-> values).

Role in the pipeline: the lowest layer of the ts2021 transport. The handshake
(:mod:`protocol.noise.handshake`) builds and parses the two handshake messages
through these functions, the record layer (:mod:`protocol.noise.transport`) uses
the record header helpers. Nothing here does cryptography or I/O.

Protocol flow (docs/control-protocol.md §1, §4)::

    client                                              server
      |-- initiation (101 bytes, base64 in the           |
      |   X-Tailscale-Handshake header of POST /ts2021) ->|
      |<------ HTTP 101, then response (51 bytes, raw) ---|  or an error message
      |<==== transport records (type 4), both ways =====>|

All multi-byte integers in this module are **big-endian** (Go's
``binary.BigEndian`` in TS:control/controlbase/messages.go). The Noise payloads
themselves are empty: the handshake carries only keys and tags.

Invariants:

* Every ``decode_*`` function checks the exact size, type byte and length field
  and raises :class:`~protocol.errors.HandshakeError` /
  :class:`~protocol.errors.RemoteProtocolError` on any mismatch; it never
  raises ``IndexError`` or ``struct.error`` for peer input.
* ``encode_*`` functions validate their own arguments with ``ValueError``
  (our bug, not the peer's).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from ..errors import HandshakeError, RemoteProtocolError

__all__ = [
    "HEADER_LEN",
    "INITIATION_HEADER_LEN",
    "INITIATION_LEN",
    "INITIATION_PAYLOAD_LEN",
    "KEY_LEN",
    "MAX_CIPHERTEXT_SIZE",
    "MAX_ERROR_TEXT",
    "MAX_MESSAGE_SIZE",
    "MAX_PLAINTEXT_SIZE",
    "MIN_RECORD_CIPHERTEXT",
    "RESPONSE_LEN",
    "RESPONSE_PAYLOAD_LEN",
    "TAG_LEN",
    "Initiation",
    "MessageType",
    "Response",
    "decode_error_text",
    "decode_initiation",
    "decode_response",
    "encode_error",
    "encode_initiation",
    "encode_record_header",
    "encode_response",
    "parse_record_header",
]


class MessageType(IntEnum):
    """The type byte that starts every controlbase message."""

    INITIATION = 0x01  #: client -> server, handshake message 1
    RESPONSE = 0x02  #: server -> client, handshake message 2
    ERROR = 0x03  #: server -> client, instead of RESPONSE; ASCII reason
    RECORD = 0x04  #: both ways after the handshake: one AEAD-sealed chunk


#: Length of an X25519 key and of a ChaCha20-Poly1305 key.
KEY_LEN: Final = 32
#: Poly1305 tag appended by every AEAD seal.
TAG_LEN: Final = 16

#: Header of every message except the initiation: type (1) + length (2).
HEADER_LEN: Final = 3
#: The initiation additionally starts with the protocol version (2).
INITIATION_HEADER_LEN: Final = 5

# Initiation (client -> server), exactly 101 bytes:
#
#   off len  field
#     0   2  protocol version (uint16 BE), = client capability version
#     2   1  type = 0x01
#     3   2  payload length = 96 (uint16 BE)
#     5  32  client ephemeral public key (clear)
#    37  48  client machine public key, sealed: 32 ciphertext + 16 tag
#    85  16  tag over the empty payload
_INIT_EPHEMERAL: Final = slice(5, 37)
_INIT_MACHINE: Final = slice(37, 85)
_INIT_TAG: Final = slice(85, 101)
INITIATION_PAYLOAD_LEN: Final = KEY_LEN + (KEY_LEN + TAG_LEN) + TAG_LEN  # 96
INITIATION_LEN: Final = INITIATION_HEADER_LEN + INITIATION_PAYLOAD_LEN  # 101
_INIT_HEADER: Final = struct.Struct(">HBH")

# Response (server -> client), exactly 51 bytes:
#
#   off len  field
#     0   1  type = 0x02
#     1   2  payload length = 48 (uint16 BE)
#     3  32  server ephemeral public key (clear)
#    35  16  tag over the empty payload
_RESP_EPHEMERAL: Final = slice(3, 35)
_RESP_TAG: Final = slice(35, 51)
RESPONSE_PAYLOAD_LEN: Final = KEY_LEN + TAG_LEN  # 48
RESPONSE_LEN: Final = HEADER_LEN + RESPONSE_PAYLOAD_LEN  # 51
_HEADER: Final = struct.Struct(">BH")

# Error (server -> client, instead of a response):
#
#   off len  field
#     0   1  type = 0x03
#     1   2  message length n (uint16 BE)
#     3   n  ASCII message; the client reports it as "server error: ..."
#: Go truncates error texts to what fits the 16-bit length field.
MAX_ERROR_TEXT: Final = 0xFFFF

# Transport record (both directions):
#
#   off len  field
#     0   1  type = 0x04
#     1   2  ciphertext length L (uint16 BE), 16 <= L <= 4093
#     3   L  ChaCha20-Poly1305(k_dir, nonce, plaintext, aad = empty)
#: Largest message on the wire, header included (TS conn.go maxMessageSize).
MAX_MESSAGE_SIZE: Final = 4096
#: Largest ciphertext one record can carry.
MAX_CIPHERTEXT_SIZE: Final = MAX_MESSAGE_SIZE - HEADER_LEN  # 4093
#: Largest plaintext one record can carry; writers split at this size.
MAX_PLAINTEXT_SIZE: Final = MAX_CIPHERTEXT_SIZE - TAG_LEN  # 4077
#: A record with an empty plaintext is legal and consists of the tag only.
MIN_RECORD_CIPHERTEXT: Final = TAG_LEN


@dataclass(frozen=True, slots=True)
class Initiation:
    """A parsed handshake initiation (the fields of the 101-byte message).

    Attributes:
        version: Protocol version = the client's capability version; it is
            mixed into the Noise prologue, never rejected at this layer.
        ephemeral_public: Client ephemeral X25519 public key (32 bytes).
        sealed_machine_key: The client's static key, AEAD-sealed (48 bytes).
        tag: Tag over the empty payload (16 bytes).
    """

    version: int
    ephemeral_public: bytes
    sealed_machine_key: bytes
    tag: bytes


@dataclass(frozen=True, slots=True)
class Response:
    """A parsed handshake response (the fields of the 51-byte message)."""

    ephemeral_public: bytes
    tag: bytes


def encode_initiation(
    version: int, ephemeral_public: bytes, sealed_machine_key: bytes, tag: bytes
) -> bytes:
    """Build the 101-byte initiation message.

    Raises:
        ValueError: A field has the wrong size or the version does not fit
            in 16 bits (a bug in the caller).
    """
    if not 0 <= version <= 0xFFFF:
        raise ValueError(f"protocol version {version} does not fit in uint16")
    if (len(ephemeral_public), len(sealed_machine_key), len(tag)) != (
        KEY_LEN,
        KEY_LEN + TAG_LEN,
        TAG_LEN,
    ):
        raise ValueError("initiation fields have the wrong sizes")
    header = _INIT_HEADER.pack(version, MessageType.INITIATION, INITIATION_PAYLOAD_LEN)
    return header + ephemeral_public + sealed_machine_key + tag


def decode_initiation(data: bytes) -> Initiation:
    """Parse and validate a 101-byte initiation message.

    The checks and their order match ``controlbase.Server``: size first (the
    message arrives whole, in an HTTP header), then type, then length field.

    Raises:
        HandshakeError: Wrong size, type or length field.
    """
    if len(data) != INITIATION_LEN:
        raise HandshakeError("wrong handshake initiation size")
    version, msg_type, length = _INIT_HEADER.unpack_from(data)
    if msg_type != MessageType.INITIATION:
        raise HandshakeError("unexpected handshake message type")
    if length != INITIATION_PAYLOAD_LEN:
        raise HandshakeError("wrong handshake initiation length")
    return Initiation(
        version=version,
        ephemeral_public=bytes(data[_INIT_EPHEMERAL]),
        sealed_machine_key=bytes(data[_INIT_MACHINE]),
        tag=bytes(data[_INIT_TAG]),
    )


def encode_response(ephemeral_public: bytes, tag: bytes) -> bytes:
    """Build the 51-byte handshake response.

    Raises:
        ValueError: A field has the wrong size.
    """
    if (len(ephemeral_public), len(tag)) != (KEY_LEN, TAG_LEN):
        raise ValueError("response fields have the wrong sizes")
    return _HEADER.pack(MessageType.RESPONSE, RESPONSE_PAYLOAD_LEN) + ephemeral_public + tag


def decode_response(data: bytes) -> Response:
    """Parse a complete 51-byte handshake response.

    Callers that read from a stream must first look at the 3-byte header
    with :func:`parse_record_header` to tell a response from an error message.

    Raises:
        HandshakeError: Wrong size, type or length field.
    """
    if len(data) != RESPONSE_LEN:
        raise HandshakeError("wrong handshake response size")
    msg_type, length = _HEADER.unpack_from(data)
    if msg_type != MessageType.RESPONSE:
        raise HandshakeError(f"unexpected response message type {msg_type}")
    if length != RESPONSE_PAYLOAD_LEN:
        raise HandshakeError(f"wrong length {length} received for handshake response")
    return Response(ephemeral_public=bytes(data[_RESP_EPHEMERAL]), tag=bytes(data[_RESP_TAG]))


def encode_error(text: str) -> bytes:
    """Build an error message (type 3) carrying ``text``.

    Like Go, the text is a fixed string chosen by the server; never format
    peer input into it. Non-ASCII characters are replaced.
    """
    raw = text.encode("ascii", "replace")[:MAX_ERROR_TEXT]
    return _HEADER.pack(MessageType.ERROR, len(raw)) + raw


def decode_error_text(body: bytes) -> str:
    """Decode the body of an error message for display (never raises)."""
    return body.decode("ascii", "replace")


def parse_record_header(header: bytes) -> tuple[int, int]:
    """Split a 3-byte header into ``(type byte, length field)``.

    The type byte is returned as a plain ``int`` so that callers can report
    unknown values; compare it with :class:`MessageType` members.

    Raises:
        RemoteProtocolError: ``header`` is not exactly 3 bytes long.
    """
    if len(header) != HEADER_LEN:
        raise RemoteProtocolError("truncated message header")
    msg_type, length = _HEADER.unpack(header)
    return msg_type, length


def encode_record_header(ciphertext_len: int) -> bytes:
    """Build the 3-byte header of a transport record.

    Raises:
        ValueError: ``ciphertext_len`` is outside ``[16, 4093]``.
    """
    if not MIN_RECORD_CIPHERTEXT <= ciphertext_len <= MAX_CIPHERTEXT_SIZE:
        raise ValueError(f"record ciphertext length {ciphertext_len} out of range")
    return _HEADER.pack(MessageType.RECORD, ciphertext_len)
