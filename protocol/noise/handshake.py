"""Noise IK handshake of the Tailscale control protocol (sans-I/O).

Role in the pipeline: turns the client's 101-byte initiation into the server's
51-byte response plus a pair of transport keys (server side), and builds the
initiation / consumes the response (client side). The resulting
:class:`SessionKeys` feed :class:`protocol.noise.transport.NoiseTransport`.

The instance is ``Noise_IK_25519_ChaChaPoly_BLAKE2s`` with empty payloads and
the prologue ``b"Tailscale Control Protocol v" + str(version)``
(TS:control/controlbase/handshake.go; docs/control-protocol.md §4.4)::

    IK:
      <- s
      ...
      -> e, es, s, ss          (initiation: client ephemeral, sealed machine key, tag)
      <- e, ee, se             (response: server ephemeral, tag)

Every handshake AEAD call uses a freshly derived key, so its nonce is always
twelve zero bytes; the nonce byte-order gotcha only bites the transport layer.

Invariants:

* The server learns the client's machine (static) key only here
  (:attr:`SessionKeys.peer_static`). Completing the handshake authenticates
  possession of that private key and authorises nothing.
* Randomness is injected: both sides accept an ``ephemeral_private`` argument,
  so that tests can reproduce vectors byte for byte (style rule 13). Without
  it a fresh key comes from the OS CSPRNG.
* Any peer-caused failure (bad sizes, bad tag, low-order point) raises
  :class:`~protocol.errors.HandshakeError`; nothing else escapes for peer input.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import HandshakeError, LocalProtocolError
from . import messages

__all__ = [
    "PROLOGUE_PREFIX",
    "PROTOCOL_NAME",
    "ClientHandshake",
    "Keypair",
    "SessionKeys",
    "SymmetricState",
    "generate_private_key",
    "prologue",
    "public_key",
    "respond",
]

#: The Noise protocol name; BLAKE2s of it is the initial ``h`` and ``ck``.
PROTOCOL_NAME: Final = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
#: Prologue prefix; the decimal protocol version follows, without NUL/newline.
PROLOGUE_PREFIX: Final = b"Tailscale Control Protocol v"

_ZERO_NONCE: Final = bytes(12)


def prologue(version: int) -> bytes:
    """Return the Noise prologue for ``version`` (e.g. ``...v130``)."""
    return PROLOGUE_PREFIX + str(version).encode("ascii")


def generate_private_key() -> bytes:
    """Return a fresh random X25519 private key (32 raw bytes)."""
    return X25519PrivateKey.generate().private_bytes_raw()


@dataclass(frozen=True, slots=True, eq=False)
class Keypair:
    """An X25519 private key object with its public half.

    Loading a raw private key costs as much as a DH (the library derives the
    public key), so long-lived keys -- the server's static key above all --
    are loaded once into a :class:`Keypair` and reused for every handshake.
    Every function here also accepts raw 32-byte private keys.
    """

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Keypair:
        """Load a raw 32-byte private key.

        Raises:
            ValueError: ``raw`` is not 32 bytes long.
        """
        private = X25519PrivateKey.from_private_bytes(raw)
        return cls(private, private.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> Keypair:
        """A fresh random key pair (the ephemeral keys of a handshake)."""
        private = X25519PrivateKey.generate()
        return cls(private, private.public_key().public_bytes_raw())


PrivateKey = bytes | Keypair


def _keypair(key: PrivateKey) -> Keypair:
    return key if isinstance(key, Keypair) else Keypair.from_private_bytes(key)


def public_key(private: bytes) -> bytes:
    """Return the X25519 public key of a 32-byte private key.

    Raises:
        ValueError: ``private`` is not 32 bytes long.
    """
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _hash(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    # BLAKE2s' block size is 64 bytes, which is what Noise's HMAC needs.
    return hmac.new(key, data, hashlib.blake2s).digest()


def _hkdf2(chaining_key: bytes, input_key_material: bytes) -> tuple[bytes, bytes]:
    """Noise HKDF with two outputs (Noise §4.3), = Go ``hkdf.New(blake2s, ikm, ck, nil)``."""
    prk = _hmac(chaining_key, input_key_material)
    out1 = _hmac(prk, b"\x01")
    out2 = _hmac(prk, out1 + b"\x02")
    return out1, out2


def _dh(private: Keypair, public: bytes) -> bytes:
    """X25519; a low-order peer point (all-zero result) aborts the handshake."""
    try:
        return private.private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        # cryptography raises ValueError("Error computing shared key.") for an
        # all-zero shared secret; Go's curve25519.X25519 errors likewise.
        raise HandshakeError("X25519 with a low-order point") from exc


class SymmetricState:
    """Noise ``SymmetricState`` restricted to what IK with one-shot keys needs.

    ``mix_dh`` returns the freshly derived cipher key instead of storing a
    ``CipherState``: in IK every derived handshake key encrypts or decrypts
    exactly one item, always with the all-zero nonce (TS handshake.go's
    ``singleUseCHP``). That keeps the object small and the misuse surface
    tiny. The class is generic enough to replay the cacophony IK vector
    (which carries payloads and another prologue) in the tests.

    Attributes:
        h: The running handshake hash.
        ck: The chaining key.
    """

    __slots__ = ("_finished", "ck", "h")

    def __init__(self, protocol_name: bytes = PROTOCOL_NAME) -> None:
        """Initialize with ``h = ck = HASH(protocol_name)`` (the name is > 32 bytes)."""
        self.h = _hash(protocol_name)
        self.ck = self.h
        self._finished = False

    def _check(self) -> None:
        if self._finished:
            raise LocalProtocolError("symmetric state used after split()")

    def mix_hash(self, data: bytes) -> None:
        """``h = HASH(h || data)``."""
        self._check()
        self.h = _hash(self.h + data)

    def mix_dh(self, private: PrivateKey, public: bytes) -> bytes:
        """``MixKey(DH(private, public))``; returns the new single-use cipher key.

        Raises:
            HandshakeError: The DH result is all-zero (low-order point).
        """
        self._check()
        self.ck, key = _hkdf2(self.ck, _dh(_keypair(private), public))
        return key

    def encrypt_and_hash(self, key: bytes, plaintext: bytes) -> bytes:
        """Seal ``plaintext`` with ``aad = h`` and mix the ciphertext into ``h``."""
        self._check()
        ciphertext = ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, key: bytes, ciphertext: bytes) -> bytes:
        """Open ``ciphertext`` with ``aad = h`` and mix it into ``h``.

        Raises:
            HandshakeError: Authentication failed.
        """
        self._check()
        try:
            plaintext = ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, ciphertext, self.h)
        except InvalidTag as exc:
            raise HandshakeError("handshake message failed authentication") from exc
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """Derive ``(k1, k2)``: k1 encrypts initiator->responder, k2 the reverse.

        The state is unusable afterwards (Go panics; we raise
        :class:`~protocol.errors.LocalProtocolError`).
        """
        self._check()
        self._finished = True
        return _hkdf2(self.ck, b"")


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Outcome of a completed handshake, for one side of the connection.

    Attributes:
        send_key: ChaCha20-Poly1305 key for records we send.
        receive_key: Key for records we receive.
        handshake_hash: Final ``h`` (Go's ``Conn.HandshakeHash``; nothing binds
            to it today, exposed for completeness).
        peer_static: The peer's static public key: the client's *machine key*
            on the server, the server's Noise key on the client.
        version: The protocol version from the initiation header.
    """

    send_key: bytes
    receive_key: bytes
    handshake_hash: bytes
    peer_static: bytes
    version: int


def respond(
    server_private: PrivateKey,
    initiation: bytes,
    *,
    ephemeral_private: bytes | None = None,
) -> tuple[bytes, SessionKeys]:
    """Run the responder side: consume the initiation, produce the response.

    Args:
        server_private: The server's long-term Noise private key (32 raw
            bytes, or better a reused :class:`Keypair`).
        initiation: The 101 bytes decoded from ``X-Tailscale-Handshake``.
        ephemeral_private: Inject the server ephemeral key (tests only).

    Returns:
        ``(response, keys)``: the 51-byte response to send raw after the 101
        headers, and the session keys (``peer_static`` = client machine key).

    Raises:
        HandshakeError: Malformed initiation or failed authentication. The
            caller may send :func:`~protocol.noise.messages.encode_error`.
    """
    init = messages.decode_initiation(initiation)
    server = _keypair(server_private)
    state = SymmetricState()
    state.mix_hash(prologue(init.version))
    state.mix_hash(server.public)  # <- s (pre-message)
    # -> e, es, s, ss
    state.mix_hash(init.ephemeral_public)
    key = state.mix_dh(server, init.ephemeral_public)  # es
    machine_key = state.decrypt_and_hash(key, init.sealed_machine_key)  # s
    key = state.mix_dh(server, machine_key)  # ss
    state.decrypt_and_hash(key, init.tag)  # empty payload: authenticates all of the above
    # <- e, ee, se
    eph = Keypair.generate() if ephemeral_private is None else _keypair(ephemeral_private)
    eph_public = eph.public
    state.mix_hash(eph_public)
    state.mix_dh(eph, init.ephemeral_public)  # ee: key unused (no payload here)
    key = state.mix_dh(eph, machine_key)  # se
    tag = state.encrypt_and_hash(key, b"")
    handshake_hash = state.h
    k1, k2 = state.split()
    keys = SessionKeys(
        send_key=k2,
        receive_key=k1,
        handshake_hash=handshake_hash,
        peer_static=machine_key,
        version=init.version,
    )
    return messages.encode_response(eph_public, tag), keys


class _ClientState(Enum):
    INITIATED = auto()
    DONE = auto()
    FAILED = auto()


class ClientHandshake:
    """Initiator side, split like Go's ``ClientDeferred``.

    The initiation is computed in the constructor (it rides in the HTTP
    upgrade request, saving a round trip); :meth:`finish` consumes the
    server's 51-byte response exactly once.

    Attributes:
        initiation: The 101-byte message to base64 into the upgrade request.
        version: The protocol version announced in it.
    """

    def __init__(
        self,
        machine_private: PrivateKey,
        server_public: bytes,
        version: int,
        *,
        ephemeral_private: bytes | None = None,
    ) -> None:
        """Build the initiation.

        Args:
            machine_private: Our long-term machine key (32 bytes or a :class:`Keypair`).
            server_public: The control server's Noise key from ``/key``.
            version: Capability version (130 for v1.90); mixed into the prologue.
            ephemeral_private: Inject the ephemeral key (tests only).

        Raises:
            ValueError: A key has the wrong length or the version is out of range.
            HandshakeError: ``server_public`` is a low-order point.
        """
        if len(server_public) != messages.KEY_LEN:
            raise ValueError("server public key must be 32 bytes")
        self.version = version
        self._machine = _keypair(machine_private)
        self._server_public = server_public
        self._ephemeral = (
            Keypair.generate() if ephemeral_private is None else _keypair(ephemeral_private)
        )
        self._state = SymmetricState()
        s = self._state
        s.mix_hash(prologue(version))
        s.mix_hash(server_public)  # <- s
        eph_public = self._ephemeral.public
        s.mix_hash(eph_public)  # -> e
        key = s.mix_dh(self._ephemeral, server_public)  # es
        sealed = s.encrypt_and_hash(key, self._machine.public)  # s
        key = s.mix_dh(self._machine, server_public)  # ss
        tag = s.encrypt_and_hash(key, b"")
        self.initiation = messages.encode_initiation(version, eph_public, sealed, tag)
        self._phase = _ClientState.INITIATED

    def finish(self, response: bytes) -> SessionKeys:
        """Consume the server's response and derive the session keys.

        Args:
            response: The 51 raw bytes that follow the HTTP 101 headers.

        Returns:
            Keys with ``peer_static`` = the server key we dialled.

        Raises:
            HandshakeError: Malformed response or failed authentication.
            LocalProtocolError: Called twice or after a failure.
        """
        if self._phase is not _ClientState.INITIATED:
            raise LocalProtocolError("client handshake already finished")
        self._phase = _ClientState.FAILED  # until proven otherwise
        resp = messages.decode_response(response)
        s = self._state
        s.mix_hash(resp.ephemeral_public)  # <- e
        s.mix_dh(self._ephemeral, resp.ephemeral_public)  # ee
        key = s.mix_dh(self._machine, resp.ephemeral_public)  # se
        s.decrypt_and_hash(key, resp.tag)
        handshake_hash = s.h
        k1, k2 = s.split()
        self._phase = _ClientState.DONE
        return SessionKeys(
            send_key=k1,
            receive_key=k2,
            handshake_hash=handshake_hash,
            peer_static=self._server_public,
            version=self.version,
        )
