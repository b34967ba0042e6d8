"""A trio byte stream carried in WebSocket binary messages (thin trio adapter).

Role in the pipeline: two protocols of ours ride on WebSocket only because a
browser or a proxy lets nothing else through, and neither gives message
boundaries a meaning:

* the control protocol's ``/ts2021`` over WebSocket (browser/WASM clients,
  docs/control-protocol.md §3.4) carries the Noise byte stream
  (:mod:`protocol.serve` on the server, :mod:`protocol.client` on the client);
* DERP over WebSocket (Tailscale's ``derphttp/websocket.go`` and
  ``derpserver/websocket.go``) carries plain DERP framing with the ``derp``
  subprotocol (:mod:`relay.serve.server`, :mod:`relay.client`).

So instead of teaching either core about WebSocket, :class:`WebSocketStream`
*is* a :class:`trio.abc.Stream` whose bytes travel as binary messages, and the
Noise/HTTP2 session and the DERP code run on it unchanged. Framing, masking,
PING and CLOSE come from ``wsproto``'s frame-level (post-handshake)
:class:`wsproto.connection.Connection`; the opening handshake is done before
wrapping (:mod:`protocol.upgrade`, :mod:`relay.http_front`, or ``wsproto``'s
``WSConnection`` in the DERP client, whose connection is adopted).

Where the two uses differ, the caller says so:

* ``binary_only``: ts2021 treats a text message as a protocol violation; DERP
  reads its UTF-8 bytes like a binary message's.
* ``violation``: the exception a peer's violation raises, so that each side
  reports it in its own error family (``protocol.errors.RemoteProtocolError``,
  ``relay.errors.RemoteProtocolError``).

Invariants:

* Writes to the transport are serialised by one lock: PONG and CLOSE replies
  are written from the receive path while another task may be sending.
* A CLOSE from the peer (answered, if we had not closed first) and EOF of the
  transport both read as EOF (``b""``), for good.
* ``send_all(b"")`` sends nothing (an empty message would carry no bytes).
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError

__all__ = ["WebSocketStream"]

#: Bytes asked of the transport per read.
_MAX_RECV = 65536
#: How long :meth:`WebSocketStream.aclose` waits to hand over its CLOSE frame.
_CLOSE_TIMEOUT = 1.0


class WebSocketStream(trio.abc.Stream):
    """Bytes in, bytes out, over an already upgraded WebSocket connection.

    Attributes:
        transport_stream: The wrapped stream (like :class:`trio.SSLStream`'s).
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client: bool,
        violation: Callable[[str], Exception],
        binary_only: bool = False,
        trailing: bytes = b"",
        connection: Connection | None = None,
    ) -> None:
        """Wrap ``transport``.

        Args:
            transport: The raw (TCP or TLS) stream after the 101.
            client: ``True`` for the client role (masks outgoing frames).
            violation: Builds the exception raised when the peer breaks the
                protocol (a frame ``wsproto`` refuses to answer, or a text
                message under ``binary_only``), from a reason safe to log.
            binary_only: A text message is a violation (else its UTF-8 bytes
                are payload like a binary message's).
            trailing: Bytes already read after the 101 head.
            connection: A ``wsproto`` connection that is already past its
                handshake (``WSConnection.connection``) to continue, with any
                bytes it buffered; ``client`` and ``trailing`` are then unused.
        """
        self.transport_stream = transport
        if connection is None:
            kind = ConnectionType.CLIENT if client else ConnectionType.SERVER
            connection = Connection(kind, trailing_data=trailing)
        self._ws = connection
        self._violation = violation
        self._binary_only = binary_only
        self._pending = bytearray()
        self._eof = False
        self._send_lock = trio.StrictFIFOLock()

    async def _write(self, data: bytes) -> None:
        if data:
            async with self._send_lock:
                await self.transport_stream.send_all(data)

    async def _process(self) -> None:
        """Act on the events of the bytes received so far."""
        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                self._pending += event.data
            elif isinstance(event, TextMessage):
                if self._binary_only:
                    self._eof = True
                    raise self._violation("text message on a binary-only WebSocket")
                self._pending += event.data.encode()
            elif isinstance(event, Ping):
                await self._write(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._eof = True
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._write(self._ws.send(event.response()))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return payload bytes of the peer's messages; ``b""`` after a CLOSE or EOF.

        Raises:
            Exception: What ``violation`` builds, when the peer broke the protocol.
            trio.BrokenResourceError: The transport broke.
        """
        while not self._pending and not self._eof:
            try:
                await self._process()
            except WsLocalProtocolError as exc:
                raise self._violation(f"bad WebSocket frame: {exc}") from None
            if self._pending or self._eof:
                break
            data = bytes(await self.transport_stream.receive_some(_MAX_RECV))
            if not data:
                self._eof = True
                break
            self._ws.receive_data(data)
        limit = len(self._pending) if max_bytes is None else max_bytes
        out = bytes(self._pending[:limit])
        del self._pending[:limit]
        return out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one binary message.

        Raises:
            trio.ClosedResourceError: Either side began closing the WebSocket.
        """
        if not data:
            return
        if self._ws.state is not ConnectionState.OPEN:
            raise trio.ClosedResourceError("WebSocket is closing")
        await self._write(self._ws.send(Message(data=bytes(data))))

    async def wait_send_all_might_not_block(self) -> None:
        """Delegate to the transport."""
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send a CLOSE frame (best effort, within a second) and close the transport."""
        try:
            if self._ws.state is ConnectionState.OPEN:
                with trio.move_on_after(_CLOSE_TIMEOUT):
                    await self._write(self._ws.send(CloseConnection(code=1000)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, WsLocalProtocolError):
            pass
        finally:
            await self.transport_stream.aclose()
