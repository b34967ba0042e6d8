"""Noise transport records of the Tailscale control protocol (sans-I/O).

Role in the pipeline: after the handshake, every byte in both directions is
carried in records of type ``0x04`` (layout in :mod:`protocol.noise.messages`).
:class:`NoiseTransport` turns incoming wire bytes into plaintext and outgoing
plaintext into wire bytes; the layers above (early payload, HTTP/2) see one
continuous byte stream and ignore record boundaries.

The big gotcha (docs/control-protocol.md §4.3): the 12-byte ChaCha20-Poly1305 nonce
is ``4 zero bytes || 64-bit counter`` in **big-endian** order, where standard
Noise says little-endian. Counter 0 encodes identically either way, so an
off-the-shelf Noise library works for exactly one record per direction and then
fails authentication. ``_nonce`` below is the one place that encodes it.

Limits (TS:control/controlbase/conn.go):

==========================  =====  ==========================================
name                        value  meaning
==========================  =====  ==========================================
``MAX_MESSAGE_SIZE``         4096  a record on the wire, 3-byte header included
``MAX_CIPHERTEXT_SIZE``      4093  a larger length field is rejected at once
``MAX_PLAINTEXT_SIZE``       4077  writers split larger writes at this size
``MIN_RECORD_CIPHERTEXT``      16  a tag only: an empty record, legal, skipped
==========================  =====  ==========================================

Each direction is a tiny enum-table state machine (style rule 15): a failed
decryption, a malformed header, a failed write (:meth:`NoiseTransport.send_failed`)
or an exhausted nonce moves it to ``ERROR`` for good. Nothing is retried: once
a record failed, the peers are out of sync and the connection must be replaced.

Memory: a transport lives as long as its node stays connected, mostly idle.
A ``ChaCha20Poly1305`` object holds two OpenSSL cipher contexts, about
2.2 KiB of native memory (invisible to ``tracemalloc``), so keeping one per
direction would cost 4.4 KiB per idle node. A direction therefore keeps only
its 32-byte key and makes the cipher object once per :meth:`~NoiseTransport.receive_data`
or :meth:`~NoiseTransport.send` call that has records to process (about
2.5 µs, shared by every record of the call).
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from . import messages
from .handshake import SessionKeys

__all__ = ["ChannelInput", "ChannelState", "NoiseTransport"]

#: The counter value that may never be used (Go ``invalidNonce``).
_INVALID_COUNTER: Final = 2**64 - 1
_NONCE_PREFIX: Final = bytes(4)


def _nonce(counter: int) -> bytes:
    """Tailscale's transport nonce: 4 zero bytes, then the counter BIG-endian."""
    return _NONCE_PREFIX + counter.to_bytes(8, "big")


#: The header of a record carrying MAX_PLAINTEXT_SIZE bytes (most of a large body).
_FULL_RECORD_HEADER: Final = messages.encode_record_header(
    messages.MAX_PLAINTEXT_SIZE + messages.TAG_LEN
)


class ChannelState(Enum):
    """State of one direction (receive or send) of the transport."""

    OPEN = auto()
    ERROR = auto()  # sticky: a failure happened, every later use fails
    CLOSED = auto()  # closed locally


class ChannelInput(Enum):
    """What happened to a direction."""

    OK = auto()  # a record was sealed or opened
    FAILURE = auto()  # bad record, failed write, nonce exhausted
    CLOSE = auto()  # local close


#: (state, input) -> next state. A missing pair is an illegal use: the
#: direction is already dead and the original error is raised again.
_TRANSITIONS: Final[dict[tuple[ChannelState, ChannelInput], ChannelState]] = {
    (ChannelState.OPEN, ChannelInput.OK): ChannelState.OPEN,
    (ChannelState.OPEN, ChannelInput.FAILURE): ChannelState.ERROR,
    (ChannelState.OPEN, ChannelInput.CLOSE): ChannelState.CLOSED,
    (ChannelState.ERROR, ChannelInput.FAILURE): ChannelState.ERROR,
    (ChannelState.ERROR, ChannelInput.CLOSE): ChannelState.ERROR,
    (ChannelState.CLOSED, ChannelInput.FAILURE): ChannelState.CLOSED,
    (ChannelState.CLOSED, ChannelInput.CLOSE): ChannelState.CLOSED,
}


class _Channel:
    """One direction: key, counter, state and the sticky error."""

    __slots__ = ("counter", "error", "key", "state")

    def __init__(self, key: bytes, counter: int) -> None:
        # Only the key is kept; see "Memory" in the module docstring.
        ChaCha20Poly1305(key)  # validate it now (ValueError), as before
        self.key: bytes | None = key
        self.counter = counter
        self.state = ChannelState.OPEN
        self.error: ProtocolError | None = None

    def cipher(self) -> ChaCha20Poly1305:
        """A cipher object for this call's records (the channel must be OPEN)."""
        assert self.key is not None  # OPEN implies a live key
        return ChaCha20Poly1305(self.key)

    def advance(self, event: ChannelInput) -> None:
        """Apply ``event``; raise the sticky error if the pair is illegal."""
        next_state = _TRANSITIONS.get((self.state, event))
        if next_state is None:
            raise self.dead_error()
        self.state = next_state
        if next_state is not ChannelState.OPEN:
            # Drop the key material promptly (forward secrecy, like Go's Close).
            self.key = None

    def fail(self, error: ProtocolError) -> ProtocolError:
        """Record ``error`` as the sticky cause (first one wins) and return it."""
        if self.error is None:
            self.error = error
        self.advance(ChannelInput.FAILURE)
        return error

    def dead_error(self) -> ProtocolError:
        if self.state is ChannelState.CLOSED:
            return LocalProtocolError("noise transport is closed")
        cause = self.error.reason if self.error is not None else "unknown"
        if isinstance(self.error, RemoteProtocolError):
            return RemoteProtocolError(f"noise transport failed earlier: {cause}")
        return LocalProtocolError(f"noise transport failed earlier: {cause}")


class NoiseTransport:
    """Record layer of an established Noise session.

    Usage (either side)::

        transport = NoiseTransport(keys)
        plaintext = transport.receive_data(wire_bytes)   # may be b""
        wire = transport.send(plaintext)                  # any length

    Invariants:

    * ``receive_data`` returns plaintext in order and buffers partial records
      (at most one record, ``MAX_MESSAGE_SIZE`` bytes, plus whatever the caller
      fed beyond it).
    * A header is validated as soon as its 3 bytes arrive, so an oversized
      length field is rejected without waiting for 64 KiB of junk.
    * ``send`` never emits a record larger than ``MAX_MESSAGE_SIZE`` and never
      emits an empty record (``seal_record(b"")`` can, for tests).
    """

    __slots__ = ("_buffer", "_rx", "_tx", "keys")

    def __init__(
        self, keys: SessionKeys, *, send_counter: int = 0, receive_counter: int = 0
    ) -> None:
        """Create the transport from handshake output.

        Args:
            keys: From :func:`~protocol.noise.handshake.respond` or
                :meth:`~protocol.noise.handshake.ClientHandshake.finish`.
            send_counter: Initial nonce counter for sending (tests only).
            receive_counter: Initial nonce counter for receiving (tests only).
        """
        self.keys = keys
        self._tx = _Channel(keys.send_key, send_counter)
        self._rx = _Channel(keys.receive_key, receive_counter)
        self._buffer = bytearray()

    @property
    def receive_state(self) -> ChannelState:
        """State of the receive direction."""
        return self._rx.state

    @property
    def send_state(self) -> ChannelState:
        """State of the send direction."""
        return self._tx.state

    # -- receiving ----------------------------------------------------------

    def receive_data(self, data: bytes) -> bytes:
        """Feed wire bytes; return all plaintext completed by them.

        Returns:
            The concatenated plaintext of every complete record, ``b""`` if no
            record was completed (or only empty records were).

        Raises:
            RemoteProtocolError: Wrong record type, length field out of range,
                failed authentication, exhausted nonce. Sticky.
            LocalProtocolError: The transport was closed locally.
        """
        rx = self._rx
        if rx.state is not ChannelState.OPEN:
            raise rx.dead_error()
        buf = self._buffer
        buf += data
        end = len(buf)
        header_len = messages.HEADER_LEN
        if end < header_len:
            return b""
        # A full map is hundreds of records: the per-record work is inlined, one
        # cipher object serves the call, and each ciphertext is a view of the buffer
        # (no copy); the state moves once, after the last record.
        view = memoryview(buf)
        out: list[bytes] = []
        pos = 0
        counter = rx.counter
        decrypt = None  # made for the first complete record
        try:
            while end - pos >= header_len:
                msg_type = buf[pos]
                length = (buf[pos + 1] << 8) | buf[pos + 2]
                if msg_type != messages.MessageType.RECORD:
                    raise RemoteProtocolError(f"received message with unexpected type {msg_type}")
                if length > messages.MAX_CIPHERTEXT_SIZE:
                    raise RemoteProtocolError(f"record of {header_len + length} bytes exceeds max frame size")
                if length < messages.MIN_RECORD_CIPHERTEXT:
                    raise RemoteProtocolError(f"record of {length} bytes is shorter than a tag")
                start = pos + header_len
                if end - start < length:
                    break  # incomplete record: wait for more bytes
                if counter >= _INVALID_COUNTER:
                    raise RemoteProtocolError("cipher exhausted, no more nonces available")
                if decrypt is None:
                    decrypt = rx.cipher().decrypt
                try:
                    out.append(decrypt(_NONCE_PREFIX + counter.to_bytes(8, "big"), view[start : start + length], None))
                except InvalidTag:
                    raise RemoteProtocolError("record failed authentication") from None
                counter += 1
                pos = start + length
        except RemoteProtocolError as exc:
            view.release()
            rx.counter = counter
            raise rx.fail(exc) from None
        view.release()
        if counter != rx.counter:
            rx.counter = counter
            rx.advance(ChannelInput.OK)
        del buf[:pos]
        return out[0] if len(out) == 1 else b"".join(out)

    # -- sending --------------------------------------------------------------

    def seal_record(self, plaintext: bytes) -> bytes:
        """Seal exactly one record (header included) around ``plaintext``.

        Raises:
            ValueError: ``plaintext`` is longer than ``MAX_PLAINTEXT_SIZE``.
            LocalProtocolError: The send direction is closed, failed, or its
                nonce is exhausted.
        """
        tx = self._tx
        if tx.state is not ChannelState.OPEN:
            raise tx.dead_error()
        if len(plaintext) > messages.MAX_PLAINTEXT_SIZE:
            raise ValueError("plaintext too large for one record")
        return self._seal(tx.cipher(), plaintext)

    def _seal(self, aead: ChaCha20Poly1305, plaintext: bytes) -> bytes:
        """Seal one record of at most ``MAX_PLAINTEXT_SIZE`` bytes (channel OPEN)."""
        tx = self._tx
        if tx.state is not ChannelState.OPEN:
            raise tx.dead_error()
        if tx.counter >= _INVALID_COUNTER:
            raise tx.fail(LocalProtocolError("cipher exhausted, no more nonces available"))
        sealed = aead.encrypt(_nonce(tx.counter), plaintext, None)
        tx.counter += 1
        tx.advance(ChannelInput.OK)
        return messages.encode_record_header(len(sealed)) + sealed

    def send(self, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` into as many records as needed.

        Returns:
            The wire bytes (``b""`` for empty input).

        Raises:
            LocalProtocolError: As :meth:`seal_record`. Sticky.
        """
        if len(plaintext) <= messages.MAX_PLAINTEXT_SIZE:
            return self.seal_record(plaintext) if plaintext else b""
        tx = self._tx
        if tx.state is not ChannelState.OPEN:
            raise tx.dead_error()
        # A full map is hundreds of records: one cipher object for all of them, and
        # the per-record work inlined (the checks of _seal, done once for the call:
        # the counter cannot run out within one call unless it is near the end).
        step = messages.MAX_PLAINTEXT_SIZE
        records = -(-len(plaintext) // step)
        if tx.counter + records > _INVALID_COUNTER:
            raise tx.fail(LocalProtocolError("cipher exhausted, no more nonces available"))
        encrypt = tx.cipher().encrypt
        view = memoryview(plaintext)
        full_header = _FULL_RECORD_HEADER
        counter = tx.counter
        out: list[bytes] = []
        for i in range(0, len(plaintext), step):
            chunk = view[i : i + step]
            sealed = encrypt(_nonce(counter), chunk, None)
            counter += 1
            out.append(
                full_header if len(chunk) == step else messages.encode_record_header(len(sealed))
            )
            out.append(sealed)
        tx.counter = counter
        return b"".join(out)

    def send_failed(self) -> None:
        """Tell the transport that writing its output failed (poisons sending).

        Like Go's ``errPartialWrite``: a partially written record leaves the
        peer's nonce out of step, so no later write may be attempted.
        """
        tx = self._tx
        if tx.state is ChannelState.OPEN:
            tx.fail(LocalProtocolError("a previous write failed"))

    def close(self) -> None:
        """Close both directions locally and drop the key material."""
        self._tx.advance(ChannelInput.CLOSE)
        self._rx.advance(ChannelInput.CLOSE)
        self._buffer.clear()
