"""HTTP front door routing (pure): upgrades, probes, captive-portal challenge."""

from __future__ import annotations

import pytest

from relay.http_front import (
    DerpUpgrade,
    PlainResponse,
    WebSocketUpgrade,
    route_request,
    websocket_accept,
)

KEY = bytes(range(32))


def route(method: bytes, target: bytes, *headers: tuple[bytes, bytes]) -> object:
    return route_request(method, target, list(headers), server_public=KEY)


def header(resp: PlainResponse, name: bytes) -> bytes | None:
    return next((v for k, v in resp.headers if k.lower() == name.lower()), None)


def test_derp_upgrade_answers_exactly_like_derper() -> None:
    got = route(b"GET", b"/derp", (b"upgrade", b"DERP"), (b"connection", b"Upgrade"))
    assert got == DerpUpgrade(
        response=(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: DERP\r\n"
            b"Connection: Upgrade\r\n"
            b"Derp-Version: 2\r\n"
            b"Derp-Public-Key: " + KEY.hex().encode() + b"\r\n\r\n"
        )
    )


def test_fast_start_sends_no_http_response() -> None:
    got = route(
        b"GET",
        b"/derp",
        (b"upgrade", b"derp"),
        (b"derp-fast-start", b"1"),
        (b"ideal-node", b"900a"),
    )
    assert got == DerpUpgrade(response=b"", ideal_node="900a")


def test_old_websocket_spelling_without_subprotocol_is_plain_derp() -> None:
    got = route(b"GET", b"/derp", (b"upgrade", b"WebSocket"))
    assert isinstance(got, DerpUpgrade)
    assert got.response.startswith(b"HTTP/1.1 101")


def test_websocket_upgrade_follows_rfc6455() -> None:
    # RFC 6455 §1.3's example key and accept value.
    assert websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    got = route(
        b"GET",
        b"/derp",
        (b"upgrade", b"websocket"),
        (b"sec-websocket-protocol", b"derp"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    )
    assert isinstance(got, WebSocketUpgrade)
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in got.response
    assert b"Sec-WebSocket-Protocol: derp\r\n" in got.response


def test_websocket_can_be_disabled() -> None:
    got = route_request(
        b"GET",
        b"/derp",
        [
            (b"upgrade", b"websocket"),
            (b"sec-websocket-protocol", b"derp"),
            (b"sec-websocket-key", b"x"),
        ],
        server_public=KEY,
        websocket=False,
    )
    assert isinstance(got, PlainResponse)
    assert got.status == 400


def test_derp_without_upgrade_is_426() -> None:
    got = route(b"GET", b"/derp")
    assert isinstance(got, PlainResponse)
    assert got.status == 426
    assert got.body == b"DERP requires connection upgrade\n"


@pytest.mark.parametrize("path", [b"/derp/probe", b"/derp/latency-check", b"/derp/probe?x=1"])
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_probes(path: bytes, method: bytes) -> None:
    got = route(method, path)
    assert isinstance(got, PlainResponse)
    assert got.status == 200
    assert header(got, b"Access-Control-Allow-Origin") == b"*"


def test_probe_with_bogus_method() -> None:
    got = route(b"POST", b"/derp/probe")
    assert isinstance(got, PlainResponse)
    assert got.status == 405


@pytest.mark.parametrize(
    ("challenge", "response"),
    [
        (b"abc-123_x.y:z", b"response abc-123_x.y:z"),
        (b"a" * 64, b"response " + b"a" * 64),
        (b"a" * 65, None),  # too long: no echo
        (b"bad char!", None),
        (b"", None),
    ],
)
def test_generate_204_challenge(challenge: bytes, response: bytes | None) -> None:
    got = route(b"GET", b"/generate_204", (b"x-tailscale-challenge", challenge))
    assert isinstance(got, PlainResponse)
    assert got.status == 204
    assert header(got, b"X-Tailscale-Response") == response
    assert header(got, b"Cache-Control") is not None


def test_root_and_unknown_paths() -> None:
    root = route(b"GET", b"/")
    assert isinstance(root, PlainResponse)
    assert root.status == 200
    missing = route(b"GET", b"/nope")
    assert isinstance(missing, PlainResponse)
    assert missing.status == 404
