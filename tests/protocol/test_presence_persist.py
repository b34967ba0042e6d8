"""Presence beside the log: ``last_seen`` survives a restart, and the ephemeral-node
clean-up counts from it instead of deleting every ephemeral node at start-up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from eventlog.sidetables import PresenceRecord
from projections.presence import PresenceTable
from tests.conftest import T0

from .control_harness import ADMIN, SimNode, make_key, running
from .test_control import next_update


def test_presence_table_changes_restore_and_shutdown() -> None:
    table = PresenceTable()
    table.restore([PresenceRecord(1, T0, True), PresenceRecord(9, T0, False)], known={1, 2})
    p = table.get(1)
    assert p is not None and not p.online and p.last_seen == T0  # nothing is online after a restart
    assert table.get(9) is None
    gen = table.connect(2, T0 + timedelta(minutes=1))
    save, forget = table.take_changes(T0 + timedelta(minutes=2), refresh_online=False)
    assert save == [PresenceRecord(2, T0 + timedelta(minutes=2), True)] and forget == [9]
    assert table.take_changes(T0, refresh_online=False) == ([], [])
    # Online nodes are refreshed (seen now) when asked, even without a change.
    save, _ = table.take_changes(T0 + timedelta(minutes=5), refresh_online=True)
    assert save == [PresenceRecord(2, T0 + timedelta(minutes=5), True)]
    table.disconnect(2, gen, T0 + timedelta(minutes=6))
    save, _ = table.take_changes(T0 + timedelta(minutes=7), refresh_online=False)
    assert save == [PresenceRecord(2, T0 + timedelta(minutes=6), False)]
    table.connect(2, T0 + timedelta(minutes=8))
    table.forget(1)
    assert table.final_records(T0 + timedelta(minutes=9)) == [PresenceRecord(2, T0 + timedelta(minutes=9), False)]
    assert table.take_changes(T0, refresh_online=False)[1] == [1]


async def test_ephemeral_node_survives_a_restart_within_its_timeout(tmp_path: Path) -> None:
    offset = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + offset[0]

    n = SimNode.new("runner")
    async with running(tmp_path) as server:
        server.tailnet.clock = clock
        key = await make_key(server, ephemeral=True)
        async with n.connect(server) as client:
            await client.register(n.register_request(key))
            async with client.map_stream(n.map_request()) as stream:
                await next_update(stream)
                # Online for 40 minutes: longer than the 30-minute inactivity timeout.
                offset[0] = timedelta(minutes=40)
        [node] = server.tailnet.state.nodes.values()
    # Stopped 40 minutes after it registered; back a minute later.
    offset[0] = timedelta(minutes=41)
    async with running(tmp_path) as server:
        server.tailnet.clock = clock
        p = server.presence.get(node.id) if server.presence else None
        assert p is not None and not p.online and p.last_seen is not None
        assert abs(p.last_seen - (datetime.now(UTC) + timedelta(minutes=40))) < timedelta(minutes=1)
        assert server.control is not None
        await server.control._collect_ephemeral()
        assert node.id in server.tailnet.state.nodes  # not deleted for being "inactive" since it registered
        shown = await server.ops.dispatch("nodes.show", {"node": str(node.id)}, ADMIN)
        assert isinstance(shown, dict) and shown["online"] is False
        # Its timeout counts from when it was last seen: 31 minutes after, it goes.
        offset[0] = timedelta(minutes=71)
        await server.control._collect_ephemeral()
        with trio.fail_after(10):
            await server.tailnet.runner.wait_for(server.store.head().seq)
        assert node.id not in server.tailnet.state.nodes
        assert [e.event.reason for e in server.store.read() if e.type == "node.deleted"] == ["ephemeral"]  # type: ignore[union-attr]





def test_the_presence_version_grows_with_every_change_and_only_then() -> None:
    """What keeps something derived from the presence (the admin API's node lists)
    compares the version: every change moves it, a no-op or a bookkeeping step not."""
    table = PresenceTable()
    seen = [table.version]

    def changed() -> bool:
        seen.append(table.version)
        return seen[-1] > seen[-2]

    table.restore([PresenceRecord(1, T0, False)], known={1})
    assert changed()
    gen = table.connect(1, T0 + timedelta(minutes=1))
    assert changed()
    table.connect(1, T0 + timedelta(minutes=2))  # a newer stream: last seen moves
    assert changed()
    assert not table.disconnect(1, gen, T0)  # an older stream ending changes nothing
    assert not changed()
    table.update(2, online=True, last_seen=T0)
    assert changed()
    table.update(2, online=True, last_seen=T0)  # the same again
    assert not changed()
    table.take_changes(T0 + timedelta(minutes=3), refresh_online=True)
    assert not changed()
    table.forget(2)
    assert changed()


def test_only_this_servers_nodes_are_written_and_marked_offline_at_shutdown() -> None:
    """With replicas, the table also holds other replicas' nodes (set by ``update``): this
    server refreshes and, when it stops, marks offline only the nodes connected to it."""
    table = PresenceTable()
    table.connect(1, T0)
    table.update(2, online=True, last_seen=T0)  # another replica's node
    assert table.is_local(1) and not table.is_local(2)
    save, _ = table.take_changes(T0 + timedelta(minutes=1), refresh_online=True)
    assert save == [PresenceRecord(1, T0 + timedelta(minutes=1), True)]
    assert table.final_records(T0 + timedelta(minutes=2)) == [PresenceRecord(1, T0 + timedelta(minutes=2), False)]
    gen = table.connect(3, T0)
    table.disconnect(3, gen, T0 + timedelta(minutes=3))
    assert not table.is_local(3)
