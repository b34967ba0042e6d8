"""Live presence between replicas: a change on one replica's table reaches the other's
(and so its clients), coalesced, without echo."""

from __future__ import annotations

import functools

import psycopg
import trio

from eventlog.pgstore import PostgresEventStore, PostgresSideTables
from projections.presence import PresenceTable
from projections.presence_share import share_presence
from tests.conftest import T0
from tests.support.waits import wait_until


async def test_presence_set_on_one_replica_reaches_the_other(pg_dsn: str) -> None:
    PostgresEventStore(pg_dsn).close()  # the schema
    side_a, side_b = PostgresSideTables(pg_dsn), PostgresSideTables(pg_dsn)
    table_a, table_b = PresenceTable(), PresenceTable()
    seen_on_b: list[set[int]] = []
    watcher = table_b.watch()
    with trio.fail_after(60):  # a guard against hanging, not a timing assertion
        async with trio.open_nursery() as nursery:
            await nursery.start(share_presence, table_a, side_a, "a")
            await nursery.start(share_presence, table_b, side_b, "b")
            table_a.connect(5, T0)
            table_a.update(5, endpoints=("192.0.2.5:41641",), disco_key="discokey:" + "ab" * 32, home_derp=900)
            await wait_until(lambda: (p := table_b.get(5)) is not None and p.home_derp == 900)
            seen_on_b.append(watcher.take())  # b's watchers (its clients' fan-out) heard it
            p = table_b.get(5)
            assert p is not None and p.online and p.endpoints == ("192.0.2.5:41641",)
            assert p.disco_key == "discokey:" + "ab" * 32

            table_b.update(6, online=True, home_derp=901)  # the other way round
            await wait_until(lambda: (q := table_a.get(6)) is not None and q.home_derp == 901)

            table_a.update(5, online=False)  # going offline travels too
            await wait_until(lambda: (p := table_b.get(5)) is not None and not p.online)
            await trio.sleep(0.3)  # time for an echo, if there were one
            nursery.cancel_scope.cancel()
    assert 5 in seen_on_b[0]
    with psycopg.connect(pg_dsn) as conn:
        rows: dict[int, str] = dict(conn.execute("SELECT node_id, replica FROM presence_live").fetchall())
    assert rows == {5: "a", 6: "b"}  # nobody sent the other's node back
    side_a.close()
    side_b.close()


def _row(dsn: str, node_id: int) -> tuple[str, bool]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT replica, online FROM presence_live WHERE node_id = %s", (node_id,)).fetchone()
    assert row is not None
    return str(row[0]), bool(row[1])


async def test_the_nodes_of_a_replica_that_dies_go_offline_everywhere(pg_dsn: str) -> None:
    """Replica a dies without a word (its tasks stop, its sessions drop, as with kill -9):
    b marks a's nodes offline, and only those; a node that a's death did not concern
    (published online by b itself) stays online."""
    PostgresEventStore(pg_dsn).close()
    side_a, side_b = PostgresSideTables(pg_dsn), PostgresSideTables(pg_dsn)
    table_a, table_b = PresenceTable(), PresenceTable()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            scope_a = trio.CancelScope()

            async def replica_a(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with scope_a:
                    await share_presence(table_a, side_a, "a", poll=0.1, task_status=task_status)

            await nursery.start(replica_a)
            await nursery.start(functools.partial(share_presence, table_b, side_b, "b", poll=0.1))
            table_a.connect(5, T0)
            table_b.connect(6, T0)
            await wait_until(lambda: (p := table_b.get(5)) is not None and p.online)
            await wait_until(lambda: (p := table_a.get(6)) is not None and p.online)
            await trio.sleep(0.5)  # several sweeps: a is alive, so nothing of it is touched
            assert _row(pg_dsn, 5) == ("a", True)

            scope_a.cancel()  # a stops publishing: node 5 is still "online" in the shared table
            side_a.close()  # and its sessions (with its liveness lock) are gone
            await wait_until(lambda: (p := table_b.get(5)) is not None and not p.online)
            assert _row(pg_dsn, 5) == ("a", False)
            assert _row(pg_dsn, 6) == ("b", True)
            p6 = table_b.get(6)
            assert p6 is not None and p6.online
            nursery.cancel_scope.cancel()
    side_b.close()


async def test_a_replica_marked_gone_while_alive_says_its_nodes_are_online_again(pg_dsn: str) -> None:
    """If another replica took this one for gone (its session was cut and came back) and
    marked its connected nodes offline, it publishes them again instead of believing it."""
    PostgresEventStore(pg_dsn).close()
    side_a, side_b = PostgresSideTables(pg_dsn), PostgresSideTables(pg_dsn)
    table_a, table_b = PresenceTable(), PresenceTable()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(share_presence, table_a, side_a, "a", poll=0.1))
            await nursery.start(functools.partial(share_presence, table_b, side_b, "b", poll=0.1))
            table_a.connect(5, T0)
            await wait_until(lambda: (p := table_b.get(5)) is not None and p.online)
            with psycopg.connect(pg_dsn) as conn:  # as a sweeping replica that took a for gone
                version, state = conn.execute(
                    "SELECT version, state FROM presence_live WHERE node_id = 5"
                ).fetchone()  # type: ignore[misc]
            assert side_b.expire_presence([(5, int(version), bytes(state).replace(b"true", b"false", 1))]) == 1
            await wait_until(lambda: _row(pg_dsn, 5) == ("a", True))  # a said it again
            await wait_until(lambda: (p := table_b.get(5)) is not None and p.online)
            p5 = table_a.get(5)
            assert p5 is not None and p5.online
            nursery.cancel_scope.cancel()
    side_a.close()
    side_b.close()
