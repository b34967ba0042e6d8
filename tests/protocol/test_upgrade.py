"""The HTTP/1.1 front (server) and the upgrade-response reader (client)."""

from __future__ import annotations

import base64
import hashlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import upgrade
from protocol.errors import RemoteProtocolError
from protocol.upgrade import (
    FrontConnection,
    FrontEvent,
    HandOff,
    NeedData,
    PeerClosed,
    SendResponse,
    Upgrade,
    UpgradeResponseReader,
    WebSocketUpgrade,
)

SERVER_PUBLIC = bytes(range(32))
INIT = bytes(range(101))
INIT_B64 = base64.b64encode(INIT).decode()


def drive(data: bytes, *, eof: bool = False) -> list[FrontEvent]:
    """Feed ``data`` at once and collect events until the front needs data or ends."""
    front = FrontConnection(server_public=SERVER_PUBLIC)
    front.receive_data(data)
    if eof:
        front.receive_data(b"")
    events: list[FrontEvent] = []
    while True:
        event = front.next_event()
        events.append(event)
        if isinstance(event, NeedData | PeerClosed | HandOff | Upgrade | WebSocketUpgrade):
            return events
        if isinstance(event, SendResponse) and event.close:
            return events


def native_request(**overrides: str | None) -> bytes:
    headers = {
        "Host": "ctl.example:80",
        "Upgrade": "tailscale-control-protocol",
        "Connection": "upgrade",
        "X-Tailscale-Handshake": INIT_B64,
        "Content-Length": "0",
    }
    headers.update(overrides)  # type: ignore[arg-type]
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if v is not None)
    return f"POST /ts2021 HTTP/1.1\r\n{lines}\r\n".encode()


def test_key_response_json() -> None:
    [event, need] = drive(b"GET /key?v=130 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(event, SendResponse)
    assert isinstance(need, NeedData)
    assert not event.close
    head, _, body = event.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: application/json" in head.lower()
    assert msgspec.json.decode(body) == {
        "legacyPublicKey": "mkey:" + "0" * 64,
        "publicKey": "mkey:" + SERVER_PUBLIC.hex(),
    }


@pytest.mark.parametrize("target", ["/key", "/key?v=", "/key?v=abc", "/key?x=1"])
def test_key_without_integer_v_is_400(target: str) -> None:
    event = drive(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())[0]
    assert isinstance(event, SendResponse)
    assert event.status == 400
    assert event.data.startswith(b"HTTP/1.1 400 ")


def test_key_for_pre_noise_clients_is_empty_200() -> None:
    event = drive(b"GET /key?v=38 HTTP/1.1\r\nHost: x\r\n\r\n")[0]
    assert isinstance(event, SendResponse)
    assert event.status == 200
    assert event.data.endswith(b"\r\n\r\n")
    assert b"Content-Length: 0" in event.data


def test_keep_alive_then_hand_off_replays_exact_bytes() -> None:
    second = b"GET /admin/ HTTP/1.1\r\nHost: x\r\nX-Odd:  spaced \r\n\r\n"
    events = drive(b"GET /key?v=130 HTTP/1.1\r\nHost: x\r\n\r\n" + second)
    assert [type(e) for e in events] == [SendResponse, HandOff]
    assert isinstance(events[1], HandOff)
    assert events[1].replay == second


def test_hand_off_when_split_across_reads() -> None:
    front = FrontConnection(server_public=SERVER_PUBLIC)
    raw = b"POST /api/v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    front.receive_data(raw[:10])
    assert isinstance(front.next_event(), NeedData)
    front.receive_data(raw[10:])
    event = front.next_event()
    assert isinstance(event, HandOff)
    assert event.replay == raw


def test_http10_key_closes() -> None:
    event = drive(b"GET /key?v=130 HTTP/1.0\r\n\r\n")[0]
    assert isinstance(event, SendResponse)
    assert event.close


@pytest.mark.parametrize(
    "data",
    [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # h2c prior knowledge: hypercorn's business
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
        b"GARBAGE\r\n\r\n",
    ],
)
def test_unparsable_requests_are_handed_off(data: bytes) -> None:
    events = drive(data)
    assert isinstance(events[-1], HandOff)
    assert events[-1].replay == data


def test_eof_between_requests() -> None:
    assert isinstance(drive(b"", eof=True)[-1], PeerClosed)


def test_native_upgrade() -> None:
    events = drive(native_request() + b"\x04\x00\x10noise")
    [event] = events
    assert isinstance(event, Upgrade)
    assert event.initiation == INIT
    assert event.trailing == b"\x04\x00\x10noise"


def test_upgrade_header_is_case_insensitive_and_get_is_accepted() -> None:
    raw = native_request(Upgrade="Tailscale-Control-Protocol").replace(b"POST", b"GET", 1)
    [event] = drive(raw)
    assert isinstance(event, Upgrade)


def test_upgrade_response_bytes() -> None:
    assert upgrade.UPGRADE_RESPONSE == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: tailscale-control-protocol\r\n"
        b"Connection: upgrade\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"Upgrade": None}, "missing next protocol"),
        ({"Upgrade": "h2c"}, "unknown next protocol"),
        ({"X-Tailscale-Handshake": None}, "missing Tailscale handshake header"),
        ({"X-Tailscale-Handshake": "!!notbase64!!"}, "invalid tailscale handshake header"),
        ({"Content-Length": "5"}, "body"),
    ],
)
def test_bad_upgrades_are_400(overrides: dict[str, str | None], reason: str) -> None:
    event = drive(native_request(**overrides) + b"hello")[0]
    assert isinstance(event, SendResponse)
    assert event.status == 400
    assert event.close
    assert reason in event.reason
    assert event.data.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_short_initiation_is_left_to_the_handshake() -> None:
    # Go checks the size only after the 101 (in controlbase.Server).
    [event] = drive(native_request(**{"X-Tailscale-Handshake": base64.b64encode(b"x").decode()}))
    assert isinstance(event, Upgrade)
    assert event.initiation == b"x"


def ws_request(protocol: str = "tailscale-control-protocol", query: str | None = None) -> bytes:
    q = query if query is not None else "X-Tailscale-Handshake=" + INIT_B64.replace("+", "%2B")
    return (
        f"GET /ts2021?{q} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    ).encode()


def test_websocket_upgrade() -> None:
    [event] = drive(ws_request())
    assert isinstance(event, WebSocketUpgrade)
    assert event.initiation == INIT
    # RFC 6455 §1.3's example key and accept value.
    accept = base64.b64encode(
        hashlib.sha1(b"dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    assert accept == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert b"Sec-WebSocket-Accept: " + accept + b"\r\n" in event.response
    assert b"Sec-WebSocket-Protocol: tailscale-control-protocol\r\n" in event.response


@pytest.mark.parametrize(
    "raw",
    [
        ws_request(protocol="chat"),
        ws_request(query=""),
        ws_request(query="X-Tailscale-Handshake=%%%"),
    ],
)
def test_bad_websocket_upgrades(raw: bytes) -> None:
    event = drive(raw)[0]
    assert isinstance(event, SendResponse)
    assert event.status == 400


@given(st.binary(max_size=2000))
def test_front_never_raises(data: bytes) -> None:
    for eof in (False, True):
        events = drive(data, eof=eof)
        assert events


def test_client_reader_accepts_101() -> None:
    reader = UpgradeResponseReader()
    assert reader.receive_data(upgrade.UPGRADE_RESPONSE[:20]) is None
    result = reader.receive_data(upgrade.UPGRADE_RESPONSE[20:] + b"\x02\x00\x30rest")
    assert result is not None
    assert result.trailing == b"\x02\x00\x30rest"


def test_client_reader_rejects_other_statuses_and_upgrades() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        UpgradeResponseReader().receive_data(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert info.value.http_status == 404
    with pytest.raises(RemoteProtocolError, match="Upgrade"):
        UpgradeResponseReader().receive_data(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
        )
    with pytest.raises(RemoteProtocolError, match="closed"):
        UpgradeResponseReader().receive_data(b"")


def test_key_response_parsing() -> None:
    body = upgrade.key_response_body(SERVER_PUBLIC)
    assert upgrade.parse_key_response(body) == SERVER_PUBLIC
    with pytest.raises(RemoteProtocolError, match="too old"):
        upgrade.parse_key_response(upgrade.key_response_body(bytes(32)))
    with pytest.raises(RemoteProtocolError, match="bad /key"):
        upgrade.parse_key_response(b"00" * 32)
