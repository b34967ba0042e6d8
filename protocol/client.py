"""Trio adapter of the ts2021 client (tests now, the load generator later).

Role in the pipeline: drives :class:`protocol.client_conn.ClientConnection`
over a TCP (optionally TLS, optionally WebSocket) connection, the way a Go
client does: ``GET /key`` (:func:`fetch_server_key`), then the ``/ts2021``
upgrade, the Noise handshake, and HTTP/2 with prior knowledge. On top it offers
request helpers: :meth:`ControlClient.request`, :meth:`ControlClient.open_stream`
and the typed :meth:`ControlClient.register` / :meth:`ControlClient.map_stream`
(which decodes the ``[u32 LE][zstd]`` map frames).

Structure (style rule 19): :func:`open_control_client` is an async context
manager owning a nursery with one reader task; every write goes through one
lock and takes the core's current ``data_to_send()`` inside it, so Noise
records leave in nonce order. Per HTTP/2 stream the reader pushes events into
an unbounded memory channel; the consumer acknowledges body bytes as it reads
them, so HTTP/2 flow control (not the channel) bounds memory and a slow
consumer slows the server down.

Efficiency notes for load generation: one connection carries any number of
concurrent streams; there is no per-request task; map frames are decoded
incrementally as DATA arrives.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import h11
import msgspec
import trio

from projections import tailcfg
from wire.wsstream import WebSocketStream

from . import client_conn as cc
from . import h2flow
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .handler import Headers
from .mapframe import MapFrameDecoder
from .noise import Keypair
from .upgrade import HANDSHAKE_HEADER, UPGRADE_PATH, UPGRADE_TOKEN, build_key_request
from .upgrade import parse_key_response as _parse_key_response

__all__ = [
    "ClientResponse",
    "ControlClient",
    "MapStream",
    "ResponseStream",
    "fetch_server_key",
    "open_control_client",
]

_MAX_RECV: Final = 65536
_MAX_KEY_BODY: Final = 64 << 10  # the Go client reads /key up to 64 KiB
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_StreamEvent = cc.ResponseReceived | cc.DataReceived | cc.StreamEnded | h2flow.StreamReset


@dataclass(frozen=True, slots=True)
class ClientResponse:
    """A complete response received through the tunnel."""

    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), if any."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None


async def _connect(
    host: str, port: int, ssl_context: ssl.SSLContext | None, server_hostname: str | None
) -> trio.abc.Stream:
    tcp = await trio.open_tcp_stream(host, port)
    if ssl_context is None:
        return tcp
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or host)
    await tls.do_handshake()
    return tls


async def _read_http_response(stream: trio.abc.Stream, limit: int) -> tuple[int, bytes]:
    """Read one complete HTTP/1.1 response (``Connection: close`` style)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    status = 0
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(_MAX_RECV)))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise RemoteProtocolError("response body too large")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, bytes(body)
    except h11.ProtocolError as exc:
        raise RemoteProtocolError(f"bad HTTP response: {exc}") from None


async def fetch_server_key(
    host: str,
    port: int,
    *,
    version: int = cc.DEFAULT_VERSION,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> bytes:
    """``GET /key?v=<version>`` and return the server's Noise public key.

    Raises:
        RemoteProtocolError: Non-200, malformed body or a zero key.
        OSError: Connection failures.
    """
    stream = await _connect(host, port, ssl_context, server_hostname)
    async with stream:
        await stream.send_all(build_key_request(f"{host}:{port}", version))
        status, body = await _read_http_response(stream, _MAX_KEY_BODY)
    if status != 200:
        raise RemoteProtocolError(f"/key answered {status}", http_status=status)
    return _parse_key_response(body)


async def _websocket_upgrade(stream: trio.abc.Stream, host: str, initiation: bytes) -> bytes:
    """Perform the browser-style upgrade (§3.4); return bytes after the 101."""
    ws_key = base64.b64encode(os.urandom(16))
    query = quote(base64.b64encode(initiation).decode("ascii"), safe="")
    request = (
        f"GET {UPGRADE_PATH}?{HANDSHAKE_HEADER}={query} HTTP/1.1\r\nHost: {host}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {ws_key.decode('ascii')}\r\n"
        f"Sec-WebSocket-Protocol: {UPGRADE_TOKEN}\r\n\r\n"
    ).encode("latin-1")
    await stream.send_all(request)
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(
            method="GET",
            target="/",
            headers=[("Host", "x"), ("Connection", "Upgrade"), ("Upgrade", "websocket")],
        )
    )
    conn.send(h11.EndOfMessage())
    expected = base64.b64encode(hashlib.sha1(ws_key + _WS_GUID).digest())
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(_MAX_RECV))
            if not data:
                raise RemoteProtocolError("connection closed before the 101")
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            accept = dict(event.headers).get(b"sec-websocket-accept", b"")
            if bytes(accept) != expected:
                raise RemoteProtocolError("bad Sec-WebSocket-Accept")
            return bytes(conn.trailing_data[0])
        if isinstance(event, h11.Response):
            raise RemoteProtocolError(
                f"WebSocket upgrade answered {event.status_code}", http_status=event.status_code
            )


class _StreamState:
    __slots__ = ("receive", "send")

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[_StreamEvent](math.inf)


class ResponseStream:
    """A response whose body is consumed incrementally (e.g. a map long poll).

    Iterate to get body chunks; iteration ends with the stream. Closing it
    (leaving :meth:`ControlClient.open_stream`) resets the stream if the
    server has not finished it, which is how a client ends a long poll.

    Attributes:
        stream_id: The HTTP/2 stream ID.
        status: Response status (valid after entering the context).
        headers: Response headers (likewise).
    """

    def __init__(self, client: ControlClient, stream_id: int, state: _StreamState) -> None:
        self._client = client
        self.stream_id = stream_id
        self._state = state
        self.status = 0
        self.headers: Headers = ()
        self.ended = False

    async def _next_event(self) -> _StreamEvent:
        """Next event of this stream; the connection's error if it died."""
        try:
            return await self._state.receive.receive()
        except trio.EndOfChannel:
            raise self._client._closed_error() from None

    async def _read_head(self) -> None:
        """Wait for the response head (the first event of every stream)."""
        event = await self._next_event()
        if isinstance(event, h2flow.StreamReset):
            self.ended = True
            raise RemoteProtocolError(f"stream reset by the server (code {event.error_code})")
        if not isinstance(event, cc.ResponseReceived):
            raise RemoteProtocolError("response data before headers")
        self.status = event.status
        self.headers = event.headers

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        """Return the next body chunk.

        Raises:
            StopAsyncIteration: The server ended the stream.
            RemoteProtocolError: The stream was reset or the connection died.
        """
        while True:
            if self.ended:
                raise StopAsyncIteration
            event = await self._next_event()
            if isinstance(event, cc.DataReceived):
                await self._client._acknowledge(self.stream_id, event.flow_controlled_length)
                if event.data:
                    return event.data
            elif isinstance(event, cc.StreamEnded):
                self.ended = True
            elif isinstance(event, h2flow.StreamReset):
                self.ended = True
                raise RemoteProtocolError(f"stream reset by the server (code {event.error_code})")

    async def read_all(self, limit: int = 64 << 20) -> bytes:
        """Read the rest of the body (at most ``limit`` bytes)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if size > limit:
                raise RemoteProtocolError("response body too large")
            parts.append(chunk)
        return b"".join(parts)


class MapStream:
    """Decoded messages of a ``/machine/map`` long poll.

    Iterate to get :class:`~projections.tailcfg.MapResponse` values
    (keep-alives included; check ``keep_alive``). :meth:`raw_messages` yields
    the decompressed JSON bytes instead, for byte-level assertions.
    """

    def __init__(self, response: ResponseStream, *, compressed: bool) -> None:
        self.response = response
        self._decoder = MapFrameDecoder(compressed=compressed)
        self._ready: list[bytes] = []

    async def next_raw(self) -> bytes:
        """Return the next decompressed JSON message.

        Raises:
            StopAsyncIteration: The server ended the stream.
        """
        while not self._ready:
            chunk = await self.response.__anext__()
            self._ready.extend(self._decoder.receive_data(chunk))
        return self._ready.pop(0)

    async def raw_messages(self) -> AsyncIterator[bytes]:
        """Iterate over decompressed JSON messages."""
        while True:
            try:
                yield await self.next_raw()
            except StopAsyncIteration:
                return

    def __aiter__(self) -> MapStream:
        return self

    async def __anext__(self) -> tailcfg.MapResponse:
        """Return the next decoded MapResponse."""
        raw = await self.next_raw()
        try:
            return tailcfg.decode_map_response(raw)
        except msgspec.MsgspecError as exc:
            raise RemoteProtocolError(f"undecodable MapResponse: {exc}") from None


class ControlClient:
    """An established ts2021 tunnel (use :func:`open_control_client`).

    Attributes:
        machine_public: Our machine public key (what the server sees).
        server_public: The server's Noise key.
        early: The server's early payload, if it sent one.
        protocol_version: Capability version used in the handshake.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: cc.ClientConnection,
        *,
        machine_public: bytes,
        server_public: bytes,
        version: int,
    ) -> None:
        self._stream = stream
        self._conn = conn
        self.machine_public = machine_public
        self.server_public = server_public
        self.protocol_version = version
        self.early: tailcfg.EarlyNoise | None = None
        self._send_lock = trio.Lock()
        self._streams: dict[int, _StreamState] = {}
        self._ready = trio.Event()
        self._window_changed = trio.Event()
        self._error: ProtocolError | None = None
        self._pings: dict[bytes, trio.Event] = {}
        self._ping_counter = 0
        self.closed = False

    # -- plumbing ---------------------------------------------------------------------

    def _closed_error(self) -> ProtocolError:
        if self._error is not None:
            return RemoteProtocolError(f"connection closed: {self._error.reason}")
        return LocalProtocolError("connection closed")

    async def _flush(self) -> None:
        """Write everything the core has queued (one writer at a time).

        Raises:
            ProtocolError: The write failed; the client is shut down.
        """
        lock = self._send_lock
        if not lock.locked():
            # Nobody is writing: take the bytes now (no await before the lock is
            # ours, so the order holds) and skip the lock when there are none, which
            # is most acknowledgements: h2 sends WINDOW_UPDATE only now and then.
            data = self._conn.data_to_send()
            if not data:
                return
            lock.acquire_nowait()
        else:
            await lock.acquire()
            data = self._conn.data_to_send()
        try:
            if data:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._conn.send_failed()
                    self._shutdown(RemoteProtocolError(f"write failed: {exc!r}"))
                    raise self._closed_error() from exc
        finally:
            lock.release()

    async def _acknowledge(self, stream_id: int, length: int) -> None:
        if length and not self.closed:
            self._conn.acknowledge(stream_id, length)
            await self._flush()

    def _shutdown(self, error: ProtocolError | None) -> None:
        """Mark the tunnel dead and wake everybody waiting on it (idempotent).

        Stream consumers see ``EndOfChannel`` and raise the recorded error;
        PING waiters and window waiters return and check :attr:`closed`.
        """
        if self.closed:
            return
        self.closed = True
        if self._error is None:
            self._error = error
        for state in self._streams.values():
            state.send.close()
        self._streams.clear()
        for waiter in self._pings.values():
            waiter.set()
        self._ready.set()
        self._window_changed.set()

    async def _reader(self) -> None:
        """The only task that reads the socket; dispatches events to streams."""
        try:
            while True:
                data = bytes(await self._stream.receive_some(_MAX_RECV))
                if not data:
                    self._shutdown(RemoteProtocolError("server closed the connection"))
                    return
                for event in self._conn.receive_data(data):
                    self._dispatch(event)
                await self._flush()
        except ProtocolError as exc:
            self._shutdown(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._shutdown(RemoteProtocolError(f"connection lost: {exc!r}"))

    def _dispatch(self, event: cc.ClientEvent) -> None:
        """Route one core event: stream events to their channel, the rest here."""
        if isinstance(event, cc.EarlyPayloadReceived):
            self.early = event.early
            self._ready.set()
        elif isinstance(event, h2flow.WindowUpdated):
            self._window_changed.set()
            self._window_changed = trio.Event()
        elif isinstance(event, h2flow.ConnectionTerminated):
            self._shutdown(RemoteProtocolError(f"server sent GOAWAY (code {event.error_code})"))
        elif isinstance(event, cc.PingAcknowledged):
            waiter = self._pings.pop(event.opaque, None)
            if waiter is not None:
                waiter.set()
        elif isinstance(event, cc.HandshakeComplete):
            pass
        else:
            state = self._streams.get(event.stream_id)
            if state is not None:
                state.send.send_nowait(event)
                if isinstance(event, cc.StreamEnded | h2flow.StreamReset):
                    del self._streams[event.stream_id]

    async def _establish(self) -> None:
        """Drive upgrade, handshake and early payload in the caller's task.

        Done before the reader task exists so that failures surface as the
        core's own exception (e.g. :class:`~protocol.errors.HandshakeError`),
        not wrapped in an exception group.
        """
        await self._flush()  # the upgrade request (native upgrade)
        while not self._ready.is_set():
            data = bytes(await self._stream.receive_some(_MAX_RECV))
            for event in self._conn.receive_data(data):  # raises ProtocolError
                self._dispatch(event)
            await self._flush()

    # -- requests -----------------------------------------------------------------

    async def _start(
        self, method: str, path: str, headers: Headers, body: bytes
    ) -> tuple[int, _StreamState]:
        """Open a stream, send the request and wait until its body left.

        The stream's channel is registered before the first flush, so no
        response event can arrive for an unknown stream.
        """
        if self.closed:
            raise self._closed_error()
        stream_id = self._conn.send_request(method, path, headers=headers, body=body)
        state = _StreamState()
        self._streams[stream_id] = state
        await self._flush()
        while self._conn.pending(stream_id):
            if self.closed:
                raise self._closed_error()
            await self._window_changed.wait()
            await self._flush()
        return stream_id, state

    @asynccontextmanager
    async def open_stream(
        self, method: str, path: str, *, headers: Headers = (), body: bytes = b""
    ) -> AsyncGenerator[ResponseStream, None]:
        """Send a request and yield its response once the head arrived.

        Leaving the context resets the stream unless the server ended it.

        Raises:
            RemoteProtocolError: Reset before the head, or the connection died.
        """
        stream_id, state = await self._start(method, path, headers, body)
        response = ResponseStream(self, stream_id, state)
        try:
            await response._read_head()
            yield response
        finally:
            if not response.ended and not self.closed:
                self._conn.reset_stream(stream_id)
                self._streams.pop(stream_id, None)
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await self._flush()

    async def request(
        self, method: str, path: str, *, headers: Headers = (), body: bytes = b""
    ) -> ClientResponse:
        """Send a request and return the complete response."""
        async with self.open_stream(method, path, headers=headers, body=body) as response:
            data = await response.read_all()
        return ClientResponse(status=response.status, headers=response.headers, body=data)

    async def post_json(self, path: str, value: msgspec.Struct | bytes) -> ClientResponse:
        """POST a wire struct (or pre-encoded JSON) to ``path``."""
        body = value if isinstance(value, bytes) else tailcfg.encode(value)
        return await self.request(
            "POST", path, headers=(("content-type", "application/json"),), body=body
        )

    async def register(self, request: tailcfg.RegisterRequest) -> tailcfg.RegisterResponse:
        """``POST /machine/register`` and decode the answer.

        Raises:
            RemoteProtocolError: Non-200 (``http_status`` set) or a bad body.
        """
        response = await self.post_json("/machine/register", request)
        if response.status != 200:
            raise RemoteProtocolError(
                f"register answered {response.status}: {response.body[:200]!r}",
                http_status=response.status,
            )
        try:
            return tailcfg.decode_register_response(response.body)
        except msgspec.MsgspecError as exc:
            raise RemoteProtocolError(f"undecodable RegisterResponse: {exc}") from None

    @asynccontextmanager
    async def map_stream(self, request: tailcfg.MapRequest) -> AsyncGenerator[MapStream, None]:
        """``POST /machine/map`` and yield the decoded message stream.

        The frames are zstd-decoded when ``request.compress == "zstd"``.
        Leaving the context resets the stream (ends the long poll).

        Raises:
            RemoteProtocolError: Non-200 status (``http_status`` set).
        """
        body = tailcfg.encode(request)
        async with self.open_stream(
            "POST", "/machine/map", headers=(("content-type", "application/json"),), body=body
        ) as response:
            if response.status != 200:
                detail = await response.read_all(limit=4096)
                raise RemoteProtocolError(
                    f"map answered {response.status}: {detail[:200]!r}",
                    http_status=response.status,
                )
            yield MapStream(response, compressed=request.compress == "zstd")

    async def ping(self) -> float:
        """Send an HTTP/2 PING and wait for the ACK; return the round trip in seconds.

        Raises:
            RemoteProtocolError: The connection died first.
        """
        self._ping_counter += 1
        opaque = self._ping_counter.to_bytes(8, "big")
        done = self._pings[opaque] = trio.Event()
        start = trio.current_time()
        self._conn.ping(opaque)
        await self._flush()
        await done.wait()
        if self.closed and opaque in self._pings:
            raise self._closed_error()
        return trio.current_time() - start


@asynccontextmanager
async def open_control_client(
    host: str,
    port: int,
    *,
    machine_key: bytes | Keypair,
    server_public: bytes | None = None,
    version: int = cc.DEFAULT_VERSION,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    websocket: bool = False,
    initial_window_size: int | None = None,
    connection_window_size: int | None = None,
    max_frame_size: int | None = None,
    ephemeral_private: bytes | None = None,
) -> AsyncGenerator[ControlClient, None]:
    """Connect, upgrade, handshake; yield a :class:`ControlClient`.

    Args:
        host: Server address.
        port: Server port.
        machine_key: Our machine *private* key (32 bytes, or a reused
            :class:`~protocol.noise.handshake.Keypair` to skip re-loading it).
        server_public: The server's Noise key; fetched from ``/key`` if ``None``.
        version: Capability version (130 = v1.90, 145 = HEAD).
        ssl_context: Use TLS (the ``https`` fallback of real clients).
        server_hostname: SNI / certificate name for TLS.
        websocket: Use the WebSocket variant of the upgrade.
        initial_window_size: Our HTTP/2 stream receive window.
        connection_window_size: Our HTTP/2 connection receive window (Go's
            clients: 4 MiB per stream, 1 GiB per connection).
        max_frame_size: Our HTTP/2 ``SETTINGS_MAX_FRAME_SIZE`` (Go's clients: 1 MiB).
        ephemeral_private: Inject the handshake ephemeral (tests only).

    Raises:
        RemoteProtocolError: Upgrade refused, handshake failed, or the
            connection died before the tunnel was up.

    Cancellation: leaving the context sends GOAWAY, cancels the reader and
    closes the socket.
    """
    if server_public is None:
        server_public = await fetch_server_key(
            host, port, version=version, ssl_context=ssl_context, server_hostname=server_hostname
        )
    keypair = (
        machine_key if isinstance(machine_key, Keypair) else Keypair.from_private_bytes(machine_key)
    )
    stream = await _connect(host, port, ssl_context, server_hostname)
    try:
        conn = cc.ClientConnection(
            machine_private=keypair,
            server_public=server_public,
            host=f"{host}:{port}",
            version=version,
            initial_window_size=initial_window_size,
            connection_window_size=connection_window_size,
            max_frame_size=max_frame_size,
            http_upgrade=not websocket,
            ephemeral_private=ephemeral_private,
        )
        if websocket:
            trailing = await _websocket_upgrade(stream, f"{host}:{port}", conn.initiation)
            # The initiation travelled in the query string; no early payload follows.
            stream = WebSocketStream(
                stream,
                client=True,
                trailing=trailing,
                binary_only=True,
                violation=RemoteProtocolError,
            )
        client = ControlClient(
            stream,
            conn,
            machine_public=keypair.public,
            server_public=server_public,
            version=version,
        )
        await client._establish()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                try:
                    yield client
                finally:
                    if not client.closed:
                        conn.close()
                        with (
                            trio.CancelScope(shield=True),
                            trio.move_on_after(1),
                            suppress(ProtocolError),
                        ):
                            await client._flush()
                    client._shutdown(None)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader task never raises (it records failures), so a group
            # holds the caller's own exception: give it back unwrapped.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()
