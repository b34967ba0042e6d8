"""A trio byte stream carried in WebSocket binary messages (thin adapter).

Role in the pipeline: the WebSocket variant of ``/ts2021`` (browser/WASM
clients, docs/control-protocol.md §3.4) carries the Noise byte stream in binary
WebSocket messages whose boundaries are meaningless. :class:`WebSocketByteStream`
turns an upgraded connection back into a plain ``trio.abc.Stream`` so that the
Noise/HTTP2 session code runs unchanged on top of it. Framing, masking, PING
and CLOSE handling come from ``wsproto``'s frame-level (post-handshake)
``Connection``; the opening handshake is done by :mod:`protocol.upgrade`.

Invariants: writes to the underlying stream are serialised by one lock (PONG
and CLOSE replies are written from the receive path); a CLOSE from the peer
reads as EOF (``b""``); a text message is a protocol violation and also ends
the stream.
"""

from __future__ import annotations

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError

from .errors import RemoteProtocolError

__all__ = ["WebSocketByteStream"]

_MAX_RECV = 65536


class WebSocketByteStream(trio.abc.Stream):
    """Bytes in, bytes out, over an already upgraded WebSocket connection."""

    def __init__(self, transport: trio.abc.Stream, *, client: bool, trailing: bytes = b"") -> None:
        """Wrap ``transport``.

        Args:
            transport: The raw stream after the 101.
            client: ``True`` for the client role (masks outgoing frames).
            trailing: Bytes already read after the 101 head.
        """
        self._transport = transport
        self._ws = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        self._pending = bytearray()
        self._eof = False
        self._send_lock = trio.Lock()
        if trailing:
            self._ws.receive_data(trailing)

    @property
    def transport_stream(self) -> trio.abc.Stream:
        """The wrapped stream."""
        return self._transport

    async def _write(self, data: bytes) -> None:
        if data:
            async with self._send_lock:
                await self._transport.send_all(data)

    async def _process(self) -> None:
        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                self._pending += event.data
            elif isinstance(event, Ping):
                await self._write(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._eof = True
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._write(self._ws.send(event.response()))
            elif isinstance(event, TextMessage):
                self._eof = True
                raise RemoteProtocolError("text message on the ts2021 WebSocket")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return payload bytes of binary messages; ``b""`` after a CLOSE or EOF.

        Raises:
            RemoteProtocolError: Malformed frames or a text message.
        """
        while not self._pending and not self._eof:
            try:
                await self._process()
            except WsLocalProtocolError as exc:
                raise RemoteProtocolError(f"bad WebSocket frame: {exc}") from None
            if self._pending or self._eof:
                break
            data = bytes(await self._transport.receive_some(_MAX_RECV))
            if not data:
                self._eof = True
                break
            self._ws.receive_data(data)
        limit = len(self._pending) if max_bytes is None else max_bytes
        out = bytes(self._pending[:limit])
        del self._pending[:limit]
        return out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one binary message."""
        if not data:
            return
        if self._ws.state is not ConnectionState.OPEN:
            raise trio.ClosedResourceError("WebSocket is closing")
        await self._write(self._ws.send(Message(data=bytes(data))))

    async def wait_send_all_might_not_block(self) -> None:
        """Delegate to the transport."""
        await self._transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send a CLOSE frame (best effort) and close the transport."""
        try:
            if self._ws.state is ConnectionState.OPEN:
                with trio.move_on_after(1):
                    await self._write(self._ws.send(CloseConnection(code=1000)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, WsLocalProtocolError):
            pass
        finally:
            await self._transport.aclose()
