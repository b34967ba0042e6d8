"""The HTTP/1.1 front of the control port: ``/key``, ``/ts2021``, hand-off (sans-I/O).

Role in the pipeline: every accepted TCP (or TLS) connection starts here.
:class:`FrontConnection` parses request heads with ``h11`` and decides, per
request, between four outcomes:

====================================  ==========================================
request                               outcome
====================================  ==========================================
``GET /key?v=N``                      answered here (:class:`SendResponse`);
                                      keep-alive, the next request is parsed too
``POST|GET /ts2021`` with             :class:`Upgrade`: the adapter writes
``Upgrade: tailscale-control-protocol``  :data:`UPGRADE_RESPONSE`, then Noise
``GET /ts2021`` with                  :class:`WebSocketUpgrade` (browser/WASM
``Upgrade: websocket``                clients, §3.4): 101 + WebSocket framing
anything else (also unparsable)       :class:`HandOff`: the bytes of this
                                      request are replayed into hypercorn
====================================  ==========================================

The hand-off is per connection and final: once hypercorn owns a connection it
serves every later request on it (an ASGI shim also answers ``/key`` there,
see :mod:`protocol.serve`). Go's ``controlhttp`` dials a fresh connection for
every upgrade, so ``/ts2021`` is always the first request of its connection.

Upgrade validation follows ``controlhttpserver.acceptHTTP`` (§3.2): lower-cased
``Upgrade``; empty -> 400 (Headscale answers 500 with a proxy hint; we send 400
with the same hint); ``websocket`` -> WebSocket variant; any other value ->
400; missing or non-base64 ``X-Tailscale-Handshake`` -> 400. The *size* of the
decoded initiation is checked later by the handshake, after the 101, exactly as
Go does. A request body on ``/ts2021`` is refused (its bytes would be mistaken
for Noise records).

This module also holds the client half: :func:`build_upgrade_request` and
:class:`UpgradeResponseReader`, used by :mod:`protocol.client_conn`.

Invariants: the front never buffers more than ``h11``'s incomplete-event limit
(16 KiB by default) per request head, and never raises for peer input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, urlsplit

import h11

from projections import tailcfg

from .errors import RemoteProtocolError

__all__ = [
    "HANDSHAKE_HEADER",
    "KEY_PATH",
    "NOISE_CAPABILITY_VERSION",
    "UPGRADE_PATH",
    "UPGRADE_RESPONSE",
    "UPGRADE_TOKEN",
    "FrontConnection",
    "FrontEvent",
    "HandOff",
    "NeedData",
    "PeerClosed",
    "SendResponse",
    "Upgrade",
    "UpgradeResponseReader",
    "UpgradeResult",
    "WebSocketUpgrade",
    "build_key_request",
    "build_upgrade_request",
    "key_response_body",
    "parse_key_response",
]

#: ``Upgrade`` header value of the native ts2021 upgrade.
UPGRADE_TOKEN: Final = "tailscale-control-protocol"
#: Request header (and WebSocket query parameter) carrying the initiation.
HANDSHAKE_HEADER: Final = "X-Tailscale-Handshake"
UPGRADE_PATH: Final = "/ts2021"
KEY_PATH: Final = "/key"
#: ``/key?v=`` below this gets an empty 200 (Headscale ``NoiseCapabilityVersion``).
NOISE_CAPABILITY_VERSION: Final = 39

#: The exact 101 head. ``Connection: upgrade`` is required: without it Go's
#: HTTP client gives no writable body ("did not provide a writable body").
UPGRADE_RESPONSE: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: tailscale-control-protocol\r\n"
    b"Connection: upgrade\r\n"
    b"\r\n"
)

_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


# -- events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeedData:
    """Read more bytes from the peer and call ``receive_data``."""


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer closed the connection between requests; close quietly."""


@dataclass(frozen=True, slots=True)
class SendResponse:
    """Write ``data``; then close if ``close``, else keep reading.

    Attributes:
        data: A complete HTTP/1.1 response.
        close: The connection must be closed after writing.
        status: The status code (for logs and metrics).
        reason: Why (for logs), e.g. ``"missing handshake header"``.
    """

    data: bytes
    close: bool
    status: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A valid native ``/ts2021`` request: answer 101 and run Noise.

    Attributes:
        initiation: The decoded ``X-Tailscale-Handshake`` (should be 101 bytes).
        trailing: Bytes received after the request (belong to the Noise stream).
    """

    initiation: bytes
    trailing: bytes


@dataclass(frozen=True, slots=True)
class WebSocketUpgrade:
    """A valid WebSocket ``/ts2021`` request (§3.4).

    Attributes:
        initiation: The decoded handshake query parameter.
        response: The complete 101 head to write.
        trailing: Bytes received after the request (WebSocket frames).
    """

    initiation: bytes
    response: bytes
    trailing: bytes


@dataclass(frozen=True, slots=True)
class HandOff:
    """Not ours: give the connection to hypercorn, replaying ``replay`` first.

    ``path`` is the request's path when a request head was parsed (``""`` for bytes
    that are not HTTP/1.1 we understand), so that the adapter can route ``/derp`` to
    the embedded relay instead.
    """

    replay: bytes
    path: str = ""


FrontEvent = NeedData | PeerClosed | SendResponse | Upgrade | WebSocketUpgrade | HandOff


def key_response_body(server_public: bytes) -> bytes:
    """JSON body of ``GET /key?v>=39``: zero legacy key + our Noise key."""
    return tailcfg.encode(
        tailcfg.OverTLSPublicKeyResponse(
            legacy_public_key=tailcfg.zero_key(tailcfg.KeyPrefix.MACHINE),
            public_key=tailcfg.format_key(tailcfg.KeyPrefix.MACHINE, server_public),
        )
    )


def _header(request: h11.Request, name: bytes) -> str:
    for key, value in request.headers:
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


class FrontConnection:
    """Decide what to do with the HTTP/1.1 requests of one connection.

    Usage: call :meth:`receive_data` with bytes from the socket (``b""`` on
    EOF) and :meth:`next_event` until it returns :class:`NeedData`. After an
    :class:`Upgrade`, :class:`WebSocketUpgrade`, :class:`HandOff` or
    :class:`PeerClosed`, or a :class:`SendResponse` with ``close``, the
    object is done.
    """

    def __init__(self, *, server_public: bytes, max_head_size: int = 16 * 1024) -> None:
        """Create the front for a server whose Noise public key is ``server_public``."""
        self._key_body = key_response_body(server_public)
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_size)
        # Raw bytes of the current request cycle, for a faithful replay.
        self._cycle_raw = bytearray()
        self._eof = False
        self._done = False

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means EOF."""
        if data:
            self._cycle_raw += data
        else:
            self._eof = True
        self._h11.receive_data(data)

    def next_event(self) -> FrontEvent:
        """Return the next decision (see the table in the module docstring)."""
        if self._done:
            return PeerClosed()
        try:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                return NeedData()
            if isinstance(event, h11.ConnectionClosed):
                return self._finish(PeerClosed())
            if not isinstance(event, h11.Request):
                # Only Request can start a cycle; anything else means garbage.
                return self._finish(HandOff(bytes(self._cycle_raw)))
            return self._on_request(event)
        except h11.RemoteProtocolError:
            if self._eof:
                return self._finish(PeerClosed())
            # Not HTTP/1.1 we understand (h2c preface, junk, oversized head):
            # hypercorn owns every other request, including the error answer.
            return self._finish(HandOff(bytes(self._cycle_raw)))

    def _finish(self, event: FrontEvent) -> FrontEvent:
        self._done = True
        return event

    def _on_request(self, request: h11.Request) -> FrontEvent:
        target = bytes(request.target).decode("latin-1")
        split = urlsplit(target)
        method = bytes(request.method).decode("latin-1")
        if split.path == KEY_PATH and method == "GET":
            return self._serve_key(split.query)
        if split.path == UPGRADE_PATH and method in ("POST", "GET"):
            return self._upgrade(request, method, split.query)
        return self._finish(HandOff(bytes(self._cycle_raw), split.path))

    def _await_end_of_message(self) -> bool:
        """Consume the (empty) body of the current request; False on a body."""
        while True:
            event = self._h11.next_event()
            if isinstance(event, h11.EndOfMessage):
                return True
            if isinstance(event, h11.Data):
                return False
            if event is h11.NEED_DATA:
                # A body announced but not (fully) sent: treat as a body.
                return False

    # -- /key ---------------------------------------------------------------------

    def _serve_key(self, query: str) -> FrontEvent:
        if not self._await_end_of_message():
            return self._error(400, "unexpected request body")
        values = parse_qs(query).get("v")
        try:
            version = int(values[0]) if values else None
        except ValueError:
            version = None
        if version is None:
            return self._respond(400, b"missing or invalid v parameter\n", "text/plain", "bad v")
        if version < NOISE_CAPABILITY_VERSION:
            return self._respond(200, b"", None, "pre-noise client")
        return self._respond(200, self._key_body, "application/json", "key")

    def _respond(
        self, status: int, body: bytes, content_type: str | None, reason: str
    ) -> FrontEvent:
        headers = [("Content-Length", str(len(body)))]
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        conn = self._h11
        data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return self._finish(SendResponse(data=data, close=True, status=status, reason=reason))
        conn.start_next_cycle()
        self._cycle_raw = bytearray(conn.trailing_data[0])
        return SendResponse(data=data, close=False, status=status, reason=reason)

    def _error(self, status: int, reason: str) -> FrontEvent:
        """A plain-text error response followed by closing the connection."""
        body = (reason + "\n").encode("ascii", "replace")
        head = (
            f"HTTP/1.1 {status} {'Bad Request' if status == 400 else 'Error'}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        return self._finish(
            SendResponse(data=head + body, close=True, status=status, reason=reason)
        )

    # -- /ts2021 ------------------------------------------------------------------

    def _upgrade(self, request: h11.Request, method: str, query: str) -> FrontEvent:
        upgrade = _header(request, b"upgrade").strip().lower()
        if upgrade == "":
            return self._error(
                400,
                "missing next protocol (no Upgrade header; a reverse proxy may strip it)",
            )
        if upgrade == "websocket":
            return self._websocket(request, method, query)
        if upgrade != UPGRADE_TOKEN:
            return self._error(400, "unknown next protocol")
        encoded = _header(request, b"x-tailscale-handshake")
        if not encoded:
            return self._error(400, "missing Tailscale handshake header")
        try:
            initiation = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return self._error(400, "invalid tailscale handshake header")
        if not self._await_end_of_message():
            return self._error(400, "request body not allowed on /ts2021")
        return self._finish(Upgrade(initiation=initiation, trailing=self._h11.trailing_data[0]))

    def _websocket(self, request: h11.Request, method: str, query: str) -> FrontEvent:
        if method != "GET":
            return self._error(400, "WebSocket upgrade must use GET")
        protocols = {p.strip() for p in _header(request, b"sec-websocket-protocol").split(",")}
        if UPGRADE_TOKEN not in protocols:
            return self._error(400, "client must speak the control subprotocol")
        ws_key = _header(request, b"sec-websocket-key").strip()
        if not ws_key or _header(request, b"sec-websocket-version").strip() != "13":
            return self._error(400, "bad WebSocket handshake")
        values = parse_qs(query).get(HANDSHAKE_HEADER)
        if not values:
            return self._error(400, "missing Tailscale handshake parameter")
        try:
            initiation = base64.b64decode(values[0], validate=True)
        except (binascii.Error, ValueError):
            return self._error(400, "invalid tailscale handshake parameter")
        if not self._await_end_of_message():
            return self._error(400, "request body not allowed on /ts2021")
        accept = base64.b64encode(hashlib.sha1(ws_key.encode("latin-1") + _WS_GUID).digest())
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n"
            b"Sec-WebSocket-Protocol: " + UPGRADE_TOKEN.encode("ascii") + b"\r\n"
            b"\r\n"
        )
        return self._finish(
            WebSocketUpgrade(
                initiation=initiation, response=response, trailing=self._h11.trailing_data[0]
            )
        )


# -- client half ------------------------------------------------------------------


def build_key_request(host: str, version: int) -> bytes:
    """``GET /key?v=<version>`` as HTTP/1.1 bytes (``Connection: close``)."""
    return (
        f"GET {KEY_PATH}?v={version} HTTP/1.1\r\nHost: {host}\r\n"
        f"User-Agent: tailledger\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")


def parse_key_response(body: bytes) -> bytes:
    """Extract the server's Noise public key from a ``/key`` body.

    Raises:
        RemoteProtocolError: Not the expected JSON, or a zero key.
    """
    try:
        decoded = tailcfg.decode(body, tailcfg.OverTLSPublicKeyResponse)
        key = tailcfg.parse_key(tailcfg.KeyPrefix.MACHINE, decoded.public_key)
    except ValueError as exc:  # msgspec errors and KeyFormatError are ValueErrors
        raise RemoteProtocolError(f"bad /key response: {exc}") from None
    if key is None:
        raise RemoteProtocolError("control server is too old; no noise key")
    return key


def build_upgrade_request(host: str, initiation: bytes, path: str = UPGRADE_PATH) -> bytes:
    """The native upgrade request, shaped like Go's (§3.2)."""
    encoded = base64.b64encode(initiation).decode("ascii")
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tailledger\r\n"
        f"Content-Length: 0\r\nConnection: upgrade\r\nUpgrade: {UPGRADE_TOKEN}\r\n"
        f"{HANDSHAKE_HEADER}: {encoded}\r\n\r\n"
    ).encode("latin-1")


@dataclass(frozen=True, slots=True)
class UpgradeResult:
    """The 101 arrived; ``trailing`` are the bytes after its head."""

    trailing: bytes


class UpgradeResponseReader:
    """Client side: wait for the 101 and check it like ``tryURLUpgrade``.

    Feed bytes until :meth:`receive_data` returns an :class:`UpgradeResult`.
    """

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.CLIENT)
        # Teach h11 that we sent an upgrade request, so it expects a 101.
        self._h11.send(
            h11.Request(
                method="POST",
                target=UPGRADE_PATH,
                headers=[
                    ("Host", "x"),
                    ("Content-Length", "0"),
                    ("Connection", "upgrade"),
                    ("Upgrade", UPGRADE_TOKEN),
                ],
            )
        )
        self._h11.send(h11.EndOfMessage())

    def receive_data(self, data: bytes) -> UpgradeResult | None:
        """Feed bytes (``b""`` = EOF); return the result once the 101 is in.

        Raises:
            RemoteProtocolError: EOF, a non-101 status (``http_status`` set),
                or a wrong ``Upgrade`` header.
        """
        if not data:
            raise RemoteProtocolError("connection closed before the 101")
        try:
            self._h11.receive_data(data)
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    return None
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code != 101:
                        continue  # 1xx other than 101: keep reading
                    upgrade = ""
                    for name, value in event.headers:
                        if name == b"upgrade":
                            upgrade = bytes(value).decode("latin-1")
                    if upgrade != UPGRADE_TOKEN:
                        raise RemoteProtocolError(f"101 with unexpected Upgrade {upgrade[:40]!r}")
                    return UpgradeResult(trailing=bytes(self._h11.trailing_data[0]))
                if isinstance(event, h11.Response):
                    raise RemoteProtocolError(
                        f"unexpected HTTP response {event.status_code} to the upgrade",
                        http_status=event.status_code,
                    )
                if isinstance(event, h11.ConnectionClosed):
                    raise RemoteProtocolError("connection closed before the 101")
                if event is h11.PAUSED:
                    return None
        except h11.ProtocolError as exc:
            raise RemoteProtocolError(f"bad HTTP response to the upgrade: {exc}") from None
