"""Live presence between replicas: a change on one replica's table reaches the other's
(and so its clients), coalesced, without echo."""

from __future__ import annotations

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
