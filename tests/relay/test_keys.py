"""Keys and NaCl boxes: our layout matches crypto_box called directly (Go's SealTo layout)."""

from __future__ import annotations

import nacl.bindings
import pytest

from relay.errors import ConfigError, RemoteProtocolError
from relay.keys import (
    format_node_key,
    generate_private_key,
    open_sealed,
    parse_node_key,
    parse_private_key,
    public_key_of,
    seal_to,
)


def test_public_key_matches_scalarmult_base() -> None:
    priv = bytes(range(1, 33))
    assert public_key_of(priv) == nacl.bindings.crypto_scalarmult_base(priv)


def test_sealed_box_is_nonce_then_crypto_box() -> None:
    alice, bob = generate_private_key(), generate_private_key()
    sealed = seal_to(alice, public_key_of(bob), b'{"version":2}')
    nonce, box = sealed[:24], sealed[24:]
    # Go: box.Seal(nonce[:], msg, &nonce, peerPublic, ourPrivate) == nonce || box
    plain = nacl.bindings.crypto_box_open(box, nonce, public_key_of(alice), bob)
    assert plain == b'{"version":2}'
    assert len(sealed) == len(b'{"version":2}') + 24 + 16


def test_open_accepts_a_box_made_with_crypto_box() -> None:
    alice, bob = generate_private_key(), generate_private_key()
    nonce = b"\x07" * 24
    box = nacl.bindings.crypto_box(b"hello", nonce, public_key_of(bob), alice)
    assert open_sealed(bob, public_key_of(alice), nonce + box) == b"hello"


def test_open_rejects_wrong_key_tamper_and_short() -> None:
    alice, bob, eve = generate_private_key(), generate_private_key(), generate_private_key()
    sealed = seal_to(alice, public_key_of(bob), b"secret")
    with pytest.raises(RemoteProtocolError):
        open_sealed(bob, public_key_of(eve), sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(RemoteProtocolError):
        open_sealed(bob, public_key_of(alice), tampered)
    with pytest.raises(RemoteProtocolError):
        open_sealed(bob, public_key_of(alice), sealed[:39])


def test_text_forms() -> None:
    key = bytes(range(32))
    assert format_node_key(key) == "nodekey:" + key.hex()
    assert parse_node_key(format_node_key(key)) == key
    assert parse_node_key(key.hex()) == key
    assert parse_private_key("privkey:" + key.hex() + "\n") == key
    for bad in ("nodekey:zz", "nodekey:" + "00" * 31, ""):
        with pytest.raises(ConfigError):
            parse_node_key(bad)
