"""wire.wsstream: a byte stream over WebSocket messages, against a real wsproto peer.

Each test joins a :class:`WebSocketStream` to a bare ``wsproto`` connection (the
peer, which can send anything: pings, text, close) through trio's in-memory stream
pair, so what crosses is real WebSocket framing.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from wire.wsstream import WebSocketStream


class Violation(Exception):
    """What the streams under test raise for a peer's protocol violation."""


class Peer:
    """The far end: a frame-level wsproto connection on a raw memory stream."""

    def __init__(self, stream: trio.abc.Stream, *, client: bool = True) -> None:
        self.stream = stream
        self.ws = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)

    async def send(self, *events: Event) -> None:
        await self.stream.send_all(b"".join(self.ws.send(e) for e in events))

    async def events(self) -> list[Event]:
        """The events of the next bytes the stream under test wrote."""
        self.ws.receive_data(bytes(await self.stream.receive_some()))
        return list(self.ws.events())


def server_pair(*, binary_only: bool = False) -> tuple[WebSocketStream, Peer]:
    ours, theirs = trio.testing.memory_stream_pair()
    ws = WebSocketStream(ours, client=False, violation=Violation, binary_only=binary_only)
    return ws, Peer(theirs)


async def test_bytes_cross_both_ways_whatever_the_message_boundaries() -> None:
    ws, peer = server_pair()
    await peer.send(BytesMessage(data=b"hello "), BytesMessage(data=b"world"))
    assert await ws.receive_some(3) == b"hel"
    assert await ws.receive_some() == b"lo world"
    await ws.send_all(b"\x00\x01" * 10)
    assert await peer.events() == [BytesMessage(data=b"\x00\x01" * 10)]


async def test_ping_is_answered_and_does_not_read_as_data() -> None:
    ws, peer = server_pair()
    await peer.send(Ping(payload=b"p1"), BytesMessage(data=b"x"))
    assert await ws.receive_some() == b"x"
    assert await peer.events() == [Pong(payload=b"p1")]


async def test_close_from_the_peer_is_answered_and_reads_as_eof() -> None:
    ws, peer = server_pair()
    await peer.send(BytesMessage(data=b"last"), CloseConnection(code=1000))
    assert await ws.receive_some() == b"last"
    assert await ws.receive_some() == b""
    assert await ws.receive_some() == b""  # for good
    (reply,) = await peer.events()
    assert isinstance(reply, CloseConnection) and reply.code == 1000
    with pytest.raises(trio.ClosedResourceError):
        await ws.send_all(b"too late")


async def test_eof_of_the_transport_reads_as_eof() -> None:
    ws, peer = server_pair()
    await peer.stream.aclose()
    assert await ws.receive_some() == b""


async def test_text_is_payload_unless_binary_only() -> None:
    ws, peer = server_pair()
    await peer.send(TextMessage(data="grüß"))
    assert await ws.receive_some() == "grüß".encode()

    strict, peer = server_pair(binary_only=True)
    await peer.send(TextMessage(data="no"))
    with pytest.raises(Violation, match="text message"):
        await strict.receive_some()
    assert await strict.receive_some() == b""  # the stream ended with the violation


async def test_empty_send_sends_nothing() -> None:
    ws, peer = server_pair()
    await ws.send_all(b"")
    await ws.send_all(b"after")
    assert await peer.events() == [BytesMessage(data=b"after")]


async def test_aclose_sends_a_normal_close_and_closes_the_transport() -> None:
    ws, peer = server_pair()
    await ws.aclose()
    (close,) = await peer.events()
    assert isinstance(close, CloseConnection) and close.code == 1000
    assert await peer.stream.receive_some() == b""


async def test_client_role_masks_and_trailing_bytes_are_read_first() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    peer = Peer(theirs, client=False)
    early = peer.ws.send(BytesMessage(data=b"came with the 101"))
    ws = WebSocketStream(ours, client=True, violation=Violation, trailing=early)
    assert await ws.receive_some() == b"came with the 101"
    await ws.send_all(b"masked")
    # A server-role wsproto refuses unmasked client frames, so this proves the mask.
    assert await peer.events() == [BytesMessage(data=b"masked")]


async def test_a_handshaken_wsproto_connection_is_continued() -> None:
    """The DERP client does its own handshake with WSConnection; bytes that arrived
    with the 101 stay in that connection and must not be lost."""
    ours, theirs = trio.testing.memory_stream_pair()
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="relay", target="/derp")))
    assert any(isinstance(e, Request) for e in server.events())
    client.receive_data(
        server.send(AcceptConnection()) + server.send(BytesMessage(data=b"ServerKey"))
    )
    assert any(isinstance(e, AcceptConnection) for e in client.events())
    assert client.connection is not None
    ws = WebSocketStream(ours, client=True, violation=Violation, connection=client.connection)
    assert await ws.receive_some() == b"ServerKey"
    await ws.send_all(b"ClientInfo")
    assert server.connection is not None and server.connection.state is ConnectionState.OPEN
    server.receive_data(bytes(await theirs.receive_some()))
    assert list(server.events()) == [BytesMessage(data=b"ClientInfo")]
