"""STUN binding requests and responses (RFC 5389), as pure functions over bytes.

Role in the pipeline
--------------------
Tailscale clients find their public ``ip:port`` (and probe relay latency) by
sending STUN binding requests to every DERP region's STUN port (3478 by
default).  The relay answers each with the source address it observed.  This
module only parses and builds datagrams; the UDP socket lives in
:mod:`relay.serve.stun_io` (``serve_stun``).

Message layout (RFC 5389 §6)::

    offset  size  field
    0       2     message type: top two bits 0; 0x0001 binding request,
                  0x0101 binding success response
    2       2     message length: bytes after the header, a multiple of 4
    4       4     magic cookie 0x2112A442
    8       12    transaction ID (echoed in the response)
    20      ...   attributes: type (2) | length (2) | value, padded to 4 bytes

Attributes we use::

    0x0020 XOR-MAPPED-ADDRESS  0x00 | family (1=IPv4, 2=IPv6) | port ^ 0x2112
                               | address ^ cookie (IPv4) or ^ cookie||txid (IPv6)
    0x0001 MAPPED-ADDRESS      same, not XORed (only read, as a fallback)
    0x8022 SOFTWARE            UTF-8 text; Tailscale sends "tailnode"
    0x8028 FINGERPRINT         CRC-32 of the message before this attribute,
                               XOR 0x5354554E; must be the last attribute, and
                               the header length already counts it (§15.5)

Error policy: the parsers raise one of the sentinel errors in
:mod:`relay.errors` (:class:`~relay.errors.NotStunError`,
:class:`~relay.errors.NotBindingRequestError`,
:class:`~relay.errors.MalformedAttributesError`,
:class:`~relay.errors.BadFingerprintError`).  A server silently drops any
datagram that fails to parse (RFC 5389 §7.3: discard, do not answer).

Unlike Tailscale's own STUN server we answer *any* well-formed binding request,
not only those whose SOFTWARE says "tailnode": other ICE agents may use the
relay as a STUN server too, and answering costs one datagram.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from collections.abc import Callable

from .errors import (
    BadFingerprintError,
    MalformedAttributesError,
    NotBindingRequestError,
    NotStunError,
)

__all__ = [
    "ATTR_FINGERPRINT",
    "ATTR_MAPPED_ADDRESS",
    "ATTR_SOFTWARE",
    "ATTR_XOR_MAPPED_ADDRESS",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "DEFAULT_STUN_PORT",
    "HEADER_LEN",
    "MAGIC_COOKIE",
    "TXID_LEN",
    "binding_request",
    "binding_response",
    "fingerprint",
    "is_stun",
    "new_transaction_id",
    "parse_binding_request",
    "parse_binding_response",
]

DEFAULT_STUN_PORT = 3478
HEADER_LEN = 20
TXID_LEN = 12
MAGIC_COOKIE = b"\x21\x12\xa4\x42"
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
# Not in the RFC: the same attribute shifted into the comprehension-optional
# range.  Some servers send it; Tailscale's client accepts it, so do we.
_ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028

_FINGERPRINT_XOR = 0x5354554E
_FINGERPRINT_ATTR_LEN = 8  # 2 type + 2 length + 4 CRC
_COOKIE_PORT_MASK = 0x2112  # the cookie's first 16 bits
_HDR = struct.Struct(">HH4s12s")
_ATTR_HDR = struct.Struct(">HH")
_U32 = struct.Struct(">I")
_XOR_ADDR_HDR = struct.Struct(">BBH")


def new_transaction_id(random: Callable[[int], bytes] = os.urandom) -> bytes:
    """Return a fresh 12-byte transaction ID (``random`` is injectable for tests)."""
    txid = random(TXID_LEN)
    if len(txid) != TXID_LEN:
        raise ValueError("transaction IDs are 12 bytes")
    return txid


def fingerprint(message_prefix: bytes) -> int:
    """FINGERPRINT value for the bytes preceding the attribute (RFC 5389 §15.5)."""
    return (zlib.crc32(message_prefix) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF


def is_stun(data: bytes) -> bool:
    """Whether ``data`` looks like a STUN message: long enough, top bits 0, magic cookie."""
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and data[4:8] == MAGIC_COOKIE


def _attributes(body: bytes) -> list[tuple[int, int, bytes]]:
    """Split an attribute area into ``(offset_in_body, type, value)`` triples."""
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    while pos < len(body):
        if len(body) - pos < 4:
            raise MalformedAttributesError("truncated attribute header")
        atype, alen = _ATTR_HDR.unpack_from(body, pos)
        padded = (alen + 3) & ~3
        if pos + 4 + padded > len(body):
            raise MalformedAttributesError(f"attribute 0x{atype:04x} runs past the message")
        out.append((pos, atype, body[pos + 4 : pos + 4 + alen]))
        pos += 4 + padded
    return out


def _split(data: bytes) -> tuple[int, bytes, bytes]:
    """Validate the header; return ``(message_type, txid, attribute_bytes)``."""
    if not is_stun(data):
        raise NotStunError("not a STUN message")
    mtype, length, _cookie, txid = _HDR.unpack_from(data, 0)
    if length % 4 != 0 or HEADER_LEN + length != len(data):
        raise MalformedAttributesError(
            f"header length {length} does not match the {len(data) - HEADER_LEN} bytes present"
        )
    return mtype, txid, data[HEADER_LEN:]


def _check_fingerprint(data: bytes, attrs: list[tuple[int, int, bytes]]) -> None:
    for index, (offset, atype, value) in enumerate(attrs):
        if atype != ATTR_FINGERPRINT:
            continue
        if index != len(attrs) - 1:
            raise MalformedAttributesError("FINGERPRINT is not the last attribute")
        if len(value) != 4:
            raise MalformedAttributesError("FINGERPRINT must be 4 bytes")
        (got,) = _U32.unpack(value)
        if got != fingerprint(data[: HEADER_LEN + offset]):
            raise BadFingerprintError("FINGERPRINT does not match the message")


def parse_binding_request(data: bytes) -> bytes:
    """Validate a binding request and return its 12-byte transaction ID.

    A FINGERPRINT is optional but, if present, must be last and correct.
    Unknown attributes are ignored.

    Raises:
        NotStunError: not STUN at all (the caller may pass it to another protocol).
        NotBindingRequestError: STUN, but not a binding request.
        MalformedAttributesError: lengths that do not add up.
        BadFingerprintError: the FINGERPRINT attribute is wrong.
    """
    mtype, txid, body = _split(data)
    if mtype != BINDING_REQUEST:
        raise NotBindingRequestError(f"message type 0x{mtype:04x} is not a binding request")
    _check_fingerprint(data, _attributes(body))
    return bytes(txid)


def _xor_address(txid: bytes, ip: str, port: int) -> bytes:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket reports v4 clients as ::ffff:a.b.c.d
    family = 1 if addr.version == 4 else 2
    mask = MAGIC_COOKIE + txid
    xored = bytes(b ^ m for b, m in zip(addr.packed, mask, strict=False))
    return _XOR_ADDR_HDR.pack(0, family, (port ^ _COOKIE_PORT_MASK) & 0xFFFF) + xored


def _attribute(atype: int, value: bytes) -> bytes:
    pad = b"\x00" * (-len(value) % 4)
    return _ATTR_HDR.pack(atype, len(value)) + value + pad


def _message(mtype: int, txid: bytes, attrs: bytes, *, with_fingerprint: bool) -> bytes:
    if len(txid) != TXID_LEN:
        raise ValueError("transaction IDs are 12 bytes")
    length = len(attrs) + (_FINGERPRINT_ATTR_LEN if with_fingerprint else 0)
    msg = _HDR.pack(mtype, length, MAGIC_COOKIE, txid) + attrs
    if with_fingerprint:
        msg += _attribute(ATTR_FINGERPRINT, _U32.pack(fingerprint(msg)))
    return msg


def binding_request(
    txid: bytes,
    *,
    software: str | None = "tailnode",
    with_fingerprint: bool = True,
) -> bytes:
    """Build a binding request (what a Tailscale client sends by default).

    Args:
        txid: 12-byte transaction ID.
        software: SOFTWARE attribute text, or ``None`` to omit it.
        with_fingerprint: append a FINGERPRINT attribute.
    """
    attrs = b"" if software is None else _attribute(ATTR_SOFTWARE, software.encode())
    return _message(BINDING_REQUEST, txid, attrs, with_fingerprint=with_fingerprint)


def binding_response(
    txid: bytes,
    ip: str,
    port: int,
    *,
    software: str | None = None,
    with_fingerprint: bool = True,
) -> bytes:
    """Build a binding success response carrying XOR-MAPPED-ADDRESS ``ip:port``.

    Args:
        txid: the request's transaction ID.
        ip: the client's address as seen by us (IPv4, IPv6, or v4-mapped IPv6,
            which is reported as IPv4).
        port: the client's source port.
        software: optional SOFTWARE attribute.
        with_fingerprint: append a FINGERPRINT attribute.
    """
    attrs = _attribute(ATTR_XOR_MAPPED_ADDRESS, _xor_address(txid, ip, port))
    if software is not None:
        attrs += _attribute(ATTR_SOFTWARE, software.encode())
    return _message(BINDING_SUCCESS, txid, attrs, with_fingerprint=with_fingerprint)


def _decode_address(value: bytes, mask: bytes | None) -> tuple[str, int]:
    if len(value) < 4:
        raise MalformedAttributesError("address attribute too short")
    _, family, port = _XOR_ADDR_HDR.unpack_from(value, 0)
    size = {1: 4, 2: 16}.get(family)
    if size is None or len(value) < 4 + size:
        raise MalformedAttributesError(f"bad address family {family} or length")
    raw = value[4 : 4 + size]
    if mask is not None:
        raw = bytes(b ^ m for b, m in zip(raw, mask, strict=False))
        port ^= _COOKIE_PORT_MASK
    addr = ipaddress.ip_address(raw)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr), port


def parse_binding_response(data: bytes) -> tuple[bytes, str, int]:
    """Parse a binding success response into ``(txid, ip, port)``.

    XOR-MAPPED-ADDRESS wins; MAPPED-ADDRESS is the fallback for old servers.

    Raises:
        NotStunError: not STUN.
        NotBindingRequestError: STUN, but not a binding success response.
        MalformedAttributesError: bad lengths, or no address attribute at all.
        BadFingerprintError: a FINGERPRINT is present and wrong.
    """
    mtype, txid, body = _split(data)
    if mtype != BINDING_SUCCESS:
        raise NotBindingRequestError(f"message type 0x{mtype:04x} is not a binding success")
    attrs = _attributes(body)
    _check_fingerprint(data, attrs)
    xor: tuple[str, int] | None = None
    plain: tuple[str, int] | None = None
    for _, atype, value in attrs:
        if atype in (ATTR_XOR_MAPPED_ADDRESS, _ATTR_XOR_MAPPED_ADDRESS_ALT):
            xor = _decode_address(value, MAGIC_COOKIE + txid)
        elif atype == ATTR_MAPPED_ADDRESS:
            plain = _decode_address(value, None)
    found = xor or plain
    if found is None:
        raise MalformedAttributesError("response has no mapped address")
    return bytes(txid), found[0], found[1]
