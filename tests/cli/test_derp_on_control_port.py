"""With no configuration the embedded relay is served on the control port at ``/derp``.

A real :class:`~cli.server.Services` with the default ``[derp]`` settings: its DERP map
names the control port (host and port of the server URL, the self-signed relay
certificate pinned by ``CertName``), registered nodes reach each other through
``https://host:port/derp`` (the control port tells a TLS ClientHello from HTTP) and
through plain ``http://…/derp`` (what a TLS-terminating proxy in front forwards),
and the relay still admits only registered nodes.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from projections.tailcfg import DERPMap, DERPNode
from relay import UnauthorizedError, connect_derp
from tests.protocol.control_harness import SimNode, make_key, running
from tests.support.relay_helpers import recv_packet


async def _derp_map(server: object, node: SimNode, key: str) -> DERPMap:
    from cli.server import Services

    assert isinstance(server, Services)
    async with node.connect(server) as client:
        await client.register(node.register_request(key))
        async with client.map_stream(node.map_request()) as stream:
            async for msg in stream:
                if msg.derp_map is not None:
                    return msg.derp_map
    raise AssertionError("no DERP map")


def _only_node(derp: DERPMap) -> DERPNode:
    (region,) = (derp.regions or {}).values()
    assert region is not None and region.nodes
    (node,) = region.nodes
    return node


async def _exchange(url: str, cert_name: str | None, a: SimNode, b: SimNode) -> bytes:
    async with (
        await connect_derp(url, a.node_private, cert_name=cert_name) as ca,
        await connect_derp(url, b.node_private, cert_name=cert_name) as cb,
    ):
        b_public = bytes.fromhex(b.node_key.removeprefix("nodekey:"))
        await ca.send(b_public, b"ping through the control port")  # both are logged in
        return (await recv_packet(cb, seconds=10)).data


async def test_zero_config_relay_rides_the_control_port(tmp_path: Path) -> None:
    async with running(tmp_path, derp={"server": {"stun_listen_addr": "127.0.0.1:0"}}) as server:
        key = await make_key(server, reusable=True)
        a, b = SimNode.new("alpha"), SimNode.new("bravo")
        derp = await _derp_map(server, a, key)
        await _derp_map(server, b, key)
        node = _only_node(derp)
        assert server.relay is not None and server.relay.stun is not None
        assert (node.host_name, node.derp_port, node.stun_port) == ("127.0.0.1", server.port, server.relay.stun.port)
        assert node.cert_name is not None and node.cert_name == server.relay.cert_name
        # As a Tailscale client dials it: https on the control port, the pin checked.
        got = await _exchange(f"https://127.0.0.1:{server.port}/derp", node.cert_name, a, b)
        assert got == b"ping through the control port"
        # Plain /derp, as a TLS-terminating proxy in front would forward it.
        got = await _exchange(f"http://127.0.0.1:{server.port}/derp", None, a, b)
        assert got == b"ping through the control port"
        # Only registered nodes get in.
        with pytest.raises(UnauthorizedError):
            await connect_derp(f"https://127.0.0.1:{server.port}/derp", os.urandom(32), cert_name=node.cert_name)
        # The rest of the port is still the control server's web app.
        async with httpx.AsyncClient() as http:
            resp = await http.get(f"http://127.0.0.1:{server.port}/derp/probe")
            assert resp.status_code == 200
            resp = await http.get(f"http://127.0.0.1:{server.port}/key?v=130")
            assert resp.status_code == 200 and "publicKey" in resp.text


async def test_the_map_names_the_server_url(tmp_path: Path) -> None:
    overrides = {"server_url": "https://ts.example.com", "derp": {"server": {"stun_listen_addr": "127.0.0.1:0"}}}
    async with running(tmp_path, **overrides) as server:
        key = await make_key(server)
        node = _only_node(await _derp_map(server, SimNode.new("alpha"), key))
        # https: TLS is the proxy's (or the control port's) business, with a CA certificate.
        # (DERPPort 0 is 443 to a client; no CertName: no pin.)
        assert (node.host_name, node.derp_port, node.cert_name) == ("ts.example.com", 0, "")


async def test_a_separate_listener_stays_an_option(tmp_path: Path) -> None:
    derp = {"server": {"listen_addr": "127.0.0.1:0", "stun_listen_addr": "127.0.0.1:0", "tls": False}}
    async with running(tmp_path, derp=derp) as server:
        key = await make_key(server)
        node = _only_node(await _derp_map(server, SimNode.new("alpha"), key))
        assert server.relay is not None
        assert node.derp_port == server.relay.derp_port != server.port


async def test_relay_off_leaves_the_map_to_the_sources(tmp_path: Path) -> None:
    async with running(tmp_path, derp={"server": {"enabled": False}}) as server:
        key = await make_key(server)
        derp = await _derp_map(server, SimNode.new("alpha"), key)
        assert server.relay is None and not derp.regions


@contextmanager
def _hold_udp(port: int) -> Iterator[None]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with contextlib.suppress(OSError):  # taken already: what the test needs
            sock.bind(("127.0.0.1", port))
        yield
    finally:
        sock.close()


async def test_a_taken_default_stun_port_costs_only_stun(tmp_path: Path) -> None:
    with _hold_udp(3478):
        async with running(tmp_path) as server:
            key = await make_key(server)
            node = _only_node(await _derp_map(server, SimNode.new("alpha"), key))
            assert server.relay is not None and server.relay.stun is None
            assert node.stun_port == -1  # no STUN announced


async def test_a_taken_explicit_stun_port_stops_the_server(tmp_path: Path) -> None:
    with _hold_udp(3478), pytest.raises(ExceptionGroup) as info:
        async with running(tmp_path, derp={"server": {"stun_listen_addr": "127.0.0.1:3478"}}):
            pass
    assert info.group_contains(OSError)
