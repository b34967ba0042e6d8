"""The embedded relays of two replicas on one PostgreSQL log find each other and mesh."""

from __future__ import annotations

from pathlib import Path

import trio

from cli.relaymesh import mesh_peer_of, mesh_replicas, shared_mesh_key
from eventlog.pgstore import PostgresSideTables
from projections.tailcfg import DERPNode
from relay import connect_derp
from relay.derp.client import PacketReceived
from relay.keys import generate_private_key
from relay.serve import RelayServer
from tests.support.relay_helpers import recv_packet, running_relay
from tests.support.waits import wait_until


def test_the_first_replica_generates_the_mesh_key_and_the_others_share_it(pg_dsn: str) -> None:
    a, b = PostgresSideTables(pg_dsn), PostgresSideTables(pg_dsn)
    try:
        first = trio.run(shared_mesh_key, a, None)
        assert len(first) == 64 and int(first, 16) >= 0
        assert trio.run(shared_mesh_key, b, None) == first
        assert trio.run(shared_mesh_key, b, "cd" * 32) == "cd" * 32  # configured wins
    finally:
        a.close()
        b.close()


def test_a_mesh_peer_is_dialled_as_clients_dial_the_node() -> None:
    node = DERPNode(name="999-a", region_id=999, host_name="ctl.example", derp_port=8443, cert_name="sha256-raw:ab")
    assert mesh_peer_of(node) == {
        "url": "https://ctl.example:8443/derp", "cert_name": "sha256-raw:ab", "dial_host": None,
    }
    v6 = DERPNode(name="x", region_id=1, host_name="::1", ipv4="192.0.2.1")
    assert mesh_peer_of(v6) == {"url": "https://[::1]:443/derp", "cert_name": None, "dial_host": "192.0.2.1"}


async def test_clients_on_two_replicas_relays_meet_through_the_mesh(pg_dsn: str, tmp_path: Path) -> None:
    side_a, side_b = PostgresSideTables(pg_dsn), PostgresSideTables(pg_dsn)
    maps: dict[str, list[list[str]]] = {"a": [], "b": []}
    try:
        mesh_key = await shared_mesh_key(side_a, None)
        assert await shared_mesh_key(side_b, None) == mesh_key
        # Each replica holds its liveness lock (the presence sharing takes it in a server).
        await trio.to_thread.run_sync(side_a.hold_liveness, "a")
        await trio.to_thread.run_sync(side_b.hold_liveness, "b")
        with trio.fail_after(60):  # a guard against hanging, not a timing assertion
            async with (
                running_relay(tmp_path / "a", mesh_key=mesh_key) as relay_a,
                running_relay(tmp_path / "b", mesh_key=mesh_key) as relay_b,
                trio.open_nursery() as nursery,
            ):

                async def replica(
                    name: str, relay: RelayServer, side: PostgresSideTables, scope: trio.CancelScope
                ) -> None:
                    node = relay.derp_node(name=f"999-{name}")
                    with scope:
                        await mesh_replicas(
                            relay, side, name, node,
                            lambda nodes: maps[name].append([n.name for n in nodes]),
                            own_peer={"url": relay.url}, poll=0.05,
                        )

                scope_a, scope_b = trio.CancelScope(), trio.CancelScope()
                nursery.start_soon(replica, "a", relay_a, side_a, scope_a)
                nursery.start_soon(replica, "b", relay_b, side_b, scope_b)
                await wait_until(lambda: relay_a.mesh_peers == (relay_b.url,) and relay_b.mesh_peers == (relay_a.url,))
                # Both serve one region listing both relays, each its own first.
                await wait_until(lambda: maps["a"][-1:] == [["999-a", "999-b"]] and maps["b"][-1:] == [["999-b", "999-a"]])

                on_a = await connect_derp(relay_a.url, generate_private_key())
                on_b = await connect_derp(relay_b.url, generate_private_key())
                async with on_a, on_b:
                    await wait_until(
                        lambda: relay_a.stats().forwarded_keys == 1 and relay_b.stats().forwarded_keys == 1
                    )
                    await on_a.send(on_b.public_key, b"a to b")
                    assert await recv_packet(on_b) == PacketReceived(source=on_a.public_key, data=b"a to b")
                    await on_b.send(on_a.public_key, b"b to a")
                    assert await recv_packet(on_a) == PacketReceived(source=on_b.public_key, data=b"b to a")

                # Replica b goes away: its session (and liveness lock) with it. a closes
                # its link to b's relay and serves a map with its own relay only.
                scope_b.cancel()
                await trio.to_thread.run_sync(side_b.close)
                await wait_until(lambda: relay_a.mesh_peers == () and maps["a"][-1] == ["999-a"])
                assert relay_a.stats().forwarded_keys == 0
                scope_a.cancel()
    finally:
        side_a.close()
        side_b.close()
