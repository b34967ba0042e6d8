"""A trio byte stream carried inside WebSocket binary messages (trio adapter).

DERP over WebSocket (Tailscale's ``derphttp/websocket.go`` and
``derpserver/websocket.go``) is plain DERP framing written into binary
WebSocket messages with the ``derp`` subprotocol; message boundaries carry no
meaning, exactly like TCP segment boundaries.  So instead of teaching the DERP
core about WebSockets, this module wraps a stream: :class:`WebSocketStream`
*is* a :class:`trio.abc.Stream` whose bytes travel as WebSocket messages, and
the DERP code on both sides uses it like any other stream.

The framing itself is wsproto's sans-I/O :class:`wsproto.connection.Connection`
(the HTTP upgrade handshake is done before wrapping).  Pings are answered
automatically; a Close frame is answered and then reads return ``b""`` (EOF).
"""

from __future__ import annotations

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

__all__ = ["WebSocketStream"]


class WebSocketStream(trio.abc.Stream):
    """Expose a WebSocket connection (already past its handshake) as a byte stream.

    Args:
        transport: the underlying (TCP or TLS) stream.
        client: ``True`` on the client side (masks outgoing frames).
        trailing_data: bytes already read from ``transport`` after the handshake.
    """

    def __init__(
        self, transport: trio.abc.Stream, *, client: bool, trailing_data: bytes = b""
    ) -> None:
        self.transport = transport
        kind = ConnectionType.CLIENT if client else ConnectionType.SERVER
        self._ws = Connection(kind, trailing_data=trailing_data)
        self._pending = bytearray()
        self._eof = False
        self._send_lock = trio.StrictFIFOLock()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one binary message."""
        if self._ws.state is not ConnectionState.OPEN:
            raise trio.ClosedResourceError("WebSocket is closed")
        async with self._send_lock:
            await self.transport.send_all(self._ws.send(BytesMessage(data=bytes(data))))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return the next bytes of message payload; ``b""`` once the peer closed."""
        while not self._pending and not self._eof:
            for event in self._ws.events():
                if isinstance(event, BytesMessage):
                    self._pending += event.data
                elif isinstance(event, TextMessage):
                    self._pending += event.data.encode()
                elif isinstance(event, Ping):
                    async with self._send_lock:
                        await self.transport.send_all(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self._ws.state is ConnectionState.REMOTE_CLOSING:
                        async with self._send_lock:
                            await self.transport.send_all(self._ws.send(event.response()))
                    self._eof = True
            if self._pending or self._eof:
                break
            data = await self.transport.receive_some(65536)
            if not data:
                self._eof = True
                break
            self._ws.receive_data(bytes(data))
        if max_bytes is None or max_bytes >= len(self._pending):
            out = bytes(self._pending)
            self._pending.clear()
        else:
            out = bytes(self._pending[:max_bytes])
            del self._pending[:max_bytes]
        return out

    async def aclose(self) -> None:
        """Send a Close frame if we can, then close the transport."""
        try:
            if self._ws.state is ConnectionState.OPEN:
                with trio.move_on_after(1):
                    async with self._send_lock:
                        await self.transport.send_all(
                            self._ws.send(CloseConnection(code=1000, reason="closing"))
                        )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport.aclose()
