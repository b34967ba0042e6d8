"""Our own Python clients, run by the test process inside the test's namespace.

Role: the e2e relay tests need a few things no real Tailscale client offers on
demand: registering a node key that belongs to someone else (tailcat's keys),
reading the DERP map the control server hands out, opening a DERP connection
with an arbitrary key, sending one STUN binding request, and reading the
server's ``/metrics``. This module does each with our own code
(`protocol.open_control_client`, `relay.connect_derp`, `relay.stun`) from
inside the namespace, so it reaches the servers on the namespace loopback.

How trio code reaches the namespace: `namespace_sockets` installs a trio socket
factory (``trio.socket.set_custom_socket_factory``) that creates every new
socket of the current ``trio.run`` inside the namespace. Library code that
calls ``trio.open_tcp_stream`` (our control and DERP clients) therefore works
unchanged. The factory is run-local and removed on exit; only use it inside an
``async def`` test.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from projections.tailcfg import (
    DERPMap,
    Hostinfo,
    MapRequest,
    NetInfo,
    RegisterRequest,
    RegisterResponse,
    RegisterResponseAuth,
)
from protocol import generate_private_key, open_control_client, public_key
from relay.stun import binding_request, new_transaction_id, parse_binding_response

from .netns import LOOPBACK, NetNamespace

__all__ = [
    "RegisteredKey",
    "fetch_derp_map",
    "namespace_sockets",
    "parse_metrics",
    "register_node_key",
    "stun_binding",
]

#: Capability version of the simulated registrations (Tailscale v1.90).
CAPABILITY_VERSION = 130


class _NamespaceSocketFactory(trio.abc.SocketFactory):
    """Creates trio sockets inside one network namespace."""

    def __init__(self, ns: NetNamespace) -> None:
        self._ns = ns

    def socket(
        self,
        family: socket.AddressFamily | int = socket.AF_INET,
        type: socket.SocketKind | int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> trio.socket.SocketType:
        with self._ns.entered():
            sock = socket.socket(family, type, proto)
        return trio.socket.from_stdlib_socket(sock)


@contextmanager
def namespace_sockets(ns: NetNamespace) -> Iterator[None]:
    """Make every trio socket created in the body live in `ns`.

    Must be used inside ``trio.run`` (an async test). Restores the previous
    factory on exit.
    """
    previous = trio.socket.set_custom_socket_factory(_NamespaceSocketFactory(ns))
    try:
        yield
    finally:
        trio.socket.set_custom_socket_factory(previous)


class RegisteredKey:
    """A node key registered through the control protocol, with the machine key used.

    Attributes:
        node_public: The node's 32-byte public key.
        machine_private: The machine key the registration came from.
        hostname: The hostname it registered with.
        response: The server's answer.
    """

    def __init__(
        self,
        node_public: bytes,
        machine_private: bytes,
        hostname: str,
        response: RegisterResponse,
    ) -> None:
        self.node_public = node_public
        self.machine_private = machine_private
        self.hostname = hostname
        self.response = response

    @property
    def node_key(self) -> str:
        """``nodekey:<hex>``."""
        return "nodekey:" + self.node_public.hex()


async def register_node_key(
    port: int,
    node_public: bytes,
    *,
    auth_key: str,
    hostname: str,
    host: str = LOOPBACK,
) -> RegisteredKey:
    """Register `node_public` as a new node with a pre-auth key, like a client would.

    Any machine key will do (a fresh one is made); the server never asks the
    node key's owner to prove possession at registration, which is what lets a
    test register keys that tailcat generated.

    Args:
        port: The control server's port.
        node_public: 32-byte node public key to register.
        auth_key: A pre-auth key.
        hostname: Requested hostname.
        host: The control server's address.

    Returns:
        The registration; check ``response.machine_authorized``.

    Raises:
        protocol.RemoteProtocolError: The server refused the request outright.
    """
    machine = generate_private_key()
    request = RegisterRequest(
        version=CAPABILITY_VERSION,
        node_key="nodekey:" + node_public.hex(),
        auth=RegisterResponseAuth(auth_key=auth_key),
        hostinfo=Hostinfo(hostname=hostname, os="linux"),
    )
    async with open_control_client(host, port, machine_key=machine) as client:
        response = await client.register(request)
    return RegisteredKey(node_public, machine, hostname, response)


async def fetch_derp_map(port: int, node: RegisteredKey, *, host: str = LOOPBACK) -> DERPMap:
    """The DERP map the control server gives `node` (one non-streaming map request).

    Raises:
        AssertionError: The first map response carries no DERP map.
    """
    request = MapRequest(
        version=CAPABILITY_VERSION,
        compress="zstd",
        node_key=node.node_key,
        disco_key="discokey:" + public_key(os.urandom(32)).hex(),
        hostinfo=Hostinfo(hostname=node.hostname, os="linux", net_info=NetInfo()),
        stream=False,
    )
    async with (
        open_control_client(host, port, machine_key=node.machine_private) as client,
        client.map_stream(request) as stream,
    ):
        async for response in stream:
            assert response.derp_map is not None, response
            return response.derp_map
    raise AssertionError("the map request ended without a MapResponse")


def stun_binding(
    ns: NetNamespace, host: str, port: int, *, source: str = LOOPBACK, timeout: float = 5.0
) -> tuple[tuple[str, int], tuple[str, int]]:
    """Send one STUN binding request from inside `ns` and parse the answer.

    Args:
        ns: Namespace to send from.
        host: The STUN server's address.
        port: Its UDP port.
        source: Local address to send from.
        timeout: Seconds to wait for the answer.

    Returns:
        ``((our_ip, our_port), (mapped_ip, mapped_port))``: the address we sent
        from, and the XOR-MAPPED-ADDRESS the server reported.

    Raises:
        AssertionError: The answer belongs to another transaction.
        TimeoutError: No answer in time.
    """
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        txid = new_transaction_id()
        sock.sendto(binding_request(txid), (host, port))
        data, _ = sock.recvfrom(2048)
        got_txid, mapped_ip, mapped_port = parse_binding_response(data)
        assert got_txid == txid, (got_txid, txid)
        ip, local_port = sock.getsockname()[:2]
        return (str(ip), int(local_port)), (mapped_ip, mapped_port)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> ``{sample name (with labels): value}``."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples
