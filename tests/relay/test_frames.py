"""DERP frame codec: golden bytes written from derp.go's layout table, round trips, decoder."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.derp import frames as f
from relay.errors import LocalProtocolError, RemoteProtocolError

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))


def hdr(ftype: int, length: int) -> bytes:
    """Frame header written out by hand: type byte, big-endian uint32 length."""
    return bytes(
        [ftype, length >> 24 & 0xFF, length >> 16 & 0xFF, length >> 8 & 0xFF, length & 0xFF]
    )


# (encoded by our code, expected bytes written from the protocol description)
GOLDEN = [
    pytest.param(
        f.encode_server_key(KEY_A),
        b"\x01\x00\x00\x00\x28" + b"\x44\x45\x52\x50\xf0\x9f\x94\x91" + KEY_A,
        id="server_key",
    ),
    pytest.param(
        f.encode_client_info(KEY_A, b"N" * 30), hdr(0x02, 62) + KEY_A + b"N" * 30, id="client_info"
    ),
    pytest.param(f.encode_server_info(b"S" * 40), hdr(0x03, 40) + b"S" * 40, id="server_info"),
    pytest.param(
        f.encode_send_packet(KEY_B, b"hello"),
        b"\x04\x00\x00\x00\x25" + KEY_B + b"hello",
        id="send_packet",
    ),
    pytest.param(
        f.encode_recv_packet(KEY_A, b"hi"),
        b"\x05\x00\x00\x00\x22" + KEY_A + b"hi",
        id="recv_packet",
    ),
    pytest.param(f.encode_keep_alive(), b"\x06\x00\x00\x00\x00", id="keep_alive"),
    pytest.param(
        f.encode_note_preferred(True), b"\x07\x00\x00\x00\x01\x01", id="note_preferred_true"
    ),
    pytest.param(
        f.encode_note_preferred(False), b"\x07\x00\x00\x00\x01\x00", id="note_preferred_false"
    ),
    pytest.param(
        f.encode_peer_gone(KEY_A, f.PeerGoneReason.NOT_HERE),
        b"\x08\x00\x00\x00\x21" + KEY_A + b"\x01",
        id="peer_gone_not_here",
    ),
    pytest.param(
        f.encode_peer_present(KEY_A, "192.0.2.1", 41641, f.PeerPresentFlags.IS_REGULAR),
        b"\x09\x00\x00\x00\x33"  # 32 + 16 + 2 + 1 = 51
        + KEY_A
        + b"\x00" * 10
        + b"\xff\xff\xc0\x00\x02\x01"  # v4-mapped 192.0.2.1
        + b"\xa2\xa9"  # 41641
        + b"\x01",
        id="peer_present_v4",
    ),
    pytest.param(
        f.encode_forward_packet(KEY_A, KEY_B, b"x"),
        b"\x0a\x00\x00\x00\x41" + KEY_A + KEY_B + b"x",
        id="forward_packet",
    ),
    pytest.param(f.encode_watch_conns(), b"\x10\x00\x00\x00\x00", id="watch_conns"),
    pytest.param(f.encode_close_peer(KEY_B), b"\x11\x00\x00\x00\x20" + KEY_B, id="close_peer"),
    pytest.param(f.encode_ping(b"12345678"), b"\x12\x00\x00\x00\x0812345678", id="ping"),
    pytest.param(f.encode_pong(b"abcdefgh"), b"\x13\x00\x00\x00\x08abcdefgh", id="pong"),
    pytest.param(f.encode_health("dup"), b"\x14\x00\x00\x00\x03dup", id="health"),
    pytest.param(
        f.encode_restarting(1000, 65536),
        b"\x15\x00\x00\x00\x08" + b"\x00\x00\x03\xe8" + b"\x00\x01\x00\x00",
        id="restarting",
    ),
]


@pytest.mark.parametrize(("encoded", "expected"), GOLDEN)
def test_golden_bytes(encoded: bytes, expected: bytes) -> None:
    assert encoded == expected


def test_magic_is_derp_and_key_emoji() -> None:
    assert bytes.fromhex("44455250f09f9491") == f.MAGIC
    assert bytes.fromhex("5453f09f92ac") == f.DISCO_MAGIC


def test_parsers_invert_encoders() -> None:
    assert f.parse_server_key(f.encode_server_key(KEY_A)[5:]) == KEY_A
    assert f.parse_server_key(f.encode_server_key(KEY_A)[5:] + b"future") == KEY_A
    assert f.parse_client_info(f.encode_client_info(KEY_A, b"n" * 40)[5:]) == (KEY_A, b"n" * 40)
    assert f.parse_send_packet(f.encode_send_packet(KEY_B, b"pkt")[5:]) == (KEY_B, b"pkt")
    assert f.parse_recv_packet(f.encode_recv_packet(KEY_A, b"")[5:]) == (KEY_A, b"")
    assert f.parse_forward_packet(f.encode_forward_packet(KEY_A, KEY_B, b"z")[5:]) == (
        KEY_A,
        KEY_B,
        b"z",
    )
    assert f.parse_note_preferred(b"\x01") is True
    assert f.parse_close_peer(KEY_B) == KEY_B
    assert f.parse_ping(b"12345678" + b"extra") == b"12345678"
    assert f.parse_restarting(f.encode_restarting(5, 7)[5:]) == (5, 7)


def test_peer_gone_reason_byte_is_optional() -> None:
    assert f.parse_peer_gone(KEY_A) == (KEY_A, f.PeerGoneReason.DISCONNECTED)
    assert f.parse_peer_gone(KEY_A + b"\x01") == (KEY_A, f.PeerGoneReason.NOT_HERE)
    assert f.parse_peer_gone(KEY_A + b"\x77") == (KEY_A, 0x77)


def test_mesh_conn_broke_never_goes_on_the_wire() -> None:
    with pytest.raises(LocalProtocolError):
        f.encode_peer_gone(KEY_A, f.PeerGoneReason.MESH_CONN_BROKE)


def test_peer_present_forms() -> None:
    full = f.encode_peer_present(KEY_A, "2001:db8::1", 7, f.PeerPresentFlags.IS_PROBER)[5:]
    assert f.parse_peer_present(full) == f.PeerPresent(key=KEY_A, ip="2001:db8::1", port=7, flags=4)
    v4 = f.encode_peer_present(KEY_A, "10.1.2.3", 9, f.PeerPresentFlags.IS_REGULAR)[5:]
    assert f.parse_peer_present(v4).ip == "10.1.2.3"
    assert f.parse_peer_present(KEY_A) == f.PeerPresent(key=KEY_A)  # oldest servers: key only
    assert f.parse_peer_present(v4[:-1]).flags == 0  # no flags byte


@pytest.mark.parametrize(
    ("parser", "payload"),
    [
        (f.parse_server_key, b"DERP" + KEY_A),
        (f.parse_server_key, b"XERP\xf0\x9f\x94\x91" + KEY_A),
        (f.parse_client_info, KEY_A + b"short"),
        (f.parse_send_packet, b"short"),
        (f.parse_send_packet, KEY_A + b"\x00" * (f.MAX_PACKET_SIZE + 1)),
        (f.parse_forward_packet, KEY_A),
        (f.parse_note_preferred, b""),
        (f.parse_note_preferred, b"\x01\x01"),
        (f.parse_close_peer, KEY_A[:31]),
        (f.parse_ping, b"1234567"),
        (f.parse_ping, b"x" * 1001),
        (f.parse_peer_gone, b"short"),
        (f.parse_restarting, b"1234"),
    ],
)
def test_malformed_payloads_are_remote_errors(parser: object, payload: bytes) -> None:
    assert callable(parser)
    with pytest.raises(RemoteProtocolError):
        parser(payload)


def test_encoders_refuse_oversized_packets_and_bad_keys() -> None:
    with pytest.raises(LocalProtocolError):
        f.encode_send_packet(KEY_A, b"\x00" * (f.MAX_PACKET_SIZE + 1))
    with pytest.raises(LocalProtocolError):
        f.encode_send_packet(KEY_A[:31], b"x")
    with pytest.raises(LocalProtocolError):
        f.encode_ping(b"1234")


def test_client_info_json_as_go_sends_it() -> None:
    # Exactly what Tailscale's derp.Client marshals (mixed tag styles).
    doc = (
        '{"meshKey":"'
        + "ab" * 32
        + '","version":2,"CanAckPings":true,"IsProber":true,"AppName":"x"}'
    ).encode()
    info = f.decode_client_info_json(doc)
    assert info == f.ClientInfo(
        version=2, mesh_key=b"\xab" * 32, can_ack_pings=True, is_prober=True, app_name="x"
    )
    # Without a mesh key, Go omits it; unknown fields are ignored.
    plain = f.decode_client_info_json(b'{"version":2,"CanAckPings":false,"Future":[1,2]}')
    assert plain.mesh_key is None
    assert plain.version == 2


def test_client_info_json_encoding_uses_go_names() -> None:
    info = f.ClientInfo(version=2, mesh_key=b"\x01" * 32, can_ack_pings=True)
    assert f.encode_client_info_json(info) == (
        b'{"meshKey":"' + b"01" * 32 + b'","version":2,"CanAckPings":true}'
    )
    assert (
        f.encode_client_info_json(f.ClientInfo(version=2)) == b'{"version":2,"CanAckPings":false}'
    )
    assert f.encode_server_info_json(f.ServerInfo()) == b'{"version":2}'


@pytest.mark.parametrize(
    "doc",
    [
        b"[]",
        b"not json",
        b'{"version":"2"}',
        b'{"meshKey":"zz"}',
        b'{"meshKey":"abcd"}',
        b'{"CanAckPings":1}',
    ],
)
def test_client_info_json_rejects_bad_documents(doc: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        f.decode_client_info_json(doc)


def test_looks_like_disco() -> None:
    disco = f.DISCO_MAGIC + b"\x00" * (32 + 24)
    assert f.looks_like_disco(disco)
    assert not f.looks_like_disco(disco[:-1])  # too short to be a box
    assert not f.looks_like_disco(b"\x01" + disco[1:])


# -- the stream decoder --------------------------------------------------------

STREAM_FRAMES = [
    (0x04, KEY_B + b"packet one"),
    (0x06, b""),
    (0x12, b"pingdata"),
    (0x04, KEY_A + b"\xff" * 3000),
    (0x99, b"unknown type"),
]
STREAM = b"".join(hdr(t, len(p)) + p for t, p in STREAM_FRAMES)


def test_decoder_whole_stream() -> None:
    assert f.FrameDecoder().feed(STREAM) == STREAM_FRAMES


def test_decoder_byte_by_byte() -> None:
    dec = f.FrameDecoder()
    out: list[tuple[int, bytes]] = []
    for i in range(len(STREAM)):
        out.extend(dec.feed(STREAM[i : i + 1]))
    assert out == STREAM_FRAMES
    assert dec.buffered == 0


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_decoder_any_split(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    dec = f.FrameDecoder()
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        out.extend(dec.feed(bytearray(chunk)))
    assert out == STREAM_FRAMES
    assert all(type(p) is bytes for _, p in out)


def test_decoder_rejects_oversized_frame_at_the_header() -> None:
    dec = f.FrameDecoder(max_frame_len=100)
    assert dec.feed(hdr(0x04, 100) + b"\x00" * 100) == [(0x04, b"\x00" * 100)]
    with pytest.raises(RemoteProtocolError):
        dec.feed(hdr(0x04, 101))  # no payload needed to refuse it
    split = f.FrameDecoder(max_frame_len=100)
    split.feed(b"\x04\x00\x00")
    with pytest.raises(RemoteProtocolError):
        split.feed(b"\x10\x00")  # header completed across chunks: 0x1000 > 100


@given(st.binary(max_size=300))
def test_decoder_never_buffers_beyond_its_limit(data: bytes) -> None:
    dec = f.FrameDecoder(max_frame_len=64)
    try:
        frames = dec.feed(data)
    except RemoteProtocolError:
        return
    assert all(len(p) <= 64 for _, p in frames)
    assert dec.buffered <= 64 + f.FRAME_HEADER_LEN
