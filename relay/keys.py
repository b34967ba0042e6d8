"""Curve25519 keys and NaCl boxes as DERP uses them (pure, no I/O).

DERP addresses clients by their 32-byte Curve25519 *node public key* (the same
key the control protocol calls ``NodeKey``).  The relay has its own key pair;
its public half travels in the ServerKey frame and in the ``Derp-Public-Key``
header of the HTTP 101 response.

During login the two sides exchange one JSON document each, sealed with NaCl's
``crypto_box`` (Curve25519 + XSalsa20-Poly1305).  Tailscale's ``SealTo`` puts the
random 24-byte nonce in front of the box, which is exactly the layout PyNaCl's
``Box.encrypt`` produces, so the two interoperate byte for byte::

    sealed = nonce (24 B) || secretbox ciphertext (len(plaintext) + 16 B)

Keys are plain ``bytes`` everywhere in the relay: hashing a 32-byte ``bytes`` is
what the routing table does millions of times per second, and a wrapper class
would only slow that down.  The text forms (``nodekey:<64 hex>``,
``privkey:<64 hex>``) exist for logs, config files and the CLI.
"""

from __future__ import annotations

import nacl.exceptions
import nacl.public
import nacl.utils

from .errors import ConfigError, RemoteProtocolError

__all__ = [
    "KEY_LEN",
    "NONCE_LEN",
    "format_node_key",
    "format_private_key",
    "generate_private_key",
    "open_sealed",
    "parse_node_key",
    "parse_private_key",
    "public_key_of",
    "seal_to",
    "short_key",
]

KEY_LEN = 32
"""Length of every Curve25519 key (public or private), in bytes."""

NONCE_LEN = 24
"""Length of the random nonce that prefixes every sealed box."""

_BOX_OVERHEAD = 16  # Poly1305 tag added by crypto_box


def generate_private_key() -> bytes:
    """Return a fresh random Curve25519 private key (32 bytes)."""
    return bytes(nacl.public.PrivateKey.generate().encode())


def public_key_of(private_key: bytes) -> bytes:
    """Return the 32-byte public key for ``private_key``.

    Raises:
        ValueError: ``private_key`` is not 32 bytes long.
    """
    _check_len(private_key, "private key")
    return bytes(nacl.public.PrivateKey(private_key).public_key.encode())


def seal_to(private_key: bytes, peer_public: bytes, plaintext: bytes) -> bytes:
    """Seal ``plaintext`` from ``private_key`` to ``peer_public`` (nonce-prefixed box).

    Args:
        private_key: our 32-byte private key.
        peer_public: the recipient's 32-byte public key.
        plaintext: the message, typically a small JSON document.

    Returns:
        ``nonce || box``; ``len(plaintext) + 40`` bytes.
    """
    _check_len(private_key, "private key")
    _check_len(peer_public, "public key")
    box = nacl.public.Box(nacl.public.PrivateKey(private_key), nacl.public.PublicKey(peer_public))
    nonce = nacl.utils.random(NONCE_LEN)
    return bytes(box.encrypt(plaintext, nonce))


def open_sealed(private_key: bytes, peer_public: bytes, sealed: bytes) -> bytes:
    """Open a box produced by :func:`seal_to` (or Tailscale's ``SealTo``).

    Raises:
        RemoteProtocolError: the box is shorter than nonce plus tag, or it does
            not authenticate between these two keys.  Both are the peer's fault.
    """
    _check_len(private_key, "private key")
    if len(peer_public) != KEY_LEN:
        raise RemoteProtocolError(f"peer public key has {len(peer_public)} bytes, want {KEY_LEN}")
    if len(sealed) < NONCE_LEN + _BOX_OVERHEAD:
        raise RemoteProtocolError(f"sealed box too short ({len(sealed)} bytes)")
    box = nacl.public.Box(nacl.public.PrivateKey(private_key), nacl.public.PublicKey(peer_public))
    try:
        return bytes(box.decrypt(sealed))
    except nacl.exceptions.CryptoError as exc:
        raise RemoteProtocolError("sealed box does not open with these keys") from exc


def format_node_key(public_key: bytes) -> str:
    """Return the ``nodekey:<hex>`` text form used by Tailscale and our logs."""
    _check_len(public_key, "public key")
    return "nodekey:" + public_key.hex()


def format_private_key(private_key: bytes) -> str:
    """Return the ``privkey:<hex>`` text form used in the relay's key file."""
    _check_len(private_key, "private key")
    return "privkey:" + private_key.hex()


def short_key(public_key: bytes) -> str:
    """Return a short, log-friendly rendering (``[abcdEF]`` style: 5 hex digits)."""
    return "[" + public_key[:3].hex()[:5] + "]"


def parse_node_key(text: str) -> bytes:
    """Parse ``nodekey:<64 hex>`` (or bare 64 hex digits) into 32 raw bytes.

    Raises:
        ConfigError: the text is not a valid node public key.
    """
    return _parse_prefixed(text, "nodekey:", "node key")


def parse_private_key(text: str) -> bytes:
    """Parse ``privkey:<64 hex>`` (or bare 64 hex digits) into 32 raw bytes.

    Raises:
        ConfigError: the text is not a valid private key.
    """
    return _parse_prefixed(text, "privkey:", "private key")


def _parse_prefixed(text: str, prefix: str, what: str) -> bytes:
    body = text.strip()
    body = body.removeprefix(prefix)
    try:
        raw = bytes.fromhex(body)
    except ValueError as exc:
        raise ConfigError(f"invalid {what}: not hexadecimal") from exc
    if len(raw) != KEY_LEN:
        raise ConfigError(f"invalid {what}: {len(raw)} bytes, want {KEY_LEN}")
    return raw


def _check_len(key: bytes, what: str) -> None:
    if len(key) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} bytes, got {len(key)}")
