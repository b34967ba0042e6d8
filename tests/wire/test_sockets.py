"""wire.sockets: the peer's address under TLS and WebSocket layers, on real TCP sockets."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from wire.sockets import format_address, peer_address, peer_name, plain_socket, write_nowait
from wire.wsstream import WebSocketStream


@asynccontextmanager
async def tcp_pair(host: str) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """An accepted server-side stream and the client stream connected to it."""
    (listener,) = await trio.open_tcp_listeners(0, host=host)
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream(host, port)
        server = await listener.accept()
        async with client, server:
            yield server, client


async def test_plain_tls_and_websocket_layers_show_the_same_peer() -> None:
    async with tcp_pair("127.0.0.1") as (server, client):
        expected = ("127.0.0.1", client.socket.getsockname()[1])
        tls = trio.SSLStream(server, ssl.create_default_context(), server_side=False)
        ws = WebSocketStream(tls, client=False, violation=RuntimeError)
        for stream in (server, tls, ws):
            assert peer_address(stream) == expected
            assert peer_name(stream) == f"127.0.0.1:{expected[1]}"


async def test_ipv6_peer_is_address_and_port() -> None:
    try:
        (probe,) = await trio.open_tcp_listeners(0, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    await probe.aclose()
    async with tcp_pair("::1") as (server, client):
        port = client.socket.getsockname()[1]
        assert peer_address(server) == ("::1", port)  # not getpeername's 4-tuple
        assert peer_name(server) == f"::1:{port}"


async def test_unknown_peers_never_raise() -> None:
    async with tcp_pair("127.0.0.1") as (server, _client):
        server.socket.close()  # getpeername now fails
        assert peer_address(server) is None
        assert peer_name(server) == "?"
    memory, _ = trio.testing.memory_stream_pair()  # no socket under it at all
    assert peer_address(memory) is None
    assert peer_name(memory) == "?"
    assert format_address(None) == "?"


async def test_only_a_plain_tcp_stream_offers_its_socket() -> None:
    async with tcp_pair("127.0.0.1") as (server, _client):
        assert plain_socket(server) is server.socket
        tls = trio.SSLStream(server, ssl.create_default_context(), server_side=False)
        assert plain_socket(tls) is None  # TLS records: the socket does not show them
        assert plain_socket(WebSocketStream(server, client=False, violation=RuntimeError)) is None


async def test_write_nowait_writes_what_fits_and_returns_the_rest_in_order() -> None:
    async with tcp_pair("127.0.0.1") as (server, client):
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = plain_socket(client)
        assert sock is not None
        fd = sock.fileno()
        assert write_nowait(fd, b"small") is None
        assert await server.receive_some(5) == b"small"
        # Fill the send buffer (and the peer's receive buffer): the rest comes back.
        sent = b""
        chunk = bytes(range(256)) * 64
        while (rest := write_nowait(fd, chunk)) is None:
            sent += chunk
        sent += chunk[: len(chunk) - len(rest)]
        assert bytes(rest) == chunk[len(chunk) - len(rest) :]
        full = write_nowait(fd, b"more")
        assert full is not None and bytes(full) == b"more"  # nothing taken: all of it back
        got = b""
        while len(got) < len(sent):
            got += await server.receive_some()
        assert got == sent


async def test_write_nowait_raises_when_the_connection_failed() -> None:
    async with tcp_pair("127.0.0.1") as (server, client):
        # Close with a reset (linger 0) so that the client's socket is broken at once.
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.socket.close()
        sock = plain_socket(client)
        assert sock is not None
        with pytest.raises(ConnectionError):  # reset or broken pipe
            write_nowait(sock.fileno(), b"to nobody")
