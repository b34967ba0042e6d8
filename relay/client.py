"""A small trio DERP client (adapter over :class:`relay.derp.client.ClientProtocol`).

Who uses it
-----------
* the tests, to drive a real relay on 127.0.0.1 like a Tailscale node would;
* the benchmark (``cli/bench/relay.py``);
* the relay itself, for mesh links to the other relays of its region.

It speaks exactly what Tailscale's ``derphttp`` client speaks: an HTTP/1.1
``GET /derp`` with ``Upgrade: DERP`` (or the ``Derp-Fast-Start: 1`` form when
the server key is known), over TLS or plain TCP, or DERP inside a WebSocket
with subprotocol ``derp``.

TLS verification
----------------
Pass ``cert_name="sha256-raw:<hex>"`` to pin a self-signed certificate the way
a DERP map node does (the handshake is completed without CA checks, then the
leaf's SHA-256 is compared; a mismatch closes the connection with
:class:`~relay.errors.ConfigError`), or pass a ready ``ssl_context`` for CA
verification.

Concurrency: one task may :meth:`DerpClient.recv` while others send; sends are
serialized by a lock, so automatic Pong replies never interleave with packets.
"""

from __future__ import annotations

import hashlib
import ssl
import urllib.parse
from collections import deque
from collections.abc import Iterable
from types import TracebackType

import trio
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request

from wire.wsstream import WebSocketStream

from .derp import frames as f
from .derp.client import (
    ClientEvent,
    ClientProtocol,
    PongReceived,
    ServerInfoReceived,
)
from .errors import ConfigError, ConnectionClosedError, RemoteProtocolError, UnauthorizedError

__all__ = ["DerpClient", "connect_derp"]

_MAX_RESPONSE_HEAD = 16 << 10
_RECV_SIZE = 65536


class DerpClient:
    """An established DERP client connection.  Create it with :func:`connect_derp`.

    Attributes:
        public_key: our node public key (the address peers send to).
        server_public: the relay's DERP public key.
        stream: the underlying trio stream (for tests that misbehave on purpose).
    """

    def __init__(self, stream: trio.abc.Stream, protocol: ClientProtocol, initial: bytes) -> None:
        self.stream = stream
        self._protocol = protocol
        self._events: deque[ClientEvent] = deque()
        self._send_lock = trio.StrictFIFOLock()
        self._initial = initial
        self._closed = False
        self.public_key = protocol.public_key

    @property
    def server_public(self) -> bytes:
        """The relay's DERP public key (known once connected)."""
        key = self._protocol.server_public
        assert key is not None
        return key

    @property
    def server_info(self) -> f.ServerInfo | None:
        """What the relay said at login (its version and rate limit); ``None`` before."""
        return self._protocol.server_info

    @property
    def logged_in(self) -> bool:
        """Whether the relay answered our ClientInfo with ServerInfo."""
        return self._protocol.logged_in

    async def __aenter__(self) -> DerpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        if not self._closed:
            self._closed = True
            await self.stream.aclose()

    # -- sending -------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        """Write raw bytes (used to flush the protocol and by misbehaving tests)."""
        async with self._send_lock:
            await self.stream.send_all(data)

    async def _flush_protocol(self) -> None:
        out = self._protocol.data_to_send()
        if out:
            await self.send_raw(out)

    async def send(self, dst: bytes, packet: bytes) -> None:
        """Send ``packet`` to the node with public key ``dst``."""
        await self.send_raw(f.encode_send_packet(dst, packet))

    async def send_many(self, packets: Iterable[tuple[bytes, bytes]]) -> None:
        """Send several ``(dst, packet)`` pairs in one write."""
        await self.send_raw(b"".join(f.encode_send_packet(d, p) for d, p in packets))

    async def ping(self, data: bytes) -> None:
        """Send a Ping with 8 bytes of ``data``; the answer arrives as :class:`PongReceived`."""
        await self.send_raw(f.encode_ping(data))

    async def note_preferred(self, preferred: bool = True) -> None:
        """Tell the relay whether it is our home relay."""
        await self.send_raw(f.encode_note_preferred(preferred))

    async def watch_conns(self) -> None:
        """Subscribe to PeerPresent/PeerGone (requires the mesh key)."""
        await self.send_raw(f.encode_watch_conns())

    async def close_peer(self, peer: bytes) -> None:
        """Ask the relay to disconnect ``peer`` (requires the mesh key)."""
        await self.send_raw(f.encode_close_peer(peer))

    async def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> None:
        """Inject a packet from ``src`` to ``dst`` (requires the mesh key)."""
        await self.send_raw(f.encode_forward_packet(src, dst, packet))

    # -- receiving -----------------------------------------------------

    async def _fill(self) -> None:
        data: bytes | bytearray
        if self._initial:
            data, self._initial = self._initial, b""
        else:
            try:
                data = await self.stream.receive_some(_RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._closed_error() from exc
        if not data:
            raise self._closed_error()
        self._events.extend(self._protocol.receive_data(data))
        await self._flush_protocol()

    def _closed_error(self) -> ConnectionClosedError | UnauthorizedError:
        if not self._protocol.logged_in:
            self._protocol.connection_closed()
            return UnauthorizedError("relay closed the connection during login (not authorized?)")
        self._protocol.connection_closed()
        return ConnectionClosedError("relay closed the connection")

    async def recv(self) -> ClientEvent:
        """Return the next event from the relay.

        Raises:
            ConnectionClosedError: the relay closed the connection.
            UnauthorizedError: it closed it before completing login.
            RemoteProtocolError: it sent something invalid.
        """
        while not self._events:
            await self._fill()
        return self._events.popleft()

    def pending_events(self) -> int:
        """Events already decoded but not yet returned by :meth:`recv`."""
        return len(self._events)

    async def wait_logged_in(self) -> f.ServerInfo:
        """Read until ServerInfo arrives; other events stay queued for :meth:`recv`.

        Raises:
            UnauthorizedError: the relay closed the connection instead.
        """
        held: list[ClientEvent] = []
        try:
            while True:
                while not self._events:
                    await self._fill()
                event = self._events.popleft()
                if isinstance(event, ServerInfoReceived):
                    return event.info
                held.append(event)
        finally:
            self._events.extendleft(reversed(held))

    async def ping_rtt(self, data: bytes = b"tl-ping!") -> float:
        """Ping the relay and return the round-trip time in seconds (discards other events)."""
        start = trio.current_time()
        await self.ping(data)
        while True:
            event = await self.recv()
            if isinstance(event, PongReceived) and event.data == data:
                return trio.current_time() - start


def _client_ssl(cert_name: str | None, ssl_context: ssl.SSLContext | None) -> ssl.SSLContext:
    if ssl_context is not None:
        return ssl_context
    ctx = ssl.create_default_context()
    if cert_name is not None and cert_name.startswith("sha256-raw:"):
        # Pinning replaces CA verification; the hash is checked after the handshake.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _read_response_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > _MAX_RESPONSE_HEAD:
            raise RemoteProtocolError("HTTP response head too large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ConnectionClosedError("relay closed the connection during the HTTP upgrade")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


async def connect_derp(
    url: str,
    private_key: bytes,
    *,
    cert_name: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    dial_host: str | None = None,
    server_public: bytes | None = None,
    fast_start: bool = False,
    websocket: bool = False,
    mesh_key: bytes | None = None,
    can_ack_pings: bool = True,
    is_prober: bool = False,
    ideal_node: str | None = None,
    wait_login: bool = True,
    connect_timeout: float = 10.0,
) -> DerpClient:
    """Connect to a DERP relay and log in.

    Args:
        url: ``https://host:port/derp`` or ``http://host:port/derp``.
        private_key: our 32-byte node private key.
        cert_name: ``sha256-raw:<hex>`` pin for a self-signed relay certificate.
        ssl_context: TLS context for CA verification (overrides ``cert_name``'s
            relaxed context; the pin is still checked if given).
        dial_host: connect to this address instead of the URL's host (the URL
            host is still used for SNI and the ``Host`` header).
        server_public: the relay's key if known; required for ``fast_start``.
        fast_start: send ``Derp-Fast-Start: 1`` and skip waiting for the 101.
        websocket: speak DERP inside a WebSocket (subprotocol ``derp``).
        mesh_key: the region's mesh key, to connect as a mesh peer.
        can_ack_pings: advertise automatic Pong replies.
        is_prober: advertise being a prober.
        ideal_node: send an ``Ideal-Node`` header (we would rather be elsewhere).
        wait_login: return only after ServerInfo (else right after ClientInfo).
        connect_timeout: limit for TCP + TLS + HTTP + login.

    Raises:
        UnauthorizedError: the relay closed the connection during login.
        ConfigError: the certificate does not match ``cert_name``.
        RemoteProtocolError: the relay answered the upgrade wrongly.
        OSError: the TCP connection failed.
        trio.TooSlowError: ``connect_timeout`` elapsed.
    """
    if fast_start and server_public is None:
        raise ValueError("fast_start needs server_public")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname is None:
        raise ValueError(f"unsupported DERP URL {url!r}")
    use_tls = parts.scheme == "https"
    port = parts.port or (443 if use_tls else 80)
    host = parts.hostname
    path = parts.path or "/derp"
    with trio.fail_after(connect_timeout):
        tcp = await trio.open_tcp_stream(dial_host or host, port)
        stream: trio.abc.Stream = tcp
        try:
            if use_tls:
                ctx = _client_ssl(cert_name, ssl_context)
                ssl_stream = trio.SSLStream(tcp, ctx, server_hostname=host)
                await ssl_stream.do_handshake()
                if cert_name is not None and cert_name.startswith("sha256-raw:"):
                    der = ssl_stream.getpeercert(binary_form=True)
                    got = "sha256-raw:" + hashlib.sha256(der or b"").hexdigest()
                    if got != cert_name:
                        raise ConfigError(f"relay certificate {got} does not match {cert_name}")
                stream = ssl_stream
            host_header = host if parts.port is None else f"{host}:{port}"
            initial = b""
            if websocket:
                ws = WSConnection(ConnectionType.CLIENT)
                await stream.send_all(
                    ws.send(Request(host=host_header, target=path, subprotocols=["derp"]))
                )
                accepted = False
                while not accepted:
                    chunk = await stream.receive_some(_RECV_SIZE)
                    if not chunk:
                        raise ConnectionClosedError("relay closed during the WebSocket handshake")
                    ws.receive_data(bytes(chunk))
                    for event in ws.events():
                        if isinstance(event, AcceptConnection):
                            # Stop here: events() would go on to the DERP bytes that
                            # came with the 101, which the stream must read instead.
                            accepted = True
                            break
                        if isinstance(event, RejectConnection | RejectData):
                            raise RemoteProtocolError("relay rejected the WebSocket upgrade")
                # wsproto keeps any bytes after the 101 in its own buffer; hand
                # its framing state over by re-creating the stream on top of it.
                stream = _adopt_ws(stream, ws)
            else:
                request = (
                    f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n"
                    "User-Agent: tailledger-relay-client\r\n"
                    "Upgrade: DERP\r\nConnection: Upgrade\r\n"
                ).encode()
                if fast_start:
                    request += b"Derp-Fast-Start: 1\r\n"
                if ideal_node is not None:
                    request += b"Ideal-Node: " + ideal_node.encode() + b"\r\n"
                await stream.send_all(request + b"\r\n")
                if not fast_start:
                    head, initial = await _read_response_head(stream)
                    status = head.split(b"\r\n", 1)[0].split(b" ")
                    if len(status) < 2 or status[1] != b"101":
                        raise RemoteProtocolError(
                            f"relay refused the DERP upgrade: {head.splitlines()[0]!r}"
                        )
            protocol = ClientProtocol(
                private_key,
                server_public=server_public,
                mesh_key=mesh_key,
                can_ack_pings=can_ack_pings,
                is_prober=is_prober,
            )
            client = DerpClient(stream, protocol, initial)
            await client._flush_protocol()
            while protocol.server_public is None:
                await client._fill()
            await client._flush_protocol()
            if wait_login:
                await client.wait_logged_in()
            return client
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise


def _adopt_ws(transport: trio.abc.Stream, ws: WSConnection) -> WebSocketStream:
    # WSConnection wraps a wsproto Connection once the handshake is accepted;
    # continue it so bytes that arrived with the 101 are not lost.
    inner = ws.connection
    assert inner is not None
    return WebSocketStream(
        transport, client=True, connection=inner, violation=RemoteProtocolError
    )
