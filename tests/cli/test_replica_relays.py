"""Two in-process ``serve`` replicas on one PostgreSQL log: their embedded relays (on
the control port) mesh, both serve one region listing both relays, and nodes homed on
different replicas' relays reach each other through the mesh."""

from __future__ import annotations

from pathlib import Path

import trio

from cli.server import Services
from relay import connect_derp
from relay.derp.client import PacketReceived
from tests.protocol.control_harness import SimNode, make_key, running
from tests.support.relay_helpers import recv_packet
from tests.support.waits import wait_until


def _replica(tmp_path: Path, pg_dsn: str) -> dict[str, object]:
    return {
        "database": {"type": "postgres", "dsn": pg_dsn},
        "audit": {"signing_key_file": str(tmp_path / "signing.key")},
        "derp": {"server": {"stun": False}},  # the relay on the control port, no STUN
    }


def _region_nodes(server: Services) -> list[str]:
    assert server.control is not None
    derp = server.control.streams.settings.netmap.derp_map
    region = (derp.regions or {}).get(999) if derp is not None else None
    return [n.name for n in (region.nodes or [])] if region is not None else []


async def test_clients_of_two_replicas_meet_through_their_meshed_relays(pg_dsn: str, tmp_path: Path) -> None:
    b_scope = trio.CancelScope()

    async def run_b(*, task_status: trio.TaskStatus[Services] = trio.TASK_STATUS_IGNORED) -> None:
        with b_scope:
            async with running(tmp_path / "b", **_replica(tmp_path, pg_dsn)) as b:
                task_status.started(b)
                await trio.sleep_forever()

    with trio.fail_after(120):  # a guard against hanging, not a timing assertion
        async with running(tmp_path / "a", **_replica(tmp_path, pg_dsn)) as a, trio.open_nursery() as nursery:
            b: Services = await nursery.start(run_b)
            assert a.relay is not None and b.relay is not None
            relay_a, relay_b = a.relay, b.relay
            node_a, node_b = f"999-{a.replica_id}", f"999-{b.replica_id}"
            # One region of two nodes; each replica lists its own relay first, so its
            # clients home there.
            await wait_until(
                lambda: _region_nodes(a) == [node_a, node_b] and _region_nodes(b) == [node_b, node_a],
                what="one region, two nodes",
            )
            await wait_until(lambda: len(relay_a.mesh_peers) == 1 and len(relay_b.mesh_peers) == 1)

            # Two registered nodes, each homed on the relay of a different replica.
            key = await make_key(a, reusable=True)
            one, two = SimNode.new("one"), SimNode.new("two")
            async with one.connect(a) as ca, two.connect(b) as cb:
                await ca.register(one.register_request(key))
                await cb.register(two.register_request(key))
            on_a = await connect_derp(f"http://127.0.0.1:{a.port}/derp", one.node_private)
            on_b = await connect_derp(f"http://127.0.0.1:{b.port}/derp", two.node_private)
            async with on_a, on_b:
                await wait_until(lambda: relay_a.stats().forwarded_keys == relay_b.stats().forwarded_keys == 1)
                await on_a.send(on_b.public_key, b"through the mesh")
                assert await recv_packet(on_b) == PacketReceived(source=on_a.public_key, data=b"through the mesh")
                await on_b.send(on_a.public_key, b"and back")
                assert await recv_packet(on_a) == PacketReceived(source=on_b.public_key, data=b"and back")

            # Replica b stops: a's map is its own relay again, and its link to b closes.
            b_scope.cancel()
            await wait_until(lambda: _region_nodes(a) == [f"999-{a.replica_id}"] and relay_a.mesh_peers == ())
