"""The client side of DERP as a sans-I/O protocol object.

Role in the pipeline
--------------------
Used by :mod:`relay.client` (our trio DERP client: tests, the benchmark, and
the mesh links between our relays).  It performs the login and turns the byte
stream from a server into typed events; the caller owns the socket.

Login as a client::

    AWAIT_SERVER_KEY --ServerKey--> AWAIT_SERVER_INFO --ServerInfo--> ACTIVE
            (ClientInfo is queued the moment the server key is known)

When the server's key is known in advance (the "fast start" form, where the
HTTP 101 is suppressed), the protocol starts in AWAIT_SERVER_INFO with the
ClientInfo already queued; the server's ServerKey frame still arrives and is
checked against the expected key.  Like Tailscale's client we may send packets
before ServerInfo arrives: a server that refuses us simply closes the stream,
which the adapter reports as :class:`~relay.errors.UnauthorizedError` when it
happens before ServerInfo.

Errors are sticky (rule 15): after a :class:`~relay.errors.RemoteProtocolError`
the protocol is CLOSED and every further call raises again.
"""

from __future__ import annotations

import enum

import msgspec

from ..errors import LocalProtocolError, RemoteProtocolError
from ..keys import KEY_LEN, open_sealed, public_key_of, seal_to
from . import frames as f

__all__ = [
    "ClientEvent",
    "ClientInput",
    "ClientProtocol",
    "ClientState",
    "HealthReceived",
    "KeepAliveReceived",
    "PacketReceived",
    "PeerGoneReceived",
    "PeerPresentReceived",
    "PingReceived",
    "PongReceived",
    "RestartingReceived",
    "ServerInfoReceived",
]


class ClientState(enum.Enum):
    """Lifecycle of the client side of one DERP connection."""

    AWAIT_SERVER_KEY = "await_server_key"
    AWAIT_SERVER_INFO = "await_server_info"
    ACTIVE = "active"
    CLOSED = "closed"


class ClientInput(enum.Enum):
    """Inputs that move the client between states."""

    SERVER_KEY = "server_key"
    SERVER_INFO = "server_info"
    PROTOCOL_ERROR = "protocol_error"
    CLOSE = "close"


_TRANSITIONS: dict[tuple[ClientState, ClientInput], ClientState] = {
    (ClientState.AWAIT_SERVER_KEY, ClientInput.SERVER_KEY): ClientState.AWAIT_SERVER_INFO,
    # With a pre-known key the ServerKey frame arrives after we already moved on.
    (ClientState.AWAIT_SERVER_INFO, ClientInput.SERVER_KEY): ClientState.AWAIT_SERVER_INFO,
    (ClientState.AWAIT_SERVER_INFO, ClientInput.SERVER_INFO): ClientState.ACTIVE,
    # Tailscale's server sends ServerInfo once; tolerate a repeat (it is harmless).
    (ClientState.ACTIVE, ClientInput.SERVER_INFO): ClientState.ACTIVE,
    (ClientState.AWAIT_SERVER_KEY, ClientInput.PROTOCOL_ERROR): ClientState.CLOSED,
    (ClientState.AWAIT_SERVER_INFO, ClientInput.PROTOCOL_ERROR): ClientState.CLOSED,
    (ClientState.ACTIVE, ClientInput.PROTOCOL_ERROR): ClientState.CLOSED,
    (ClientState.AWAIT_SERVER_KEY, ClientInput.CLOSE): ClientState.CLOSED,
    (ClientState.AWAIT_SERVER_INFO, ClientInput.CLOSE): ClientState.CLOSED,
    (ClientState.ACTIVE, ClientInput.CLOSE): ClientState.CLOSED,
    (ClientState.CLOSED, ClientInput.CLOSE): ClientState.CLOSED,
    (ClientState.CLOSED, ClientInput.PROTOCOL_ERROR): ClientState.CLOSED,
}


class ServerInfoReceived(msgspec.Struct, frozen=True, kw_only=True):
    """The server admitted us; ``info`` is its decoded ServerInfo."""

    info: f.ServerInfo


class PacketReceived(msgspec.Struct, frozen=True, kw_only=True):
    """A packet relayed to us from ``source`` (a 32-byte node key)."""

    source: bytes
    data: bytes


class PeerGoneReceived(msgspec.Struct, frozen=True, kw_only=True):
    """``peer`` is gone from the server (``reason``: :class:`~relay.derp.frames.PeerGoneReason`)."""

    peer: bytes
    reason: int


class PeerPresentReceived(msgspec.Struct, frozen=True, kw_only=True):
    """A client connected to the server we watch (mesh clients only)."""

    present: f.PeerPresent


class KeepAliveReceived(msgspec.Struct, frozen=True, kw_only=True):
    """The server's periodic keep-alive; needs no answer."""


class PingReceived(msgspec.Struct, frozen=True, kw_only=True):
    """The server pinged us (a Pong was queued automatically if we can ack pings)."""

    data: bytes


class PongReceived(msgspec.Struct, frozen=True, kw_only=True):
    """The server answered one of our Pings."""

    data: bytes


class HealthReceived(msgspec.Struct, frozen=True, kw_only=True):
    """The server reports a problem with our connection (empty: healthy again)."""

    problem: str


class RestartingReceived(msgspec.Struct, frozen=True, kw_only=True):
    """The server is restarting: reconnect after / keep trying for these many ms."""

    reconnect_in_ms: int
    try_for_ms: int


ClientEvent = (
    ServerInfoReceived
    | PacketReceived
    | PeerGoneReceived
    | PeerPresentReceived
    | KeepAliveReceived
    | PingReceived
    | PongReceived
    | HealthReceived
    | RestartingReceived
)
"""Everything :meth:`ClientProtocol.receive_data` can return."""

_RECV_PACKET = int(f.FrameType.RECV_PACKET)
_KEEPALIVE_EVENT = KeepAliveReceived()


class ClientProtocol:
    """Login and event decoding for one client connection.

    Args:
        private_key: our 32-byte node private key.
        server_public: the server's key if already known (fast start); ``None``
            to learn it from the ServerKey frame.
        mesh_key: the region's mesh key, to connect as a privileged mesh peer.
        can_ack_pings: advertise (and do) automatic Pong replies.
        is_prober: advertise that we are a prober.
        app_name: opaque name for the server's stats.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        server_public: bytes | None = None,
        mesh_key: bytes | None = None,
        can_ack_pings: bool = True,
        is_prober: bool = False,
        app_name: str = "",
    ) -> None:
        self.private_key = private_key
        self.public_key = public_key_of(private_key)
        self._info = f.ClientInfo(
            version=f.PROTOCOL_VERSION,
            mesh_key=mesh_key,
            can_ack_pings=can_ack_pings,
            is_prober=is_prober,
            app_name=app_name,
        )
        self._decoder = f.FrameDecoder(f.MAX_FRAME_LEN)
        self._outbox = bytearray()
        self._server_public = server_public
        self.server_info: f.ServerInfo | None = None
        self.state = ClientState.AWAIT_SERVER_KEY
        if server_public is not None:
            self._send_client_info(server_public)
            self.state = ClientState.AWAIT_SERVER_INFO

    @property
    def server_public(self) -> bytes | None:
        """The server's public key, once known."""
        return self._server_public

    @property
    def logged_in(self) -> bool:
        """Whether the server has answered with ServerInfo."""
        return self.state is ClientState.ACTIVE

    def data_to_send(self) -> bytes:
        """Bytes the protocol itself wants written (ClientInfo, automatic Pongs).

        Call it after constructing the protocol (fast start queues ClientInfo
        at once) and after every :meth:`receive_data`; packets and other
        frames the application sends are encoded with :mod:`relay.derp.frames`
        and written directly.
        """
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def receive_data(self, data: bytes | bytearray) -> list[ClientEvent]:
        """Feed bytes from the server; return the events they complete.

        Raises:
            RemoteProtocolError: the server broke the protocol; the protocol is
                CLOSED from then on.
            LocalProtocolError: called after the protocol was closed.
        """
        if self.state is ClientState.CLOSED:
            raise LocalProtocolError("DERP client protocol is closed")
        try:
            return self._receive(data)
        except RemoteProtocolError:
            self._transition(ClientInput.PROTOCOL_ERROR)
            raise

    def connection_closed(self) -> None:
        """Tell the protocol the stream ended; it becomes CLOSED."""
        self._transition(ClientInput.CLOSE)

    def _receive(self, data: bytes | bytearray) -> list[ClientEvent]:
        """Decode frames; RecvPacket (the common case) is handled inline.

        Until the server key is known, only a ServerKey frame is acceptable:
        anything else means we are not talking to a DERP server at all.
        """
        events: list[ClientEvent] = []
        for ftype, payload in self._decoder.feed(data):
            if ftype == _RECV_PACKET:
                if self.state is ClientState.AWAIT_SERVER_KEY:
                    raise RemoteProtocolError("packet before server key")
                if len(payload) < KEY_LEN:
                    continue  # Tailscale's client drops short packets and carries on
                events.append(PacketReceived(source=payload[:KEY_LEN], data=payload[KEY_LEN:]))
                continue
            if self.state is ClientState.AWAIT_SERVER_KEY and ftype != f.FrameType.SERVER_KEY:
                raise RemoteProtocolError(f"expected ServerKey frame, got type 0x{ftype:02x}")
            event = self._handle(ftype, payload)
            if event is not None:
                events.append(event)
        return events

    def _handle(self, ftype: int, payload: bytes) -> ClientEvent | None:
        """Turn one non-packet frame into an event (or ``None`` to skip it).

        Short or unknown frames are skipped rather than fatal, exactly as
        Tailscale's ``derp.Client.recvTimeout`` does: the server may be newer
        than us, and a frame we cannot use is not a reason to drop the
        connection.  Only the login frames are strict, because a mistake there
        means the server is not who we think it is.
        """
        match ftype:
            case f.FrameType.SERVER_KEY:
                key = f.parse_server_key(payload)
                if self._server_public is None:
                    self._server_public = key
                    self._send_client_info(key)
                elif key != self._server_public:
                    raise RemoteProtocolError("server key differs from the expected key")
                self._transition(ClientInput.SERVER_KEY)
                return None
            case f.FrameType.SERVER_INFO:
                assert self._server_public is not None
                sealed = f.parse_server_info(payload)
                info = f.decode_server_info_json(
                    open_sealed(self.private_key, self._server_public, sealed)
                )
                self._transition(ClientInput.SERVER_INFO)
                self.server_info = info
                return ServerInfoReceived(info=info)
            case f.FrameType.KEEP_ALIVE:
                return _KEEPALIVE_EVENT
            case f.FrameType.PEER_GONE:
                if len(payload) < KEY_LEN:
                    return None  # tolerated, as Tailscale's client does
                peer, reason = f.parse_peer_gone(payload)
                return PeerGoneReceived(peer=peer, reason=int(reason))
            case f.FrameType.PEER_PRESENT:
                if len(payload) < KEY_LEN:
                    return None
                return PeerPresentReceived(present=f.parse_peer_present(payload))
            case f.FrameType.PING:
                if len(payload) < 8:
                    return None
                data = bytes(payload[:8])
                if self._info.can_ack_pings:
                    self._outbox += f.encode_pong(data)
                return PingReceived(data=data)
            case f.FrameType.PONG:
                if len(payload) < 8:
                    return None
                return PongReceived(data=bytes(payload[:8]))
            case f.FrameType.HEALTH:
                return HealthReceived(problem=bytes(payload).decode(errors="replace"))
            case f.FrameType.RESTARTING:
                if len(payload) < 8:
                    return None
                reconnect, try_for = f.parse_restarting(payload)
                return RestartingReceived(reconnect_in_ms=reconnect, try_for_ms=try_for)
            case _:
                return None  # unknown frames are skipped for forward compatibility

    def _send_client_info(self, server_public: bytes) -> None:
        """Queue our ClientInfo, sealed to ``server_public``.

        Sealing to the server's key proves we own our private key (only the
        holder can produce a box the server opens with our public key) and
        keeps the mesh key, if any, away from anyone but that server.
        """
        doc = f.encode_client_info_json(self._info)
        self._outbox += f.encode_client_info(
            self.public_key, seal_to(self.private_key, server_public, doc)
        )

    def _transition(self, event: ClientInput) -> None:
        """Apply ``event`` through :data:`_TRANSITIONS`; a missing pair is the server's fault.

        Every illegal pair here is caused by what the server sent (a second
        ServerKey with another key, ServerInfo before ServerKey...), so it
        raises :class:`~relay.errors.RemoteProtocolError` and leaves us CLOSED.
        """
        nxt = _TRANSITIONS.get((self.state, event))
        if nxt is None:
            was = self.state
            self.state = ClientState.CLOSED
            raise RemoteProtocolError(f"unexpected {event.value} in state {was.value}")
        self.state = nxt
