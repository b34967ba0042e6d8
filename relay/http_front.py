"""The relay's HTTP front door: which request gets which answer (sans-I/O).

Role in the pipeline
--------------------
The trio adapter parses each HTTP/1.1 request with h11 and asks
:func:`route_request` what to do with it.  The answer is a value:
switch this stream to DERP (optionally after a 101), switch it to DERP over
WebSocket, or send an ordinary response.  No sockets here, so every endpoint's
behaviour is tested without a server.

Endpoints (matching Tailscale's ``cmd/derper`` and ``derpserver/handler.go``)::

    GET /derp  Upgrade: DERP           101 Switching Protocols, then DERP on the
                                        raw stream (headers: Upgrade, Connection,
                                        Derp-Version, Derp-Public-Key)
               + Derp-Fast-Start: 1    no HTTP response at all; the client already
                                        knows our key (meta certificate) and its
                                        ClientInfo follows the request directly
    GET /derp  Upgrade: websocket      RFC 6455 handshake with subprotocol "derp",
               Sec-WebSocket-Protocol: then DERP inside binary messages (browsers,
               derp                     js/wasm clients)
    GET /derp  anything else           426 "DERP requires connection upgrade"
    /derp/probe, /derp/latency-check   GET/HEAD: 200 with CORS "*"; else 405
                                        (netcheck's HTTPS latency probe)
    /generate_204                      204; echoes "X-Tailscale-Challenge: c" as
                                        "X-Tailscale-Response: response c" when c is
                                        at most 64 of [A-Za-z0-9._:-]
                                        (captive-portal detection)
    /                                  200, a one-line text banner
    anything else                      404
"""

from __future__ import annotations

import base64
import hashlib
import re

import msgspec

from .derp.frames import PROTOCOL_VERSION

__all__ = [
    "DERP_PATH",
    "DerpUpgrade",
    "PlainResponse",
    "WebSocketUpgrade",
    "route_request",
]

DERP_PATH = "/derp"
FAST_START_HEADER = b"derp-fast-start"
IDEAL_NODE_HEADER = b"ideal-node"
CHALLENGE_HEADER = b"x-tailscale-challenge"
RESPONSE_HEADER = b"X-Tailscale-Response"
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_CHALLENGE_RE = re.compile(rb"[A-Za-z0-9._:\-]{1,64}")
_NO_CACHE = b"no-cache, no-store, must-revalidate, no-transform, max-age=0"
_SERVER = b"tailledger-relay"


class DerpUpgrade(msgspec.Struct, frozen=True, kw_only=True):
    """Switch the stream to DERP.

    Attributes:
        response: bytes to write first: the 101 response, or ``b""`` for the
            fast-start form.
        ideal_node: the client's ``Ideal-Node`` header (it would rather be on
            that node of the region), or ``None``.
    """

    response: bytes
    ideal_node: str | None = None


class WebSocketUpgrade(msgspec.Struct, frozen=True, kw_only=True):
    """Switch the stream to DERP-over-WebSocket after writing ``response``."""

    response: bytes
    ideal_node: str | None = None


class PlainResponse(msgspec.Struct, frozen=True, kw_only=True):
    """An ordinary HTTP response to send with h11."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""


Route = DerpUpgrade | WebSocketUpgrade | PlainResponse


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _text(
    status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> PlainResponse:
    headers = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Server", _SERVER)]
    if extra:
        headers.extend(extra)
    return PlainResponse(status=status, headers=headers, body=body)


def derp_switching_protocols(server_public: bytes) -> bytes:
    """The exact 101 response Tailscale's server sends before speaking DERP."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: DERP\r\n"
        b"Connection: Upgrade\r\n"
        b"Derp-Version: " + str(PROTOCOL_VERSION).encode() + b"\r\n"
        b"Derp-Public-Key: " + server_public.hex().encode() + b"\r\n\r\n"
    )


def websocket_accept(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _WS_GUID).digest())


def _websocket_response(key: bytes) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + websocket_accept(key) + b"\r\n"
        b"Sec-WebSocket-Protocol: derp\r\n\r\n"
    )


def route_request(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    server_public: bytes,
    websocket: bool = True,
) -> Route:
    """Decide how to answer one HTTP request.

    Args:
        method: request method (``b"GET"``).
        target: request target; only the path before ``?`` matters.
        headers: request headers as h11 delivers them (names lower-cased).
        server_public: the relay's DERP public key (for the 101 headers).
        websocket: whether DERP-over-WebSocket is enabled.

    Returns:
        A :class:`DerpUpgrade`, :class:`WebSocketUpgrade` or :class:`PlainResponse`.
    """
    path = target.split(b"?", 1)[0].decode("latin-1")
    if path in ("/derp/probe", "/derp/latency-check"):
        if method in (b"GET", b"HEAD"):
            return _text(200, b"", [(b"Access-Control-Allow-Origin", b"*")])
        return _text(405, b"bogus probe method\n")
    if path == "/generate_204":
        extra = [(b"Cache-Control", _NO_CACHE)]
        challenge = _header(headers, CHALLENGE_HEADER)
        if challenge is not None and _CHALLENGE_RE.fullmatch(challenge):
            extra.append((RESPONSE_HEADER, b"response " + challenge))
        return PlainResponse(status=204, headers=[(b"Server", _SERVER), *extra])
    if path == DERP_PATH:
        upgrade = (_header(headers, b"upgrade") or b"").strip().lower()
        ideal = _header(headers, IDEAL_NODE_HEADER)
        ideal_node = ideal.decode("latin-1") if ideal else None
        protocols = _header(headers, b"sec-websocket-protocol") or b""
        ws_key = _header(headers, b"sec-websocket-key")
        if upgrade == b"websocket" and b"derp" in protocols.lower():
            if not websocket or ws_key is None:
                return _text(400, b"DERP over WebSocket is not available\n")
            return WebSocketUpgrade(response=_websocket_response(ws_key), ideal_node=ideal_node)
        if upgrade in (b"derp", b"websocket"):
            # Very old clients said "Upgrade: WebSocket" but spoke plain DERP
            # framing; Tailscale's server treats them like "derp", so do we.
            fast = (_header(headers, FAST_START_HEADER) or b"").strip() == b"1"
            response = b"" if fast else derp_switching_protocols(server_public)
            return DerpUpgrade(response=response, ideal_node=ideal_node)
        return _text(426, b"DERP requires connection upgrade\n")
    if path == "/":
        return _text(200, b"tailledger DERP relay\n")
    return _text(404, b"not found\n")
