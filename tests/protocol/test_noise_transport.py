"""Noise transport records: big-endian nonce, framing limits, sticky errors."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.noise.handshake import SessionKeys
from protocol.noise.transport import ChannelState, NoiseTransport

from . import noise_reference as ref

K1 = bytes(range(32))  # client -> server
K2 = bytes(range(32, 64))  # server -> client


def _pair() -> tuple[NoiseTransport, NoiseTransport]:
    client = NoiseTransport(SessionKeys(K1, K2, b"h" * 32, b"s" * 32, 130))
    server = NoiseTransport(SessionKeys(K2, K1, b"h" * 32, b"m" * 32, 130))
    return client, server


def _ref_record(key: bytes, counter: int, plaintext: bytes, order: ref.NonceOrder) -> bytes:
    """A record built straight from the primitives: header + AEAD(nonce)."""
    sealed = ChaCha20Poly1305(key).encrypt(ref.nonce_bytes(counter, order), plaintext, None)
    return struct.pack(">BH", 4, len(sealed)) + sealed


def test_second_record_uses_big_endian_nonce() -> None:
    client, _ = _pair()
    first = client.send(b"first")
    second = client.send(b"second")
    assert first == _ref_record(K1, 0, b"first", "big")
    assert second == _ref_record(K1, 1, b"second", "big")
    # Standard (little-endian) Noise would differ from record 2 on.
    assert first == _ref_record(K1, 0, b"first", "little")
    assert second != _ref_record(K1, 1, b"second", "little")


def test_receiver_rejects_little_endian_second_record() -> None:
    _, server = _pair()
    assert server.receive_data(_ref_record(K1, 0, b"a", "little")) == b"a"
    with pytest.raises(RemoteProtocolError, match="authentication"):
        server.receive_data(_ref_record(K1, 1, b"b", "little"))


def test_receiver_accepts_big_endian_records_from_reference() -> None:
    _, server = _pair()
    wire = b"".join(_ref_record(K1, n, b"rec%d" % n, "big") for n in range(300))
    assert server.receive_data(wire) == b"".join(b"rec%d" % n for n in range(300))


def test_large_write_is_split_at_4077_bytes() -> None:
    client, server = _pair()
    payload = os.urandom(4077 * 2 + 10)
    wire = client.send(payload)
    sizes = []
    pos = 0
    while pos < len(wire):
        assert wire[pos] == 4
        (length,) = struct.unpack_from(">H", wire, pos + 1)
        sizes.append(3 + length)
        pos += 3 + length
    assert sizes == [4096, 4096, 3 + 10 + 16]
    assert server.receive_data(wire) == payload


def test_byte_by_byte_delivery() -> None:
    client, server = _pair()
    wire = client.send(b"hello") + client.send(b"world")
    received = b"".join(server.receive_data(wire[i : i + 1]) for i in range(len(wire)))
    assert received == b"helloworld"


def test_zero_length_records_are_skipped() -> None:
    client, server = _pair()
    wire = client.seal_record(b"") + client.send(b"x") + client.seal_record(b"")
    assert len(wire) == 3 * (3 + 16) + 1
    assert server.receive_data(wire) == b"x"
    assert server.receive_data(client.seal_record(b"")) == b""
    assert server.receive_data(client.send(b"y")) == b"y"  # nonces stayed in step
    assert client.send(b"") == b""  # writers never emit empty records themselves


def test_oversized_length_rejected_from_header_alone() -> None:
    _, server = _pair()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        server.receive_data(b"\x04\x0f\xfe")  # 3 + 4094 > 4096
    assert server.receive_state is ChannelState.ERROR


def test_max_size_record_is_accepted() -> None:
    client, server = _pair()
    record = client.seal_record(b"z" * 4077)
    assert len(record) == 4096
    assert server.receive_data(record) == b"z" * 4077
    with pytest.raises(ValueError, match="too large"):
        client.seal_record(b"z" * 4078)


@pytest.mark.parametrize("msg_type", [0, 1, 2, 3, 5, 255])
def test_wrong_message_type_after_handshake(msg_type: int) -> None:
    _, server = _pair()
    with pytest.raises(RemoteProtocolError, match="unexpected type"):
        server.receive_data(bytes([msg_type]) + b"\x00\x10" + bytes(16))


def test_record_shorter_than_tag() -> None:
    _, server = _pair()
    with pytest.raises(RemoteProtocolError, match="shorter"):
        server.receive_data(b"\x04\x00\x0f" + bytes(15))


@pytest.mark.parametrize("flip", [3, 4, 10, -1])
def test_tampered_record_fails_and_error_is_sticky(flip: int) -> None:
    client, server = _pair()
    record = bytearray(client.send(b"payload"))
    record[flip] ^= 0x40
    with pytest.raises(RemoteProtocolError, match="authentication"):
        server.receive_data(bytes(record))
    # Sticky: even a valid next record is refused.
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        server.receive_data(client.send(b"valid"))


def test_truncated_record_waits_for_more() -> None:
    client, server = _pair()
    record = client.send(b"abcdef")
    assert server.receive_data(record[:-1]) == b""
    assert server.receive_data(record[-1:]) == b"abcdef"


def test_send_failed_poisons_sending() -> None:
    client, _ = _pair()
    client.send_failed()
    assert client.send_state is ChannelState.ERROR
    with pytest.raises(LocalProtocolError, match="previous write failed"):
        client.send(b"x")


def test_close_refuses_further_use() -> None:
    client, _ = _pair()
    client.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        client.send(b"x")
    with pytest.raises(LocalProtocolError, match="closed"):
        client.receive_data(b"")


def test_nonce_exhaustion() -> None:
    keys = SessionKeys(K1, K2, b"", b"", 1)
    client = NoiseTransport(keys, send_counter=2**64 - 2)
    server = NoiseTransport(SessionKeys(K2, K1, b"", b"", 1), receive_counter=2**64 - 2)
    assert server.receive_data(client.send(b"last")) == b"last"
    with pytest.raises(LocalProtocolError, match="exhausted"):
        client.send(b"one too many")
    with pytest.raises(RemoteProtocolError, match="exhausted"):
        server.receive_data(_ref_record(K1, 2**64 - 1, b"x", "big"))


@given(st.binary(max_size=9000))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    _, server = _pair()
    with contextlib.suppress(ProtocolError):
        server.receive_data(data)


@given(st.lists(st.binary(min_size=0, max_size=5000), max_size=8), st.data())
def test_any_segmentation_round_trips(chunks: list[bytes], data: st.DataObject) -> None:
    client, server = _pair()
    wire = b"".join(client.send(c) for c in chunks)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    assert b"".join(server.receive_data(p) for p in pieces) == b"".join(chunks)
