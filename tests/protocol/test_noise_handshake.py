"""Noise IK handshake: cacophony vector, Tailscale framing, tampering.

Oracles: the cacophony vector (hex copied from mcginty/snow
``tests/vectors/cacophony.txt``, protocol ``Noise_IK_25519_ChaChaPoly_BLAKE2s``)
and :mod:`tests.protocol.noise_reference`, an independent IK written from the
spec in this test package.
"""

from __future__ import annotations

import struct

import pytest

from protocol.errors import HandshakeError, LocalProtocolError
from protocol.noise import handshake, messages
from protocol.noise.handshake import ClientHandshake, SymmetricState, prologue, public_key, respond

from . import noise_reference as ref

# -- the cacophony vector ------------------------------------------------------

CACO_PROLOGUE = bytes.fromhex("4a6f686e2047616c74")  # "John Galt"
CACO_INIT_STATIC = bytes.fromhex("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1")
CACO_INIT_EPHEMERAL = bytes.fromhex(
    "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a"
)
CACO_INIT_REMOTE_STATIC = bytes.fromhex(
    "31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62"
)
CACO_RESP_STATIC = bytes.fromhex("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893")
CACO_RESP_EPHEMERAL = bytes.fromhex(
    "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b"
)
CACO_HANDSHAKE_HASH = bytes.fromhex(
    "48f3cb8bc9319da4ba1e9933991b1c4ed4034f1f126a76d3a1fbcfd7f94248d4"
)
CACO_MESSAGES = [
    (
        "4c756477696720766f6e204d69736573",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79440b03ddc7aac5123d06a1b2"
        "3b71670e32e76c28239a7ca4ac8f784de7e44c1adbfc6e83fef7352a58d9d56157400c0a737b1d171ce368"
        "229c7b752ac25b8faf4eca690f6d896f543be02c996ab2b86b76",
    ),
    (
        "4d757272617920526f746862617264",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843d9b5a8927f0ac9655ef768"
        "33bc7e5561f42e691ac8404efd6fbd6308b6a27c",
    ),
    ("462e20412e20486179656b", "2c256ed08fcd08c2980f954ee4beaccb61c9581340f5dd2fd1cf3b"),
    ("4361726c204d656e676572", "d6033f70eee20945c7c9dba304e397ee3b284ff5e00fd9efb095d3"),
    (
        "4a65616e2d426170746973746520536179",
        "a9c068ca5d8babf72560652d8e851adbfac35c8a66e810d560863173e96adf4cfe",
    ),
    (
        "457567656e2042f6686d20766f6e2042617765726b",
        "2a09d8f459e5927e40fdd2eddc99bdafb04e13a26f145cb5cfe9e6ba34c94331ebc17d5156",
    ),
]


def _caco(index: int) -> tuple[bytes, bytes]:
    payload, ciphertext = CACO_MESSAGES[index]
    return bytes.fromhex(payload), bytes.fromhex(ciphertext)


def test_reference_reproduces_cacophony_vector() -> None:
    """The oracle itself is right: it yields every byte of the vector."""
    assert ref.pub(CACO_RESP_STATIC) == CACO_INIT_REMOTE_STATIC
    init = ref.IKInitiator(
        s=CACO_INIT_STATIC,
        e=CACO_INIT_EPHEMERAL,
        rs=CACO_INIT_REMOTE_STATIC,
        prologue=CACO_PROLOGUE,
    )
    resp = ref.IKResponder(s=CACO_RESP_STATIC, e=CACO_RESP_EPHEMERAL, prologue=CACO_PROLOGUE)
    payload, expected = _caco(0)
    msg1 = init.write_message_1(payload)
    assert msg1 == expected
    assert resp.read_message_1(msg1) == payload
    payload, expected = _caco(1)
    msg2, r_send, r_recv = resp.write_message_2(payload)
    assert msg2 == expected
    got, i_send, i_recv = init.read_message_2(msg2)
    assert got == payload
    assert init.ss.h == resp.ss.h == CACO_HANDSHAKE_HASH
    # Transport messages alternate initiator, responder, initiator, ...
    for index in range(2, 6):
        payload, expected = _caco(index)
        sender, receiver = (i_send, r_recv) if index % 2 == 0 else (r_send, i_recv)
        ciphertext = sender.encrypt_with_ad(b"", payload)
        assert ciphertext == expected
        assert receiver.decrypt_with_ad(b"", ciphertext) == payload


def test_symmetric_state_replays_cacophony_handshake() -> None:
    """Drive our SymmetricState through the IK token sequence of the vector."""
    # Initiator side, message 1: e, es, s, ss + payload.
    s = SymmetricState()
    s.mix_hash(CACO_PROLOGUE)
    s.mix_hash(CACO_INIT_REMOTE_STATIC)
    e_pub = public_key(CACO_INIT_EPHEMERAL)
    s.mix_hash(e_pub)
    key = s.mix_dh(CACO_INIT_EPHEMERAL, CACO_INIT_REMOTE_STATIC)
    sealed_s = s.encrypt_and_hash(key, public_key(CACO_INIT_STATIC))
    key = s.mix_dh(CACO_INIT_STATIC, CACO_INIT_REMOTE_STATIC)
    payload, expected = _caco(0)
    assert e_pub + sealed_s + s.encrypt_and_hash(key, payload) == expected
    # Message 2 as the initiator reads it: e, ee, se + payload.
    payload, msg2 = _caco(1)
    s.mix_hash(msg2[:32])
    s.mix_dh(CACO_INIT_EPHEMERAL, msg2[:32])
    key = s.mix_dh(CACO_INIT_STATIC, msg2[:32])
    assert s.decrypt_and_hash(key, msg2[32:]) == payload
    assert s.h == CACO_HANDSHAKE_HASH
    k1, k2 = s.split()
    ref_send, ref_recv = ref.CipherState("little"), ref.CipherState("little")
    ref_send.initialize_key(k1)
    ref_recv.initialize_key(k2)
    payload, expected = _caco(2)
    assert ref_send.encrypt_with_ad(b"", payload) == expected
    payload, expected = _caco(3)
    assert ref_recv.decrypt_with_ad(b"", expected) == payload
    with pytest.raises(LocalProtocolError):
        s.mix_hash(b"after split")


# -- Tailscale-shaped messages ---------------------------------------------------

MACHINE = bytes(range(1, 33))
SERVER = bytes(range(101, 133))
CLIENT_EPH = bytes(range(201, 233))
SERVER_EPH = bytes(range(33, 65))


def _reference_tailscale(version: int) -> tuple[bytes, bytes, ref.IKInitiator]:
    """Reference bytes of a Tailscale handshake (empty payloads, framed)."""
    init = ref.IKInitiator(
        s=MACHINE,
        e=CLIENT_EPH,
        rs=ref.pub(SERVER),
        prologue=b"Tailscale Control Protocol v%d" % version,
        order="big",
    )
    body1 = init.write_message_1(b"")
    msg1 = struct.pack(">HBH", version, 1, len(body1)) + body1
    resp = ref.IKResponder(
        s=SERVER, e=SERVER_EPH, prologue=b"Tailscale Control Protocol v%d" % version, order="big"
    )
    resp.read_message_1(body1)
    body2, _, _ = resp.write_message_2(b"")
    msg2 = struct.pack(">BH", 2, len(body2)) + body2
    return msg1, msg2, init


@pytest.mark.parametrize("version", [130, 145, 1, 65535])
def test_client_initiation_matches_reference(version: int) -> None:
    msg1, _, _ = _reference_tailscale(version)
    client = ClientHandshake(MACHINE, public_key(SERVER), version, ephemeral_private=CLIENT_EPH)
    assert len(client.initiation) == 101
    assert client.initiation == msg1
    assert client.initiation[:5] == struct.pack(">HBH", version, 1, 96)


@pytest.mark.parametrize("version", [130, 145])
def test_server_response_matches_reference_and_keys_agree(version: int) -> None:
    msg1, msg2, init = _reference_tailscale(version)
    response, server_keys = respond(SERVER, msg1, ephemeral_private=SERVER_EPH)
    assert len(response) == 51
    assert response == msg2
    assert server_keys.peer_static == public_key(MACHINE)
    assert server_keys.version == version
    # The reference initiator accepts it and derives the same transport keys.
    _, ref_send, ref_recv = init.read_message_2(msg2[3:])
    assert ref_send.k == server_keys.receive_key
    assert ref_recv.k == server_keys.send_key
    assert init.ss.h == server_keys.handshake_hash


def test_client_and_server_round_trip_with_random_keys() -> None:
    machine = handshake.generate_private_key()
    server = handshake.generate_private_key()
    client = ClientHandshake(machine, public_key(server), 130)
    response, server_keys = respond(server, client.initiation)
    client_keys = client.finish(response)
    assert client_keys.send_key == server_keys.receive_key
    assert client_keys.receive_key == server_keys.send_key
    assert client_keys.handshake_hash == server_keys.handshake_hash
    assert server_keys.peer_static == public_key(machine)
    assert client_keys.peer_static == public_key(server)
    with pytest.raises(LocalProtocolError):
        client.finish(response)


def test_prologue_text() -> None:
    assert prologue(130) == b"Tailscale Control Protocol v130"


@pytest.mark.parametrize("index", range(101))
def test_flipping_any_initiation_byte_fails(index: int) -> None:
    client = ClientHandshake(MACHINE, public_key(SERVER), 130, ephemeral_private=CLIENT_EPH)
    tampered = bytearray(client.initiation)
    tampered[index] ^= 0x01
    # Header bytes fail the type/length checks or change the prologue (version);
    # key and tag bytes fail authentication. Nothing may get through.
    with pytest.raises(HandshakeError):
        respond(SERVER, bytes(tampered))


@pytest.mark.parametrize("index", range(51))
def test_flipping_any_response_byte_fails(index: int) -> None:
    client = ClientHandshake(MACHINE, public_key(SERVER), 130, ephemeral_private=CLIENT_EPH)
    response, _ = respond(SERVER, client.initiation, ephemeral_private=SERVER_EPH)
    tampered = bytearray(response)
    tampered[index] ^= 0x80
    with pytest.raises(HandshakeError):
        client.finish(bytes(tampered))


def test_wrong_server_key_fails() -> None:
    client = ClientHandshake(MACHINE, public_key(SERVER), 130)
    with pytest.raises(HandshakeError, match="authentication"):
        respond(handshake.generate_private_key(), client.initiation)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "size"),
        (bytes(100), "size"),
        (bytes(102), "size"),
        (struct.pack(">HBH", 130, 2, 96) + bytes(96), "type"),
        (struct.pack(">HBH", 130, 1, 95) + bytes(96), "length"),
    ],
)
def test_malformed_initiation(data: bytes, reason: str) -> None:
    with pytest.raises(HandshakeError, match=reason):
        respond(SERVER, data)


def test_low_order_ephemeral_is_rejected() -> None:
    # An all-zero public key is a low-order point: X25519 yields all zeros.
    data = struct.pack(">HBH", 130, 1, 96) + bytes(96)
    with pytest.raises(HandshakeError, match="low-order"):
        respond(SERVER, data)


def test_malformed_response() -> None:
    client = ClientHandshake(MACHINE, public_key(SERVER), 130)
    with pytest.raises(HandshakeError, match="size"):
        client.finish(bytes(50))


def test_error_message_layout() -> None:
    assert messages.encode_error("nope") == b"\x03\x00\x04nope"
    assert messages.parse_record_header(b"\x03\x00\x04") == (3, 4)
