"""STUN: RFC 5769 test vectors, hand-built datagrams, fuzzing, and a real UDP server on loopback."""

from __future__ import annotations

import contextlib
import socket
import struct
import zlib

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from relay import stun
from relay.errors import (
    BadFingerprintError,
    MalformedAttributesError,
    NotBindingRequestError,
    NotStunError,
    StunError,
)
from relay.serve import serve_stun
from tests.support.waits import wait_until


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 §2.1: sample request (SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
# MESSAGE-INTEGRITY, FINGERPRINT).  Transcribed from the RFC.
RFC5769_REQUEST = h(
    """
    00 01 00 58  21 12 a4 42  b7 e7 a7 01  bc 34 d6 86  fa 87 df ae
    80 22 00 10  53 54 55 4e  20 74 65 73  74 20 63 6c  69 65 6e 74
    00 24 00 04  6e 00 01 ff
    80 29 00 08  93 2f f9 b1  51 26 3b 36
    00 06 00 09  65 76 74 6a  3a 68 36 76  59 20 20 20
    00 08 00 14  9a ea a7 0c  bf d8 cb 56  78 1e f2 b5  b2 d3 f2 49  c1 b5 71 a2
    80 28 00 04  e5 7a 3b cf
    """
)
# RFC 5769 §2.2: sample IPv4 response, mapped address 192.0.2.1:32853.
RFC5769_RESPONSE_V4 = h(
    """
    01 01 00 3c  21 12 a4 42  b7 e7 a7 01  bc 34 d6 86  fa 87 df ae
    80 22 00 0b  74 65 73 74  20 76 65 63  74 6f 72 20
    00 20 00 08  00 01 a1 47  e1 12 a6 43
    00 08 00 14  2b 91 f5 99  fd 9e 90 c3  8c 74 89 f9  2a f9 ba 53  f0 6b e7 d7
    80 28 00 04  c0 7d 4c 96
    """
)
# RFC 5769 §2.3: sample IPv6 response, 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
RFC5769_RESPONSE_V6 = h(
    """
    01 01 00 48  21 12 a4 42  b7 e7 a7 01  bc 34 d6 86  fa 87 df ae
    80 22 00 0b  74 65 73 74  20 76 65 63  74 6f 72 20
    00 20 00 14  00 02 a1 47  01 13 a9 fa  a5 d3 f1 79  bc 25 f4 b5  be d2 b9 d9
    00 08 00 14  a3 82 95 4e  4b e6 7b f1  17 84 c9 7c  82 92 c2 75  bf e3 ed 41
    80 28 00 04  c8 fb 0b 4c
    """
)
RFC_TXID = h("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")


def test_rfc5769_request_parses_and_its_fingerprint_checks() -> None:
    assert stun.parse_binding_request(RFC5769_REQUEST) == RFC_TXID


def test_rfc5769_responses() -> None:
    assert stun.parse_binding_response(RFC5769_RESPONSE_V4) == (RFC_TXID, "192.0.2.1", 32853)
    assert stun.parse_binding_response(RFC5769_RESPONSE_V6) == (
        RFC_TXID,
        "2001:db8:1234:5678:11:2233:4455:6677",
        32853,
    )


def test_our_xor_mapped_address_matches_the_rfc_bytes() -> None:
    v4 = stun.binding_response(RFC_TXID, "192.0.2.1", 32853, with_fingerprint=False)
    assert h("00 20 00 08 00 01 a1 47 e1 12 a6 43") in v4
    v6 = stun.binding_response(RFC_TXID, "2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert h("00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9") in v6


def test_response_bytes_built_by_hand() -> None:
    txid = bytes(range(12))
    # header: success, length 12 (XOR-MAPPED-ADDRESS attr of 8 + 4), cookie, txid
    body = (
        h("00 20 00 08 00 01")
        + struct.pack(">H", 3478 ^ 0x2112)
        + bytes(a ^ b for a, b in zip(bytes([127, 0, 0, 1]), h("21 12 a4 42"), strict=True))
    )
    expected = h("01 01 00 0c 21 12 a4 42") + txid + body
    assert stun.binding_response(txid, "127.0.0.1", 3478, with_fingerprint=False) == expected
    with_fp = stun.binding_response(txid, "127.0.0.1", 3478)
    prefix = h("01 01 00 14 21 12 a4 42") + txid + body  # length now counts FINGERPRINT
    crc = (zlib.crc32(prefix) ^ 0x5354554E) & 0xFFFFFFFF
    assert with_fp == prefix + h("80 28 00 04") + struct.pack(">I", crc)


def test_v4_mapped_client_address_is_reported_as_ipv4() -> None:
    txid = bytes(12)
    a = stun.binding_response(txid, "::ffff:192.0.2.9", 5)
    assert stun.parse_binding_response(a) == (txid, "192.0.2.9", 5)


def test_tailscale_style_request_round_trip() -> None:
    txid = stun.new_transaction_id(lambda n: b"\x5a" * n)
    req = stun.binding_request(txid)
    # 20-byte header + SOFTWARE "tailnode" (4 + 8) + FINGERPRINT (8)
    assert len(req) == 40
    assert req[:4] == h("00 01 00 14")
    assert req[20:32] == h("80 22 00 08") + b"tailnode"
    assert stun.parse_binding_request(req) == txid


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param(b"", NotStunError, id="empty"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\nxxxxxxxx", NotStunError, id="http"),
        pytest.param(flip(RFC5769_REQUEST, 4), NotStunError, id="bad-cookie"),
        pytest.param(b"\xc0" + RFC5769_REQUEST[1:], NotStunError, id="top-bits"),
        pytest.param(RFC5769_RESPONSE_V4, NotBindingRequestError, id="response-not-request"),
        pytest.param(flip(RFC5769_REQUEST, 30), BadFingerprintError, id="tampered-body"),
        pytest.param(
            flip(RFC5769_REQUEST, len(RFC5769_REQUEST) - 1), BadFingerprintError, id="tampered-crc"
        ),
        pytest.param(RFC5769_REQUEST[:-4], MalformedAttributesError, id="truncated"),
        pytest.param(RFC5769_REQUEST + b"\x00" * 4, MalformedAttributesError, id="trailing"),
        pytest.param(
            h("00 01 00 08 21 12 a4 42") + bytes(12) + h("80 22 00 09 61 62 63 64"),
            MalformedAttributesError,
            id="attr-past-end",
        ),
    ],
)
def test_bad_requests_raise_sentinels(data: bytes, error: type[StunError]) -> None:
    with pytest.raises(error):
        stun.parse_binding_request(data)


def test_fingerprint_must_be_last() -> None:
    req = stun.binding_request(bytes(12), software=None)  # header + FINGERPRINT only
    moved = h("00 01 00 14") + req[4:20] + req[20:28] + h("80 22 00 04") + b"late"
    with pytest.raises(MalformedAttributesError):
        stun.parse_binding_request(moved)


def test_request_without_fingerprint_or_software_is_accepted() -> None:
    bare = h("00 01 00 00 21 12 a4 42") + bytes(range(12))
    assert stun.parse_binding_request(bare) == bytes(range(12))


@given(st.binary(max_size=128))
def test_parser_only_raises_sentinels(data: bytes) -> None:
    try:
        txid = stun.parse_binding_request(data)
    except StunError:
        return
    assert len(txid) == 12


@given(
    st.binary(min_size=12, max_size=12),
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(min_value=0, max_value=65535),
)
def test_response_round_trip(txid: bytes, ip: object, port: int) -> None:
    text = str(ip)
    got = stun.parse_binding_response(stun.binding_response(txid, text, port))
    expected_ip = text
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        expected_ip = str(mapped)
    assert got == (txid, expected_ip, port)


@given(st.binary(min_size=20, max_size=80), st.integers(min_value=0, max_value=79))
def test_mutated_valid_request_never_crashes(prefix: bytes, index: int) -> None:
    req = stun.binding_request(prefix[:12].ljust(12, b"\x00"))
    mutated = flip(req, index % len(req))
    with contextlib.suppress(StunError):
        stun.parse_binding_request(mutated)


# -- over real UDP on loopback ---------------------------------------------------


async def test_stun_server_answers_with_the_mapped_address() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_stun, "127.0.0.1", 0)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            my_port = sock.getsockname()[1]
            await sock.sendto(b"definitely not stun", ("127.0.0.1", server.port))
            await sock.sendto(flip(RFC5769_REQUEST, 30), ("127.0.0.1", server.port))
            txid = stun.new_transaction_id()
            await sock.sendto(stun.binding_request(txid), ("127.0.0.1", server.port))
            with trio.fail_after(5):
                reply, _ = await sock.recvfrom(2048)
        assert stun.parse_binding_response(reply) == (txid, "127.0.0.1", my_port)
        await wait_until(lambda: server.stats().responses == 1)
        stats = server.stats()
        assert (stats.requests, stats.responses, stats.not_stun, stats.malformed) == (1, 1, 1, 1)
        nursery.cancel_scope.cancel()


async def test_stun_server_on_all_families() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_stun, None, 0)
        families = {socket.AF_INET}
        if any(":" in host for host, _ in server.addresses):
            families.add(socket.AF_INET6)
        for family in families:
            loop = "127.0.0.1" if family == socket.AF_INET else "::1"
            sock = trio.socket.socket(family, socket.SOCK_DGRAM)
            with sock:
                await sock.bind((loop, 0))
                txid = stun.new_transaction_id()
                await sock.sendto(stun.binding_request(txid), (loop, server.port))
                with trio.fail_after(5):
                    reply, _ = await sock.recvfrom(2048)
                assert stun.parse_binding_response(reply) == (txid, loop, sock.getsockname()[1])
        nursery.cancel_scope.cancel()
