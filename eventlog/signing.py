"""Signed checkpoints: the log's head signed with Ed25519, so a rewrite is provable.

The hash chain alone cannot tell an edited history from an honest one when the editor
also recomputes every hash, and cannot see a truncated tail. So the server signs its
head ``(seq, hash, time)`` every N events, every T minutes, at shutdown and on demand,
with a key kept *outside* the data directory. Whoever can write the data directory but
not read that key can no longer produce a history that verifies.

Signed checkpoints are numbered ``n = 1, 2, …`` and each names the digest of the one
before it (``prev``), so removing one from the middle breaks the sequence. The newest
is also written, as an *anchor line*, to a file beside the signing key (one per log,
:func:`anchor_path`): removing the newest checkpoints or truncating the log is then
caught by comparing with that file, and ``tailledger log anchor`` prints the same line
to keep anywhere else (a ticket, a commit, another machine).

The signed message is the compact JSON array
``["tailledger-checkpoint/1", n, seq, hash, signed_at_us, prev]``.

An anchor line is self-contained::

    tailledger-anchor/1 n=7 seq=7000 hash=<64 hex> at=2026-12-06T01:02:03Z prev=<64 hex> key=<64 hex> sig=<128 hex>
"""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import datetime
from pathlib import Path
from typing import Final

import msgspec
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from .envelope import from_micros, to_micros

__all__ = [
    "SignedCheckpoint",
    "Signer",
    "anchor_path",
    "derive_mac_key",
    "load_or_create_signing_key",
    "load_signing_key",
    "parse_anchor",
    "parse_public_key",
    "read_anchor",
    "write_anchor",
]

_DOMAIN: Final = "tailledger-checkpoint/1"
_ANCHOR: Final = "tailledger-anchor/1"
_encoder: Final = msgspec.json.Encoder()


class SignedCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One signed head of the log."""

    n: int  # 1, 2, … in signing order
    seq: int  # the head's sequence number
    hash: str  # the head's chain hash
    signed_at_us: int
    prev: str  # digest of the previous signed checkpoint ("" for n = 1)
    public_key: str  # hex of the key that signed (informative: verify with a trusted key)
    signature: str  # hex

    def message(self) -> bytes:
        return _encoder.encode([_DOMAIN, self.n, self.seq, self.hash, self.signed_at_us, self.prev])

    def digest(self) -> str:
        """What the next checkpoint's ``prev`` names (covers the signature too)."""
        return hashlib.sha256(self.message() + b"\n" + self.signature.encode("ascii")).hexdigest()

    @property
    def signed_at(self) -> datetime:
        return from_micros(self.signed_at_us)

    def verifies(self, public_key: str) -> bool:
        """Whether the signature is ``public_key``'s over this checkpoint's content."""
        try:
            VerifyKey(bytes.fromhex(public_key)).verify(self.message(), bytes.fromhex(self.signature))
        except (BadSignatureError, CryptoError, ValueError):
            return False
        return True

    def anchor_line(self) -> str:
        at = self.signed_at.isoformat().replace("+00:00", "Z")
        return (
            f"{_ANCHOR} n={self.n} seq={self.seq} hash={self.hash} at={at} "
            f"prev={self.prev or '-'} key={self.public_key} sig={self.signature}"
        )


def parse_anchor(line: str) -> SignedCheckpoint:
    """Parse an anchor line printed by ``tailledger log anchor``.

    Raises:
        ValueError: not an anchor line.
    """
    parts = line.split()
    if not parts or parts[0] != _ANCHOR:
        raise ValueError(f"not a {_ANCHOR} line")
    fields = dict(p.partition("=")[::2] for p in parts[1:])
    try:
        at = datetime.fromisoformat(fields["at"].replace("Z", "+00:00"))
        prev = fields["prev"]
        return SignedCheckpoint(
            n=int(fields["n"]), seq=int(fields["seq"]), hash=fields["hash"],
            signed_at_us=to_micros(at), prev="" if prev == "-" else prev,
            public_key=fields["key"], signature=fields["sig"],
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"malformed anchor line: {exc}") from None


def parse_public_key(text: str) -> str:
    """A public key as 64 lower-case hex digits.

    Raises:
        ValueError: not an Ed25519 public key in hex.
    """
    text = text.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError("an Ed25519 public key is 64 hexadecimal digits")
    return text


class Signer:
    """Signs heads with one Ed25519 key."""

    def __init__(self, key: SigningKey) -> None:
        self._key = key
        self.public_key = key.verify_key.encode().hex()
        self._seed = bytes(key)

    @classmethod
    def generate(cls) -> Signer:
        return cls(SigningKey.generate())

    def sign(
        self, *, n: int, seq: int, hash: str, at: datetime, prev: str
    ) -> SignedCheckpoint:
        at_us = to_micros(at)
        message = _encoder.encode([_DOMAIN, n, seq, hash, at_us, prev])
        signature = self._key.sign(message).signature.hex()
        return SignedCheckpoint(
            n=n, seq=seq, hash=hash, signed_at_us=at_us, prev=prev,
            public_key=self.public_key, signature=signature,
        )

    def mac_key(self) -> bytes:
        return derive_mac_key(self._seed)


def derive_mac_key(seed: bytes) -> bytes:
    """The key authenticating projection checkpoints, derived from the signing key."""
    return hmac.new(seed, b"tailledger projection checkpoint MAC/1", hashlib.sha256).digest()


def load_signing_key(path: Path) -> Signer:
    """Read the signing key at ``path`` (64 hex digits of the Ed25519 seed).

    Raises:
        OSError: unreadable.
        ValueError: not a key.
    """
    text = path.read_text().strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise ValueError(f"{path} does not hold an Ed25519 signing key (64 hexadecimal digits)")
    return Signer(SigningKey(seed))


def load_or_create_signing_key(path: Path) -> tuple[Signer, bool]:
    """The signing key at ``path``, generated (0600, directory 0700) when absent.

    Returns the signer and whether it was created now.

    Raises:
        OSError: the file cannot be read or created.
        ValueError: the file exists but holds no key.
    """
    if path.exists():
        return load_signing_key(path), False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bytes(key).hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return Signer(key), True


def anchor_path(key_path: Path, log_path: Path) -> Path:
    """Where the newest anchor line of the log at ``log_path`` is kept: beside the
    signing key, one file per log (several servers may share a key)."""
    which = hashlib.sha256(str(log_path.resolve()).encode()).hexdigest()[:12]
    return key_path.with_name(f"{key_path.name}.{which}.anchor")


def write_anchor(target: Path, checkpoint: SignedCheckpoint) -> None:
    """Replace the anchor file ``target`` with ``checkpoint`` (atomically)."""
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(checkpoint.anchor_line() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def read_anchor(path: Path) -> SignedCheckpoint | None:
    """The anchor kept in ``path`` (see :func:`anchor_path`), if there is a readable one."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return parse_anchor(text)
    except ValueError:
        return None
