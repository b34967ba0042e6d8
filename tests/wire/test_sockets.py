"""wire.sockets: the peer's address under TLS and WebSocket layers, on real TCP sockets."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from wire.sockets import format_address, peer_address, peer_name
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
