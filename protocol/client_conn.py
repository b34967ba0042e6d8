"""Client side of one ts2021 connection: upgrade, Noise, HTTP/2 (sans-I/O).

Role in the pipeline: the counterpart of :class:`protocol.h2_bridge.ServerConnection`,
used by our tests and by the load generator through the trio adapter in
:mod:`protocol.client`. It speaks exactly what Go's ``controlhttp`` +
``controlbase`` + ``net/http`` (HTTP/2 with prior knowledge) speak::

    POST /ts2021 (X-Tailscale-Handshake: base64(initiation)) ->
                                      <- HTTP/1.1 101 + 51-byte response
    [Noise records from here on]
                                      <- [early payload] SETTINGS ...
    PRI * HTTP/2.0 preface, SETTINGS, HEADERS/DATA ...  ->

State machine (style rule 15), driven by :meth:`ClientConnection.receive_data`:

====================  ===============  ====================
state                 input            next state
====================  ===============  ====================
AWAIT_UPGRADE         GOT_101          AWAIT_RESPONSE
AWAIT_RESPONSE        HANDSHAKE_DONE   AWAIT_EARLY
AWAIT_EARLY           EARLY_DONE       OPEN
OPEN                  DATA             OPEN
any live state        CLOSE            CLOSED
any state             FAIL             ERROR
====================  ===============  ====================

Requests may be queued at any time: ``h2`` buffers their frames and
:meth:`ClientConnection.data_to_send` releases them, sealed, once the
handshake is done (Go writes its preface right after the handshake, too).

Response bodies are acknowledged (flow control) only when the application
calls :meth:`ClientConnection.acknowledge`, so a slow consumer pushes back on
the server: that is how the tests exercise the server's flow control.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from projections import tailcfg

from .early import EarlyPayloadReader
from .errors import HandshakeError, LocalProtocolError, ProtocolError, RemoteProtocolError
from .h2flow import CommonEvent, OutboundQueues, translate_common
from .handler import Headers
from .noise import messages
from .noise.handshake import ClientHandshake, Keypair, SessionKeys
from .noise.transport import NoiseTransport
from .upgrade import UpgradeResponseReader, build_upgrade_request

__all__ = [
    "DEFAULT_VERSION",
    "ClientConnection",
    "ClientEvent",
    "ClientState",
    "DataReceived",
    "EarlyPayloadReceived",
    "HandshakeComplete",
    "PingAcknowledged",
    "ResponseReceived",
    "StreamEnded",
]

#: Capability version of tailscale v1.90 (the client we mimic by default).
DEFAULT_VERSION: Final = 130
#: Every HTTP/2 window's size before SETTINGS or WINDOW_UPDATE (RFC 9113 §6.9.2).
_DEFAULT_WINDOW: Final = 65535


# -- events -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The Noise handshake succeeded."""

    keys: SessionKeys


@dataclass(frozen=True, slots=True)
class EarlyPayloadReceived:
    """The server's early payload (``None``: it sent none); HTTP/2 follows."""

    early: tailcfg.EarlyNoise | None


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Response head of ``stream_id``."""

    stream_id: int
    status: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Body bytes; pass ``flow_controlled_length`` to :meth:`ClientConnection.acknowledge`."""

    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The server finished the response of ``stream_id``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """The server answered our PING (round-trip measurements)."""

    opaque: bytes


#: The client's events: its own six, and the three both ends share (:mod:`protocol.h2flow`).
ClientEvent = (
    HandshakeComplete
    | EarlyPayloadReceived
    | ResponseReceived
    | DataReceived
    | StreamEnded
    | PingAcknowledged
    | CommonEvent
)


# -- state machine ----------------------------------------------------------------


class ClientState(Enum):
    """Lifecycle of a :class:`ClientConnection`."""

    AWAIT_UPGRADE = auto()
    AWAIT_RESPONSE = auto()
    AWAIT_EARLY = auto()
    OPEN = auto()
    CLOSED = auto()
    ERROR = auto()


class _Input(Enum):
    GOT_101 = auto()
    HANDSHAKE_DONE = auto()
    EARLY_DONE = auto()
    DATA = auto()
    CLOSE = auto()
    FAIL = auto()


_LIVE: Final = (
    ClientState.AWAIT_UPGRADE,
    ClientState.AWAIT_RESPONSE,
    ClientState.AWAIT_EARLY,
    ClientState.OPEN,
)

_TRANSITIONS: Final[dict[tuple[ClientState, _Input], ClientState]] = {
    (ClientState.AWAIT_UPGRADE, _Input.GOT_101): ClientState.AWAIT_RESPONSE,
    (ClientState.AWAIT_RESPONSE, _Input.HANDSHAKE_DONE): ClientState.AWAIT_EARLY,
    (ClientState.AWAIT_EARLY, _Input.EARLY_DONE): ClientState.OPEN,
    (ClientState.OPEN, _Input.DATA): ClientState.OPEN,
    **{(state, _Input.CLOSE): ClientState.CLOSED for state in _LIVE},
    (ClientState.CLOSED, _Input.CLOSE): ClientState.CLOSED,
    **{(state, _Input.FAIL): ClientState.ERROR for state in ClientState},
}


class ClientConnection:
    """One client connection to a ts2021 server, without I/O.

    Usage::

        conn = ClientConnection(machine_private=m, server_public=s, host="ctl:80")
        await stream.send_all(conn.data_to_send())          # the upgrade request
        sid = conn.send_request("POST", "/machine/register", body=b"{...}")
        while not done:
            for event in conn.receive_data(await stream.receive_some()):
                ...
            await stream.send_all(conn.data_to_send())

    Attributes:
        state: The current :class:`ClientState`.
        keys: Session keys once the handshake completed, else ``None``.
        early: The server's early payload, once known.
    """

    def __init__(
        self,
        *,
        machine_private: bytes | Keypair,
        server_public: bytes,
        host: str,
        version: int = DEFAULT_VERSION,
        authority: str | None = None,
        initial_window_size: int | None = None,
        connection_window_size: int | None = None,
        max_frame_size: int | None = None,
        http_upgrade: bool = True,
        ephemeral_private: bytes | None = None,
    ) -> None:
        """Prepare the upgrade request (the handshake initiation is computed now).

        Args:
            machine_private: Our machine key (the server learns its public half).
            server_public: The server's Noise key from ``/key``.
            host: ``Host`` of the upgrade request (``host[:port]``).
            version: Capability / protocol version (130 = v1.90).
            authority: ``:authority`` of tunnel requests (default ``host``).
            initial_window_size: Our HTTP/2 stream receive window (default:
                h2's 65535); small values make the server wait for
                WINDOW_UPDATEs.
            connection_window_size: Our HTTP/2 connection receive window
                (default: the protocol's 65535). A connection window starts at
                65535 whatever SETTINGS say and only grows by WINDOW_UPDATE, so
                the update is sent with the preface, as Go's transport does
                (4 MiB streams, 1 GiB connection).
            max_frame_size: Our ``SETTINGS_MAX_FRAME_SIZE``, the largest DATA
                frame the server may send us (default: the protocol's 16384).
                Go's transport advertises its ``MaxReadFrameSize``, 1 MiB by
                default, so a large body comes in few frames.
            http_upgrade: Emit the native ``POST /ts2021`` request and expect
                the 101. ``False`` when the caller performed another upgrade
                (the WebSocket variant) and sends :attr:`initiation` itself;
                the connection then starts by awaiting the handshake response.
            ephemeral_private: Inject the handshake ephemeral (tests only).
        """
        self._handshake = ClientHandshake(
            machine_private, server_public, version, ephemeral_private=ephemeral_private
        )
        self._raw_out = bytearray(
            build_upgrade_request(host, self._handshake.initiation) if http_upgrade else b""
        )
        self._authority = authority or host
        self._upgrade = UpgradeResponseReader()
        self._handshake_buf = bytearray()
        self._early_reader = EarlyPayloadReader()
        self._noise: NoiseTransport | None = None
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=True
        )
        self._h2 = h2.connection.H2Connection(config=config)
        initial_values: dict[h2.settings.SettingCodes, int] = {}
        if initial_window_size is not None:
            initial_values[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = initial_window_size
        if max_frame_size is not None:
            initial_values[h2.settings.SettingCodes.MAX_FRAME_SIZE] = max_frame_size
        if initial_values:
            # Sent with the preface as our first SETTINGS; h2 takes initial values as
            # in force already, so its inbound frame limit must follow by hand (the
            # server sends larger frames only once it has read them: never too early).
            self._h2.local_settings = h2.settings.Settings(client=True, initial_values=initial_values)
            self._h2.max_inbound_frame_size = self._h2.local_settings.max_frame_size
        self._h2.initiate_connection()
        grow = (connection_window_size or 0) - _DEFAULT_WINDOW
        if grow > 0:
            self._h2.increment_flow_control_window(grow)
        self._outbound = OutboundQueues(self._h2)
        self.state = ClientState.AWAIT_UPGRADE if http_upgrade else ClientState.AWAIT_RESPONSE
        self.keys: SessionKeys | None = None
        self.early: tailcfg.EarlyNoise | None = None
        self.error: ProtocolError | None = None

    @property
    def initiation(self) -> bytes:
        """The 101-byte handshake initiation (for a caller-driven upgrade)."""
        return self._handshake.initiation

    def _advance(self, event: _Input) -> None:
        """Apply one transition of the table; an absent pair is our bug.

        After a failure the original peer error is re-raised instead, so a
        caller that ignores one exception still cannot use a broken core.
        """
        next_state = _TRANSITIONS.get((self.state, event))
        if next_state is None:
            if self.error is not None:
                raise RemoteProtocolError(f"connection failed earlier: {self.error.reason}")
            raise LocalProtocolError(f"{event.name} not allowed in state {self.state.name}")
        self.state = next_state

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        """Move to ERROR, remembering the first cause (sticky), and return ``exc``."""
        if self.error is None:
            self.error = exc
        self._advance(_Input.FAIL)
        return exc

    # -- receiving ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        """Feed bytes from the socket (``b""`` = EOF); return events.

        Raises:
            RemoteProtocolError: Non-101 answer, bad handshake response (a
                :class:`~protocol.errors.HandshakeError`, including the
                server's error message), bad records, HTTP/2 violations, or
                EOF during the upgrade. Sticky.
            LocalProtocolError: Used after :meth:`close`.
        """
        if self.state is ClientState.ERROR and self.error is not None:
            raise RemoteProtocolError(f"connection failed earlier: {self.error.reason}")
        if self.state is ClientState.CLOSED:
            raise LocalProtocolError("connection is closed")
        events: list[ClientEvent] = []
        try:
            self._receive(data, events)
        except ProtocolError as exc:
            raise self._fail(exc) from None
        except h2.exceptions.ProtocolError as exc:
            raise self._fail(RemoteProtocolError(f"HTTP/2 error: {exc}")) from None
        return events

    def _receive(self, data: bytes, events: list[ClientEvent]) -> None:
        """Push ``data`` down the layers the current state has reached.

        One TCP read may span several layers at once (the 101 head, the
        51-byte response and the first records usually arrive together), so
        each stage hands its leftover bytes to the next within the same call.
        """
        if self.state is ClientState.AWAIT_UPGRADE:
            result = self._upgrade.receive_data(data)
            if result is None:
                return
            self._advance(_Input.GOT_101)
            data = result.trailing
            if not data:
                return
        if self.state is ClientState.AWAIT_RESPONSE:
            if data == b"":
                raise HandshakeError("connection closed during the handshake")
            data = self._receive_handshake(data, events)
            if self.state is ClientState.AWAIT_RESPONSE or not data:
                return
        if not data:
            raise RemoteProtocolError("connection closed by the server")
        assert self._noise is not None
        plaintext = self._noise.receive_data(data)
        if not plaintext:
            return
        if self.state is ClientState.AWAIT_EARLY:
            early = self._early_reader.receive_data(plaintext)
            if early is None:
                return
            self.early = early.early
            self._advance(_Input.EARLY_DONE)
            events.append(EarlyPayloadReceived(early=early.early))
            plaintext = early.remainder
            if not plaintext:
                return
        self._advance(_Input.DATA)
        for ev in self._h2.receive_data(plaintext):
            self._translate(ev, events)
        self._outbound.flush()

    def _receive_handshake(self, data: bytes, events: list[ClientEvent]) -> bytes:
        """Collect the 51-byte response (or an error message); return the rest."""
        buf = self._handshake_buf
        buf += data
        if len(buf) < messages.HEADER_LEN:
            return b""
        msg_type, length = messages.parse_record_header(bytes(buf[: messages.HEADER_LEN]))
        if msg_type == messages.MessageType.ERROR:
            if len(buf) < messages.HEADER_LEN + length:
                return b""
            text = messages.decode_error_text(bytes(buf[3 : 3 + length]))
            raise HandshakeError(f"server error: {text!r}")
        if msg_type != messages.MessageType.RESPONSE:
            raise HandshakeError(f"unexpected response message type {msg_type}")
        if len(buf) < messages.RESPONSE_LEN:
            return b""
        self.keys = self._handshake.finish(bytes(buf[: messages.RESPONSE_LEN]))
        rest = bytes(buf[messages.RESPONSE_LEN :])
        self._handshake_buf = bytearray()
        self._noise = NoiseTransport(self.keys)
        self._advance(_Input.HANDSHAKE_DONE)
        events.append(HandshakeComplete(keys=self.keys))
        return rest

    def _translate(self, ev: h2.events.Event, events: list[ClientEvent]) -> None:
        """Map an ``h2`` event to ours; events we do not need are dropped.

        Header names and values are decoded as Latin-1 (never fails), and
        pseudo-headers other than ``:status`` are not exposed.
        """
        if isinstance(ev, h2.events.ResponseReceived):
            assert ev.stream_id is not None
            assert ev.headers is not None
            status = 0
            headers: list[tuple[str, str]] = []
            for raw_name, raw_value in ev.headers:
                name = bytes(raw_name).decode("latin-1")
                value = bytes(raw_value).decode("latin-1")
                if name == ":status":
                    status = int(value)
                elif not name.startswith(":"):
                    headers.append((name, value))
            events.append(ResponseReceived(ev.stream_id, status, tuple(headers)))
        elif isinstance(ev, h2.events.DataReceived):
            assert ev.stream_id is not None
            assert ev.data is not None
            events.append(
                DataReceived(ev.stream_id, bytes(ev.data), ev.flow_controlled_length or 0)
            )
        elif isinstance(ev, h2.events.StreamEnded):
            assert ev.stream_id is not None
            events.append(StreamEnded(ev.stream_id))
        elif isinstance(ev, h2.events.PingAckReceived):
            events.append(PingAcknowledged(bytes(ev.ping_data or b"")))
        else:
            common = translate_common(ev, self._outbound)
            if common is not None:
                events.append(common)

    # -- sending ------------------------------------------------------------------

    def send_request(
        self,
        method: str,
        path: str,
        *,
        headers: Headers = (),
        body: bytes = b"",
        end_stream: bool = True,
    ) -> int:
        """Open a stream and queue a request; return its stream ID.

        Body bytes are queued behind flow control. With ``end_stream=False``
        the caller may add more with :meth:`send_body`.

        Raises:
            LocalProtocolError: The connection is closed or failed.
        """
        if self.state not in _LIVE:
            raise LocalProtocolError(f"cannot send a request in state {self.state.name}")
        stream_id = self._h2.get_next_available_stream_id()
        request_headers = [
            (":method", method),
            (":scheme", "https"),
            (":authority", self._authority),
            (":path", path),
            *((name.lower(), value) for name, value in headers),
        ]
        if body and end_stream:
            request_headers.append(("content-length", str(len(body))))
        try:
            self._h2.send_headers(stream_id, request_headers, end_stream=end_stream and not body)
            if body:
                self._outbound.queue(stream_id, body, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(f"cannot send request: {exc}") from None
        return stream_id

    def send_body(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue more request body bytes on ``stream_id``."""
        try:
            self._outbound.queue(stream_id, data, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(f"cannot send body: {exc}") from None

    def pending(self, stream_id: int) -> int:
        """Request body bytes of ``stream_id`` still waiting for window."""
        return self._outbound.pending(stream_id)

    def acknowledge(self, stream_id: int, flow_controlled_length: int) -> None:
        """Hand receive window back after the application consumed data.

        Not calling it is how a slow consumer exerts backpressure: the
        server stops once the stream (or connection) window is used up.
        """
        if flow_controlled_length and self.state in _LIVE:
            self._h2.acknowledge_received_data(flow_controlled_length, stream_id)

    def reset_stream(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon a stream (e.g. stop a map long poll)."""
        self._outbound.discard(stream_id)
        if self.state not in _LIVE:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.NoSuchStreamError:
            pass  # already closed on both sides
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(f"cannot reset stream {stream_id}: {exc}") from None

    def ping(self, opaque: bytes = b"tledger!") -> None:
        """Send an HTTP/2 PING (8 bytes of opaque data)."""
        self._h2.ping(opaque)

    def close(self) -> None:
        """Send GOAWAY (if the tunnel is up) and stop."""
        if self.state in (ClientState.AWAIT_EARLY, ClientState.OPEN):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection()
        if self.state in _LIVE:
            self._advance(_Input.CLOSE)

    def data_to_send(self) -> bytes:
        """Bytes to write: the upgrade request first, then sealed HTTP/2.

        HTTP/2 frames queued before the handshake completed stay inside
        ``h2`` until the keys exist; sealing happens here, so callers must
        write the returned bytes in the order they got them (one writer).
        """
        out = bytes(self._raw_out)
        self._raw_out.clear()
        if self._noise is not None and self.state is not ClientState.ERROR:
            plaintext = self._h2.data_to_send()
            if plaintext:
                with contextlib.suppress(LocalProtocolError):
                    out += self._noise.send(plaintext)
        return out

    def send_failed(self) -> None:
        """Tell the core a write failed; the connection is unusable."""
        if self._noise is not None:
            self._noise.send_failed()
        if self.state is not ClientState.ERROR:
            self._fail(LocalProtocolError("write to the server failed"))
