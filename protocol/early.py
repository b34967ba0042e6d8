"""The ts2021 early payload: server -> client, inside Noise, before HTTP/2.

Role in the pipeline: right after the handshake the server may send one
length-prefixed JSON message (``tailcfg.EarlyNoise``) ahead of its HTTP/2
SETTINGS frame (TS:control/ts2021/conn.go, HS:hscontrol/noise.go; capability
49, docs/control-protocol.md §5.1)::

    off len  field
      0   5  magic FF FF FF 54 53 ("\\xff\\xff\\xffTS")
      5   4  JSON length, uint32 BIG-endian (client rejects > 10 MiB)
      9   n  {"nodeKeyChallenge":"chalpub:<64 hex>"}

The client reads the first 9 plaintext bytes: with the magic it consumes the
payload, otherwise the bytes are the start of the server's first HTTP/2 frame.
No collision is possible: that frame must be SETTINGS, whose type byte at
offset 3 is 0x04, not 'T' (0x54).

Neither v1.90 nor HEAD ``tailscaled`` consumes the challenge today, but
Headscale and the SaaS send one, so the server does too.

Invariants: :class:`EarlyPayloadReader` never buffers more than
``MAX_EARLY_PAYLOAD`` + 9 bytes and raises only
:class:`~protocol.errors.RemoteProtocolError` for peer input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import msgspec

from projections import tailcfg

from .errors import RemoteProtocolError

__all__ = [
    "EARLY_PAYLOAD_MAGIC",
    "EARLY_PAYLOAD_PREFIX_LEN",
    "MAX_EARLY_PAYLOAD",
    "EarlyPayloadReader",
    "EarlyResult",
    "encode_early_payload",
]

#: The 5-byte magic that starts an early payload.
EARLY_PAYLOAD_MAGIC: Final = b"\xff\xff\xffTS"
#: Magic plus the 4-byte big-endian length.
EARLY_PAYLOAD_PREFIX_LEN: Final = 9
#: The Go client refuses larger early payloads.
MAX_EARLY_PAYLOAD: Final = 10 << 20
_LENGTH: Final = struct.Struct(">I")


def encode_early_payload(challenge_public: bytes) -> bytes:
    """Build the early payload carrying ``chalpub:<hex of challenge_public>``.

    Args:
        challenge_public: A fresh per-connection X25519 public key (32 bytes).

    Raises:
        ValueError: The key is not 32 bytes long.
    """
    body = tailcfg.encode(
        tailcfg.EarlyNoise(
            node_key_challenge=tailcfg.format_key(tailcfg.KeyPrefix.CHALLENGE, challenge_public)
        )
    )
    return EARLY_PAYLOAD_MAGIC + _LENGTH.pack(len(body)) + body


@dataclass(frozen=True, slots=True)
class EarlyResult:
    """What :meth:`EarlyPayloadReader.receive_data` found once it decided.

    Attributes:
        early: The decoded early payload, or ``None`` if the server sent none.
        remainder: Plaintext after the early payload (the HTTP/2 stream start).
    """

    early: tailcfg.EarlyNoise | None
    remainder: bytes


class EarlyPayloadReader:
    """Client-side splitter: optional early payload, then the HTTP/2 bytes.

    Feed decrypted plaintext until :meth:`receive_data` returns a result; after
    that, the caller hands all further plaintext to HTTP/2 directly.
    """

    __slots__ = ("_buffer", "_done")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._done = False

    def receive_data(self, data: bytes) -> EarlyResult | None:
        """Feed plaintext; return the result once it is known, else ``None``.

        Raises:
            RemoteProtocolError: Oversized or undecodable early payload, or a
                call after the result was returned.
        """
        if self._done:
            raise RemoteProtocolError("early payload already processed")
        buf = self._buffer
        buf += data
        if len(buf) < EARLY_PAYLOAD_PREFIX_LEN:
            # A short first read that already differs from the magic is HTTP/2.
            if buf[: len(EARLY_PAYLOAD_MAGIC)] == EARLY_PAYLOAD_MAGIC[: len(buf)]:
                return None
            return self._finish(None, 0)
        if bytes(buf[:5]) != EARLY_PAYLOAD_MAGIC:
            return self._finish(None, 0)
        (length,) = _LENGTH.unpack_from(buf, 5)
        if length > MAX_EARLY_PAYLOAD:
            raise RemoteProtocolError(f"early payload of {length} bytes is too large")
        end = EARLY_PAYLOAD_PREFIX_LEN + length
        if len(buf) < end:
            return None
        try:
            early = tailcfg.decode(bytes(buf[EARLY_PAYLOAD_PREFIX_LEN:end]), tailcfg.EarlyNoise)
        except msgspec.MsgspecError as exc:
            raise RemoteProtocolError(f"undecodable early payload: {exc}") from None
        return self._finish(early, end)

    def _finish(self, early: tailcfg.EarlyNoise | None, consumed: int) -> EarlyResult:
        self._done = True
        remainder = bytes(self._buffer[consumed:])
        self._buffer = bytearray()
        return EarlyResult(early=early, remainder=remainder)
