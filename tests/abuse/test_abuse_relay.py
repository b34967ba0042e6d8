"""Authorised nodes abusing the embedded DERP relay of a real ``tailledger serve``.

Finding (issue 14, item 7): the relay had no per-node rate or connection limits,
so any registered node could crowd out a victim's queue (a full queue drops its
oldest packets, so a flood pushes everybody else's packets to the victim out)
and open as many connections under one node key as it liked.

Each test starts ``tailledger serve`` with the relay enabled and its limits set
through the environment (``TAILLEDGER_DERP__SERVER__*``), registers node keys
with a pre-auth key over the real control protocol, and talks DERP to the relay
over TCP with our DERP client. The counters are read from the server's
``/metrics`` (on ``metrics_listen_addr``).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from projections.tailcfg import Hostinfo, RegisterRequest, RegisterResponseAuth
from protocol import open_control_client
from relay import DerpClient, UnauthorizedError, connect_derp, generate_private_key, public_key_of
from relay.derp.client import PacketReceived, PongReceived
from relay.derp.server import MIN_RATE_BURST
from tests.support.waits import wait_until

from ..cli.server_process import RunningServer, free_port, running_server
from ..e2e.nsclients import CAPABILITY_VERSION, parse_metrics

#: Bytes per second each node key may send in these tests: low enough that the
#: flood's refill during a slow test run stays far below one queue's worth.
RATE = 1000
#: 60 KB packets: one flood phase is 250 of them, 15 MB, far more than the
#: victim's socket buffers and 32-packet queue hold.
FLOOD_PACKET = b"\xf1" * 60_000
FLOOD_PACKETS = 250


@contextmanager
def relay_server(tmp_path: Path, **limits: str) -> Iterator[tuple[RunningServer, str, int]]:
    """``tailledger serve`` with its relay on plain HTTP; yields (server, DERP URL, metrics port)."""
    derp_port, stun_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        "TAILLEDGER_DERP__SERVER__ENABLED": "true",
        "TAILLEDGER_DERP__SERVER__TLS": "false",
        "TAILLEDGER_DERP__SERVER__LISTEN_ADDR": f"127.0.0.1:{derp_port}",
        "TAILLEDGER_DERP__SERVER__STUN_LISTEN_ADDR": f"127.0.0.1:{stun_port}",
        "TAILLEDGER_METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics_port}",
        **{f"TAILLEDGER_DERP__SERVER__{k.upper()}": v for k, v in limits.items()},
    }
    with running_server(tmp_path / "data", extra_env=env) as server:
        yield server, f"http://127.0.0.1:{derp_port}/derp", metrics_port


def relay_counters(metrics_port: int) -> dict[str, float]:
    """The ``tailledger_relay_*`` samples of the server's ``/metrics``, prefix stripped."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        name.removeprefix("tailledger_relay_"): value
        for name, value in parse_metrics(text).items()
        if name.startswith("tailledger_relay_")
    }


async def register_nodes(server: RunningServer, count: int) -> list[bytes]:
    """Register ``count`` fresh node keys with a pre-auth key; return their private keys."""
    server.cli("users", "create", "relayabuse", check=True)
    auth = server.cli(
        "preauthkeys", "create", "-u", "relayabuse", "--reusable", "-e", "1h", check=True
    ).stdout.strip()
    keys = []
    for i in range(count):
        node = generate_private_key()
        request = RegisterRequest(
            version=CAPABILITY_VERSION,
            node_key="nodekey:" + public_key_of(node).hex(),
            auth=RegisterResponseAuth(auth_key=auth),
            hostinfo=Hostinfo(hostname=f"relay-abuse-{i}", os="linux"),
        )
        async with open_control_client(
            "127.0.0.1", server.port, machine_key=generate_private_key()
        ) as client:
            response = await client.register(request)
        assert response.machine_authorized, response
        keys.append(node)
    return keys


async def connect_admitted(url: str, private_key: bytes) -> DerpClient:
    """Connect once the relay, which follows the log, admits the freshly registered key."""

    async def admitted() -> DerpClient | None:
        try:
            return await connect_derp(url, private_key)
        except (UnauthorizedError, OSError):
            return None  # the relay polls the log; nothing to wait on

    return await wait_until(admitted, what="the relay to admit the key", seconds=30)


async def round_trip(client: DerpClient, token: bytes) -> None:
    """Ping the relay and wait for the pong: every frame sent before is processed."""
    await client.ping(token)
    with trio.fail_after(30):
        while await client.recv() != PongReceived(data=token):
            pass


async def flood(flooder: DerpClient, victim: bytes, token: bytes) -> None:
    await flooder.send_many((victim, FLOOD_PACKET) for _ in range(FLOOD_PACKETS))
    await round_trip(flooder, token)


async def test_a_flooding_node_does_not_starve_a_victims_traffic(tmp_path: Path) -> None:
    with relay_server(
        tmp_path, rate_limit=str(RATE), rate_burst=str(MIN_RATE_BURST)
    ) as (server, url, metrics_port):
        victim_key, peer_key, flooder_key = await register_nodes(server, 3)
        victim = await connect_admitted(url, victim_key)  # reads nothing until the end
        peer = await connect_admitted(url, peer_key)
        flooder = await connect_admitted(url, flooder_key)
        async with victim, peer, flooder:
            # The limit is announced: a Tailscale client paces itself by it.
            info = flooder.server_info
            assert info is not None
            assert (info.token_bucket_bytes_per_second, info.token_bucket_bytes_burst) == (
                RATE,
                MIN_RATE_BURST,
            )
            # The victim's socket buffers and queue are full of flood before the
            # peer speaks, and the flood goes on after it: without the bucket every
            # one of the peer's packets is pushed out of the victim's queue.
            await flood(flooder, victim.public_key, b"flood #1")
            await peer.send_many((victim.public_key, b"peer %d" % i) for i in range(4))
            await round_trip(peer, b"peer end")
            await flood(flooder, victim.public_key, b"flood #2")

            from_peer: list[bytes] = []
            from_flooder = 0
            with trio.fail_after(30):
                while len(from_peer) < 4:
                    event = await victim.recv()
                    if isinstance(event, PacketReceived) and event.source == peer.public_key:
                        from_peer.append(event.data)
                    elif isinstance(event, PacketReceived):
                        from_flooder += 1
        assert from_peer == [b"peer %d" % i for i in range(4)]
        # Only the burst (one 64 KiB of frames) and the trickle earned since got
        # through from the flooder: 2 * 250 packets were sent.
        assert from_flooder < 10
        counters = relay_counters(metrics_port)
        assert counters['drops{reason="rate_limited"}'] >= 2 * FLOOD_PACKETS - 10
        assert counters['bytes_dropped{reason="rate_limited"}'] >= (2 * FLOOD_PACKETS - 10) * len(
            FLOOD_PACKET
        )


async def test_connections_beyond_the_per_key_cap_are_refused(tmp_path: Path) -> None:
    with relay_server(
        tmp_path, max_conns_per_key="2", key_limit_policy="refuse_new"
    ) as (server, url, metrics_port):
        key, other_key = await register_nodes(server, 2)
        first = await connect_admitted(url, key)
        second = await connect_admitted(url, key)
        other = await connect_admitted(url, other_key)
        async with first, second, other:
            # The key is admitted (two connections are up): the third is refused
            # for the cap alone, and the two keep working.
            with pytest.raises(UnauthorizedError):
                await connect_derp(url, key)
            await other.send(public_key_of(key), b"still served")
            with trio.fail_after(30):
                while not isinstance(event := await second.recv(), PacketReceived):
                    pass
            assert event.data == b"still served"
            await round_trip(first, b"first ok")
        counters = relay_counters(metrics_port)
        assert counters["refused_key_limit"] == 1
        assert counters["closed_key_limit"] == 0
