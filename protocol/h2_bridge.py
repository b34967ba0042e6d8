"""Server side of one ts2021 connection after the 101: Noise <-> HTTP/2 (sans-I/O).

Role in the pipeline::

    TCP/TLS bytes  <->  NoiseTransport  <->  [early payload]  <->  h2.H2Connection
                                 (this module glues the three)          |
                                                                        v
                                       RequestReceived(NoiseRequest) -> ControlHandler

:class:`ServerConnection` is created from the client's handshake initiation
(already decoded from the ``X-Tailscale-Handshake`` header by the HTTP/1.1
front, :mod:`protocol.upgrade`). It answers the handshake, then runs a server
``h2`` connection with prior knowledge over the decrypted byte stream. The
trio adapter (:mod:`protocol.serve`) only moves bytes and runs handler tasks.

Order of the first bytes the server writes (docs/control-protocol.md §3.3, §5)::

    51-byte Noise response (raw)  ||  Noise records: early payload || SETTINGS

They leave in one write (Go "corks" the socket for the same effect). The
server must send SETTINGS at once, without waiting for the client preface,
and nothing may precede the early payload.

Behaviour required by Go clients (§5.2): several concurrent streams (map long
poll + lite updates + register), flow control honoured for large responses
(:class:`~protocol.h2flow.OutboundQueues`), ``acknowledge_received_data`` for
request bodies, PINGs answered (``h2`` does it), ``RST_STREAM`` on a stream
ends its response (:class:`~protocol.h2flow.StreamReset`, the adapter cancels the handler).

Invariants:

* Only :class:`~protocol.errors.RemoteProtocolError` escapes
  :meth:`ServerConnection.receive_data` for peer input (Noise or HTTP/2
  garbage); afterwards the connection is in ``ERROR`` and
  :meth:`ServerConnection.data_to_send` still yields ``h2``'s GOAWAY so the
  adapter can flush it before closing.
* Request bodies are capped (``max_body_size``, 1 MiB like Headscale,
  pitfall 18): an oversized request is answered 413 by this core and reset
  with NO_ERROR, and its bytes are still acknowledged so the connection
  window never stalls.
* Requests reach the handler only once complete (END_STREAM seen). The
  bytes of incomplete bodies held per connection are capped
  (``max_buffered_bodies``); a stream that would exceed it is answered 503
  and reset, so memory per connection stays bounded without risking the
  flow-control deadlock that withholding WINDOW_UPDATEs could cause.
* Deadlines are the adapter's (this core reads no clock): it learns which
  request bodies are still incomplete from :meth:`ServerConnection.partial_streams`,
  answers one that took too long with :meth:`ServerConnection.expire_request`
  (408, then reset), and watches :meth:`ServerConnection.buffered_outgoing`,
  the bytes this core holds that the peer has not taken yet, to close slow
  readers.
* An idle connection (the usual state of a node's tunnel, for days) holds
  no handshake leftovers, no cipher objects and none of ``h2``'s deque-based
  settings or HPACK tables (:mod:`protocol.compat`), and ``h2`` remembers at
  most ``max(max_concurrent_streams, 100)`` closed streams instead of 65536.
  ``tests/protocol/test_transport_memory.py`` checks the first three.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .compat import CompactH2Connection, CompactSettings, compact_header_tables, unsent_bytes
from .early import encode_early_payload
from .errors import LocalProtocolError, RemoteProtocolError
from .h2flow import CommonEvent, OutboundQueues, translate_common
from .handler import Headers, NoiseRequest
from .noise.handshake import Keypair, respond
from .noise.transport import NoiseTransport

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "RequestReceived",
    "RequestRejected",
    "ServerConnection",
    "ServerEvent",
    "ServerState",
]

log = logging.getLogger(__name__)

#: Request body cap inside the tunnel (Headscale ``noiseBodyLimit``).
DEFAULT_MAX_BODY_SIZE: Final = 1 << 20
#: Cap on the bytes of *incomplete* request bodies buffered per connection.
#: Bodies are acknowledged (flow control) as they arrive, so without it 250
#: half-sent 1 MiB bodies would pin 250 MiB. Real clients send a few KiB.
DEFAULT_MAX_BUFFERED_BODIES: Final = 4 << 20
#: Go's http2.Server default; a map poll, lite updates and a register overlap.
DEFAULT_MAX_CONCURRENT_STREAMS: Final = 250
#: ``PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n``, the client connection preface.
_CLIENT_PREFACE_LEN: Final = 24
#: Bound on the decoded request header list.
DEFAULT_MAX_HEADER_LIST_SIZE: Final = 64 << 10
#: Floor of how many closed streams ``h2`` remembers (see :class:`CompactH2Connection`).
_MIN_CLOSED_STREAMS_MEMORY: Final = 100

#: One configuration for every server connection: ``h2`` only ever reads it,
#: so sharing it saves an object per connection.
_H2_CONFIG: Final = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,  # bytes: we decode as Latin-1, which cannot fail
    validate_inbound_headers=True,
    normalize_inbound_headers=True,
    validate_outbound_headers=True,
)

# Connection-specific headers are illegal in HTTP/2 (RFC 9113 §8.2.2).
_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}
)
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE: Final = re.compile(r"[\r\n\x00]")


# -- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A complete request; run the handler for it."""

    stream_id: int
    request: NoiseRequest


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """The core answered the request itself (e.g. 413); only log it."""

    stream_id: int
    status: int
    reason: str


#: The server's events: its own two, and the three both ends share (:mod:`protocol.h2flow`).
ServerEvent = RequestReceived | RequestRejected | CommonEvent


# -- state machine ------------------------------------------------------------


class ServerState(Enum):
    """Lifecycle of a :class:`ServerConnection`."""

    HANDSHAKEN = auto()  # keys derived; start() not called yet
    OPEN = auto()  # response + SETTINGS handed out; exchanging records
    CLOSED = auto()  # we sent GOAWAY / gave up cleanly
    ERROR = auto()  # peer sent garbage or a write failed; terminal


class _Input(Enum):
    START = auto()
    RECEIVE = auto()
    SEND = auto()
    CLOSE = auto()
    FAIL = auto()


_TRANSITIONS: Final[dict[tuple[ServerState, _Input], ServerState]] = {
    (ServerState.HANDSHAKEN, _Input.START): ServerState.OPEN,
    (ServerState.HANDSHAKEN, _Input.CLOSE): ServerState.CLOSED,
    (ServerState.HANDSHAKEN, _Input.FAIL): ServerState.ERROR,
    (ServerState.OPEN, _Input.RECEIVE): ServerState.OPEN,
    (ServerState.OPEN, _Input.SEND): ServerState.OPEN,
    (ServerState.OPEN, _Input.CLOSE): ServerState.CLOSED,
    (ServerState.OPEN, _Input.FAIL): ServerState.ERROR,
    (ServerState.CLOSED, _Input.CLOSE): ServerState.CLOSED,
    (ServerState.CLOSED, _Input.FAIL): ServerState.ERROR,
    (ServerState.ERROR, _Input.CLOSE): ServerState.ERROR,
    (ServerState.ERROR, _Input.FAIL): ServerState.ERROR,
}


class _FrameSizeGuard:
    """Reject an oversized HTTP/2 frame from its 9-byte header alone.

    ``h2``'s frame buffer checks a frame's length only once the *whole* frame
    has arrived, so a peer announcing a 16 MiB frame makes it buffer 16 MiB
    first. Anyone can complete the Noise handshake, so this guard tracks frame
    boundaries in the decrypted stream itself and fails fast, before buffering.
    """

    __slots__ = ("_header", "_max_frame", "_preface_left", "_skip")

    _FRAME_HEADER = 9

    def __init__(self, *, preface_len: int, max_frame: int) -> None:
        self._preface_left = preface_len
        self._max_frame = max_frame
        self._header = b""
        self._skip = 0  # payload bytes of the current frame still to pass

    def check(self, data: bytes) -> int | None:
        """Scan ``data``; return the length of the first oversized frame, if any."""
        pos = min(self._preface_left, len(data))
        self._preface_left -= pos
        end = len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            need = self._FRAME_HEADER - len(self._header)
            self._header += data[pos : pos + need]
            pos += need
            if len(self._header) >= 3:  # the 24-bit length is known: judge it now
                length = int.from_bytes(self._header[:3], "big")
                if length > self._max_frame:
                    return length
                if len(self._header) == self._FRAME_HEADER:
                    self._skip = length
                    self._header = b""
        return None


@dataclass(slots=True)
class _PartialRequest:
    method: str
    path: str
    headers: Headers
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


def clean_response_headers(headers: Headers) -> tuple[list[tuple[str, str]], list[str]]:
    """Lower-case names and drop headers HTTP/2 forbids or cannot carry.

    Returns:
        ``(kept, dropped_names)``.
    """
    kept: list[tuple[str, str]] = []
    dropped: list[str] = []
    for name, value in headers:
        lower = name.lower()
        if lower in _HOP_BY_HOP or not _TOKEN.fullmatch(lower) or _BAD_VALUE.search(value):
            dropped.append(name)
            continue
        kept.append((lower, value))
    return kept, dropped


class ServerConnection:
    """One upgraded ts2021 connection, server side, without I/O.

    Typical adapter loop::

        conn = ServerConnection(server_private=key, initiation=init, challenge_public=chal)
        await stream.send_all(UPGRADE_101 + conn.start())
        while data := await stream.receive_some():
            for event in conn.receive_data(data):
                ...                       # start handler tasks, cancel on StreamReset
            await stream.send_all(conn.data_to_send())

    Attributes:
        keys: The handshake outcome; ``keys.peer_static`` is the machine key.
        state: The current :class:`ServerState`.
    """

    # One instance per connected node, alive for days: no per-instance dict.
    __slots__ = (
        "_buffered",
        "_early",
        "_guard",
        "_h2",
        "_max_body",
        "_max_buffered",
        "_noise",
        "_outbound",
        "_partial",
        "_response",
        "error",
        "keys",
        "state",
    )

    def __init__(
        self,
        *,
        server_private: bytes | Keypair,
        initiation: bytes,
        challenge_public: bytes | None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        max_buffered_bodies: int = DEFAULT_MAX_BUFFERED_BODIES,
        ephemeral_private: bytes | None = None,
    ) -> None:
        """Answer the handshake (keys are derived immediately).

        Args:
            server_private: The server's Noise private key (a reused
                :class:`~protocol.noise.handshake.Keypair` saves a key load).
            initiation: The 101-byte initiation from the upgrade request.
            challenge_public: Key for the early payload's ``nodeKeyChallenge``;
                ``None`` sends no early payload (the WebSocket path).
            max_body_size: Request body cap in bytes.
            max_concurrent_streams: Advertised ``SETTINGS_MAX_CONCURRENT_STREAMS``.
            max_buffered_bodies: Cap on incomplete request-body bytes held
                at once on this connection.
            ephemeral_private: Inject the handshake ephemeral (tests only).

        Raises:
            HandshakeError: Malformed initiation or failed authentication;
                nothing was sent yet (the adapter may send
                :func:`~protocol.noise.messages.encode_error`).
        """
        # Both are sent once by start() and then dropped (an idle tunnel
        # holds no handshake leftovers).
        self._response, self.keys = respond(
            server_private, initiation, ephemeral_private=ephemeral_private
        )
        self._early = encode_early_payload(challenge_public) if challenge_public else b""
        self._noise = NoiseTransport(self.keys)
        self._max_body = max_body_size
        self._max_buffered = max_buffered_bodies
        self._buffered = 0  # sum of _PartialRequest.size over self._partial
        self._h2 = CompactH2Connection(
            _H2_CONFIG, closed_streams=max(max_concurrent_streams, _MIN_CLOSED_STREAMS_MEMORY)
        )
        # Replaced before any frame moves, so h2 never used its own (deque-
        # based, ~4.5 KiB each) Settings; see protocol.compat.CompactSettings.
        self._h2.local_settings = CompactSettings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: DEFAULT_MAX_HEADER_LIST_SIZE,
                # No HPACK dynamic tables, either way: a long poll sends one request
                # and one response, so an idle tunnel would keep its headers for
                # nothing (~1 KiB); a lite update costs a few dozen bytes more.
                h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0,
            },
        )
        self._h2.encoder.header_table_size = 0
        self._h2.remote_settings = CompactSettings(client=True)
        compact_header_tables(self._h2)
        self._outbound = OutboundQueues(self._h2)
        self._guard = _FrameSizeGuard(
            preface_len=_CLIENT_PREFACE_LEN, max_frame=self._h2.max_inbound_frame_size
        )
        self._partial: dict[int, _PartialRequest] = {}
        self.state = ServerState.HANDSHAKEN
        self.error: RemoteProtocolError | None = None

    # -- properties -------------------------------------------------------------

    @property
    def machine_key(self) -> bytes:
        """The client's machine public key, proven by the handshake."""
        return self.keys.peer_static

    @property
    def protocol_version(self) -> int:
        """The client's protocol (capability) version from the initiation."""
        return self.keys.version

    def _advance(self, event: _Input) -> None:
        next_state = _TRANSITIONS.get((self.state, event))
        if next_state is None:
            if self.state is ServerState.ERROR and self.error is not None:
                raise RemoteProtocolError(f"connection failed earlier: {self.error.reason}")
            raise LocalProtocolError(f"{event.name} not allowed in state {self.state.name}")
        self.state = next_state

    # -- starting -----------------------------------------------------------------

    def start(self) -> bytes:
        """Return the server's first bytes: response, early payload, SETTINGS.

        The 51-byte handshake response is raw; the early payload and the
        HTTP/2 connection preface (SETTINGS) are sealed in Noise records.
        """
        self._advance(_Input.START)
        self._h2.initiate_connection()
        first = self._response + self._noise.send(self._early + self._h2.data_to_send())
        self._response = self._early = b""
        return first

    # -- receiving ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[ServerEvent]:
        """Feed bytes from the socket; return what the adapter must act on.

        Raises:
            RemoteProtocolError: Bad Noise record or HTTP/2 violation. Sticky;
                :meth:`data_to_send` may still hold a GOAWAY to flush.
            LocalProtocolError: Called before :meth:`start` or after close.
        """
        self._advance(_Input.RECEIVE)
        try:
            plaintext = self._noise.receive_data(data)
            if not plaintext:
                return []
            oversized = self._guard.check(plaintext)
            if oversized is not None:
                self._h2.close_connection(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
                raise RemoteProtocolError(
                    f"HTTP/2 frame of {oversized} bytes exceeds SETTINGS_MAX_FRAME_SIZE"
                )
            h2_events = self._h2.receive_data(plaintext)
        except RemoteProtocolError as exc:
            raise self._fail(exc) from None
        except h2.exceptions.ProtocolError as exc:
            raise self._fail(RemoteProtocolError(f"HTTP/2 error: {exc}")) from None
        events: list[ServerEvent] = []
        for ev in h2_events:
            self._handle_h2_event(ev, events)
        # Windows may have grown (WINDOW_UPDATE, SETTINGS): push queued bodies.
        self._outbound.flush()
        return events

    def _fail(self, exc: RemoteProtocolError) -> RemoteProtocolError:
        if self.error is None:
            self.error = exc
        self._advance(_Input.FAIL)
        return exc

    def _handle_h2_event(self, ev: h2.events.Event, out: list[ServerEvent]) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._on_request_headers(ev, out)
        elif isinstance(ev, h2.events.DataReceived):
            self._on_data(ev, out)
        elif isinstance(ev, h2.events.StreamEnded):
            self._on_stream_ended(ev, out)
        else:
            if isinstance(ev, h2.events.StreamReset):
                assert ev.stream_id is not None
                self._drop_partial(ev.stream_id)
            elif isinstance(ev, h2.events.RemoteSettingsChanged) and (
                h2.settings.SettingCodes.HEADER_TABLE_SIZE in ev.changed_settings
            ):
                # The peer's value is a limit; our encoder keeps using no table.
                self._h2.encoder.header_table_size = 0
            # None for PingReceived (h2 already queued the ACK), SettingsAcknowledged,
            # PriorityUpdated, TrailersReceived, UnknownFrameReceived: nothing to do.
            common = translate_common(ev, self._outbound)
            if common is not None:
                out.append(common)

    def _on_request_headers(self, ev: h2.events.RequestReceived, out: list[ServerEvent]) -> None:
        assert ev.stream_id is not None
        assert ev.headers is not None
        method = path = ""
        headers: list[tuple[str, str]] = []
        content_length: int | None = None
        for raw_name, raw_value in ev.headers:
            name = bytes(raw_name).decode("latin-1")
            value = bytes(raw_value).decode("latin-1")
            if name == ":method":
                method = value
            elif name == ":path":
                path = value
            elif name.startswith(":"):
                continue  # :scheme, :authority: never route on them (pitfall 22)
            else:
                if name == "content-length" and value.isascii() and value.isdigit():
                    content_length = int(value)
                headers.append((name, value))
        request = _PartialRequest(method=method, path=path, headers=tuple(headers))
        self._partial[ev.stream_id] = request
        if content_length is not None and content_length > self._max_body:
            self._reject(ev.stream_id, 413, "request body too large", out)

    def _on_data(self, ev: h2.events.DataReceived, out: list[ServerEvent]) -> None:
        assert ev.stream_id is not None
        assert ev.data is not None
        # Hand the window back at once: bodies are small and capped, and a
        # rejected stream's bytes must not stall the connection window.
        flow = ev.flow_controlled_length or 0
        if flow:
            self._h2.acknowledge_received_data(flow, ev.stream_id)
        request = self._partial.get(ev.stream_id)
        if request is None:
            return  # rejected or reset stream: discard
        size = len(ev.data)
        if request.size + size > self._max_body:
            self._reject(ev.stream_id, 413, "request body too large", out)
            return
        if self._buffered + size > self._max_buffered:
            self._reject(ev.stream_id, 503, "too much request data in flight", out)
            return
        request.size += size
        self._buffered += size
        request.chunks.append(bytes(ev.data))

    def _on_stream_ended(self, ev: h2.events.StreamEnded, out: list[ServerEvent]) -> None:
        assert ev.stream_id is not None
        request = self._drop_partial(ev.stream_id)
        if request is None:
            return
        out.append(
            RequestReceived(
                stream_id=ev.stream_id,
                request=NoiseRequest(
                    machine_key=self.keys.peer_static,
                    method=request.method,
                    path=request.path,
                    headers=request.headers,
                    body=b"".join(request.chunks),
                    protocol_version=self.keys.version,
                ),
            )
        )

    def _drop_partial(self, stream_id: int) -> _PartialRequest | None:
        """Forget an incomplete request, keeping the buffered-bytes count exact."""
        request = self._partial.pop(stream_id, None)
        if request is not None:
            self._buffered -= request.size
            if not self._partial:
                self._partial = {}  # drop the table the dict grew (idle tunnels)
        return request

    def _reject(self, stream_id: int, status: int, reason: str, out: list[ServerEvent]) -> None:
        """Answer ``status`` ourselves and ask the client to stop sending."""
        self._drop_partial(stream_id)
        body = reason.encode("ascii")
        try:
            self._h2.send_headers(
                stream_id,
                [
                    (":status", str(status)),
                    ("content-type", "text/plain; charset=utf-8"),
                    ("content-length", str(len(body))),
                ],
            )
        except h2.exceptions.StreamClosedError:
            return
        self._outbound.queue(stream_id, body, end_stream=True)
        if self._outbound.pending(stream_id) == 0:
            # RFC 9113 §8.1: after a complete response, RST_STREAM(NO_ERROR)
            # tells the client to abort sending the rest of the request.
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        out.append(RequestRejected(stream_id=stream_id, status=status, reason=reason))

    # -- sending ------------------------------------------------------------------

    def send_headers(
        self, stream_id: int, status: int, headers: Headers = (), *, end_stream: bool = False
    ) -> bool:
        """Send the response head of ``stream_id``.

        Forbidden or malformed headers are dropped (and logged).

        Returns:
            ``False`` if the stream is already gone (reset by the client).

        Raises:
            LocalProtocolError: Wrong state, or headers already sent.
        """
        self._advance(_Input.SEND)
        kept, dropped = clean_response_headers(headers)
        if dropped:
            log.warning("dropped response headers illegal in HTTP/2: %s", dropped)
        try:
            self._h2.send_headers(
                stream_id, [(":status", str(status)), *kept], end_stream=end_stream
            )
        except h2.exceptions.StreamClosedError:
            return False
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(f"cannot send headers on stream {stream_id}: {exc}") from None
        return True

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue body bytes; they leave as flow control allows.

        Use :meth:`pending` to apply backpressure: wait (for a
        :class:`~protocol.h2flow.WindowUpdated` event) until it drops before queueing more.

        Raises:
            LocalProtocolError: Wrong state or stream state (our bug).
        """
        self._advance(_Input.SEND)
        try:
            self._outbound.queue(stream_id, data, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(f"cannot send data on stream {stream_id}: {exc}") from None

    def pending(self, stream_id: int) -> int:
        """Bytes of ``stream_id`` still waiting for flow-control window."""
        return self._outbound.pending(stream_id)

    def buffered_outgoing(self) -> int:
        """Bytes this core holds for the peer: DATA waiting for flow-control
        window plus frames not yet taken by :meth:`data_to_send`.

        The adapter adds what it took but could not write yet; together that is
        the connection's outgoing buffer, which it caps (slow readers).
        ``h2`` does not say how much output it holds; :func:`compat.unsent_bytes`
        reads it (item 7 there).
        """
        return self._outbound.queued() + unsent_bytes(self._h2)

    def partial_streams(self) -> Collection[int]:
        """Streams whose request head arrived but whose body is not complete yet."""
        return self._partial.keys()

    def expire_request(self, stream_id: int) -> bool:
        """Give up on an incomplete request body: answer 408 and reset the stream.

        Returns:
            Whether ``stream_id`` was still incomplete (else nothing happens).
        """
        if stream_id not in self._partial or self.state is not ServerState.OPEN:
            return False
        self._reject(stream_id, 408, "request body not received in time", [])
        return True

    def reset_stream(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Reset a stream (handler failed after its headers were sent); never raises.

        A stream or connection that ``h2`` already considers closed (the
        peer reset the stream, or sent GOAWAY) has nothing left to reset.
        """
        self._outbound.discard(stream_id)
        if self.state is not ServerState.OPEN:
            return
        # StreamClosedError, NoSuchStreamError, and the connection-level
        # ProtocolError of a connection closed by the peer's GOAWAY.
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, error_code)

    def close(self, error_code: int = h2.errors.ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY (if still open) and stop accepting input."""
        if self.state is ServerState.OPEN:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(error_code, reason.encode("ascii", "replace") or None)
        self._advance(_Input.CLOSE)

    def data_to_send(self) -> bytes:
        """Return sealed bytes to write to the socket (``b""`` if none).

        Works in ``ERROR`` and ``CLOSED`` too, to flush a final GOAWAY,
        unless a write failed before (:meth:`send_failed`).
        """
        if self.state is ServerState.HANDSHAKEN:
            return b""
        plaintext = self._h2.data_to_send()
        if not plaintext:
            return b""
        try:
            return self._noise.send(plaintext)
        except LocalProtocolError:
            return b""  # the transport is poisoned or closed: nothing can go out

    def send_failed(self) -> None:
        """Tell the core that writing its output failed; poisons the connection."""
        self._noise.send_failed()
        if self.state is not ServerState.ERROR:
            self.error = RemoteProtocolError("write to the peer failed")
            self._advance(_Input.FAIL)
