"""An independent, deliberately naive Noise IK for use as a test oracle.

Written from the Noise specification (revision 34, sections 4-5) directly on
the primitives, sharing no code with :mod:`protocol.noise`: HMAC is built by
hand from BLAKE2s, the cipher state keeps a real counter ``n`` and the nonce
encoding is a parameter. With ``nonce_order="little"`` it reproduces the
cacophony test vector (standard Noise); with ``"big"`` it produces what
Tailscale's controlbase puts on the wire.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

NonceOrder = Literal["little", "big"]

HASHLEN = 32
BLOCKLEN = 64


def blake2s(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """RFC 2104 HMAC over BLAKE2s (block size 64), written out by hand."""
    if len(key) > BLOCKLEN:
        key = blake2s(key)
    key = key.ljust(BLOCKLEN, b"\x00")
    inner = bytes(b ^ 0x36 for b in key)
    outer = bytes(b ^ 0x5C for b in key)
    return blake2s(outer + blake2s(inner + data))


def hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    temp_key = hmac_blake2s(chaining_key, ikm)
    out1 = hmac_blake2s(temp_key, b"\x01")
    out2 = hmac_blake2s(temp_key, out1 + b"\x02")
    result = [out1, out2]
    if outputs == 3:
        result.append(hmac_blake2s(temp_key, out2 + b"\x03"))
    return result


def dh(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )


def pub(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def nonce_bytes(n: int, order: NonceOrder) -> bytes:
    return b"\x00" * 4 + n.to_bytes(8, order)


@dataclass
class CipherState:
    order: NonceOrder
    k: bytes | None = None
    n: int = 0

    def initialize_key(self, key: bytes | None) -> None:
        self.k = key
        self.n = 0

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.k is None:
            return plaintext
        out = ChaCha20Poly1305(self.k).encrypt(nonce_bytes(self.n, self.order), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self.k is None:
            return ciphertext
        out = ChaCha20Poly1305(self.k).decrypt(nonce_bytes(self.n, self.order), ciphertext, ad)
        self.n += 1
        return out


@dataclass
class SymmetricState:
    order: NonceOrder
    protocol_name: bytes
    h: bytes = b""
    ck: bytes = b""
    cs: CipherState = field(init=False)

    def __post_init__(self) -> None:
        name = self.protocol_name
        self.h = name.ljust(HASHLEN, b"\x00") if len(name) <= HASHLEN else blake2s(name)
        self.ck = self.h
        self.cs = CipherState(self.order)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, ikm, 2)
        self.cs.initialize_key(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = blake2s(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = hkdf(self.ck, b"", 2)
        c1, c2 = CipherState(self.order), CipherState(self.order)
        c1.initialize_key(k1)
        c2.initialize_key(k2)
        return c1, c2


PROTOCOL = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"


@dataclass
class IKInitiator:
    """``IK`` initiator: knows the responder's static key in advance."""

    s: bytes
    e: bytes
    rs: bytes
    prologue: bytes
    order: NonceOrder = "little"

    def __post_init__(self) -> None:
        self.ss = SymmetricState(self.order, PROTOCOL)
        self.ss.mix_hash(self.prologue)
        self.ss.mix_hash(self.rs)  # <- s

    def write_message_1(self, payload: bytes) -> bytes:
        ss = self.ss
        out = pub(self.e)
        ss.mix_hash(out)  # e
        ss.mix_key(dh(self.e, self.rs))  # es
        out += ss.encrypt_and_hash(pub(self.s))  # s
        ss.mix_key(dh(self.s, self.rs))  # ss
        return out + ss.encrypt_and_hash(payload)

    def read_message_2(self, message: bytes) -> tuple[bytes, CipherState, CipherState]:
        ss = self.ss
        re = message[:32]
        ss.mix_hash(re)  # e
        ss.mix_key(dh(self.e, re))  # ee
        ss.mix_key(dh(self.s, re))  # se
        payload = ss.decrypt_and_hash(message[32:])
        send, receive = ss.split()
        return payload, send, receive


@dataclass
class IKResponder:
    s: bytes
    e: bytes
    prologue: bytes
    order: NonceOrder = "little"
    rs: bytes = b""

    def __post_init__(self) -> None:
        self.ss = SymmetricState(self.order, PROTOCOL)
        self.ss.mix_hash(self.prologue)
        self.ss.mix_hash(pub(self.s))  # <- s

    def read_message_1(self, message: bytes) -> bytes:
        ss = self.ss
        re = message[:32]
        ss.mix_hash(re)
        ss.mix_key(dh(self.s, re))  # es
        self.rs = ss.decrypt_and_hash(message[32:80])  # s
        ss.mix_key(dh(self.s, self.rs))  # ss
        self.re = re
        return ss.decrypt_and_hash(message[80:])

    def write_message_2(self, payload: bytes) -> tuple[bytes, CipherState, CipherState]:
        ss = self.ss
        out = pub(self.e)
        ss.mix_hash(out)
        ss.mix_key(dh(self.e, self.re))  # ee
        ss.mix_key(dh(self.e, self.rs))  # se
        out += ss.encrypt_and_hash(payload)
        receive, send = ss.split()
        return out, send, receive
