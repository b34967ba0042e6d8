"""Early payload and ``/machine/map`` frame layouts (byte tables of §5.1, §8.2)."""

from __future__ import annotations

import struct

import msgspec
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from protocol.early import EarlyPayloadReader, encode_early_payload
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.mapframe import (
    KEEPALIVE_FRAME_RAW,
    KEEPALIVE_FRAME_ZSTD,
    MapFrameDecoder,
    frame_map_response,
    keepalive_frame,
)

CHALLENGE = bytes(range(32))


def test_early_payload_layout() -> None:
    data = encode_early_payload(CHALLENGE)
    assert data[:5] == b"\xff\xff\xffTS"
    (length,) = struct.unpack(">I", data[5:9])
    assert length == len(data) - 9
    assert msgspec.json.decode(data[9:]) == {"nodeKeyChallenge": "chalpub:" + CHALLENGE.hex()}


# The start of a SETTINGS frame: length 0x000012, type 0x04, flags 0, stream 0.
SETTINGS = bytes.fromhex("000012040000000000") + bytes(18)


@pytest.mark.parametrize("split", [1, 4, 5, 8, 9, 20, 200])
def test_reader_with_early_payload_in_pieces(split: int) -> None:
    stream = encode_early_payload(CHALLENGE) + SETTINGS
    reader = EarlyPayloadReader()
    result = None
    for i in range(0, len(stream), split):
        result = reader.receive_data(stream[i : i + split])
        if result is not None:
            rest = stream[i + split :]
            break
    assert result is not None
    assert result.early is not None
    assert result.early.node_key_challenge == "chalpub:" + CHALLENGE.hex()
    assert result.remainder + rest == SETTINGS


def test_reader_without_early_payload() -> None:
    reader = EarlyPayloadReader()
    result = reader.receive_data(SETTINGS[:2])
    assert result is not None  # 0x00 already differs from the magic
    assert result.early is None
    assert result.remainder == SETTINGS[:2]
    with pytest.raises(RemoteProtocolError):
        reader.receive_data(b"more")


def test_reader_rejects_huge_and_bad_payloads() -> None:
    with pytest.raises(RemoteProtocolError, match="too large"):
        EarlyPayloadReader().receive_data(b"\xff\xff\xffTS" + struct.pack(">I", (10 << 20) + 1))
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        EarlyPayloadReader().receive_data(b"\xff\xff\xffTS\x00\x00\x00\x02{]")


def test_map_frame_layout_zstd() -> None:
    body = b'{"Node":{"ID":1}}'
    frame = frame_map_response(body, compress=True)
    (length,) = struct.unpack("<I", frame[:4])
    assert length == len(frame) - 4
    payload = frame[4:]
    assert payload[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    params = zstandard.get_frame_parameters(payload)
    assert params.has_checksum
    assert params.content_size == len(body)
    assert zstandard.ZstdDecompressor().decompress(payload) == body


def test_map_frame_layout_raw() -> None:
    assert frame_map_response(b"{}", compress=False) == b"\x02\x00\x00\x00{}"


def test_keepalive_frames_are_constant_and_decode() -> None:
    assert keepalive_frame(True) is KEEPALIVE_FRAME_ZSTD
    assert keepalive_frame(False) is KEEPALIVE_FRAME_RAW
    assert frame_map_response(b'{"KeepAlive":true}', compress=True) == KEEPALIVE_FRAME_ZSTD
    decoder = MapFrameDecoder()
    assert decoder.receive_data(KEEPALIVE_FRAME_ZSTD) == [b'{"KeepAlive":true}']


def test_never_frames_empty_json() -> None:
    with pytest.raises(LocalProtocolError):
        frame_map_response(b"", compress=True)


@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=6), st.data())
def test_decoder_splits_any_chunking(bodies: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(frame_map_response(b, compress=True) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = MapFrameDecoder()
    out: list[bytes] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        out.extend(decoder.receive_data(wire[a:b]))
    assert out == bodies


def test_decoder_errors() -> None:
    with pytest.raises(RemoteProtocolError, match="zero-length"):
        MapFrameDecoder().receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError, match="zstd"):
        MapFrameDecoder().receive_data(b"\x02\x00\x00\x00{}")  # JSON where zstd is due
    with pytest.raises(RemoteProtocolError, match="too large"):
        MapFrameDecoder(max_frame=10).receive_data(b"\x0b\x00\x00\x00")
