"""The trio event log on PostgreSQL: two logs on one database (two replicas)."""

from __future__ import annotations

from contextlib import aclosing

import pytest
import trio

from eventlog import EventLog, EventLogError, RecordedEvent
from eventlog.events import UserCreated
from eventlog.pgstore import PostgresEventStore
from tests.conftest import ADMIN
from tests.pgserver import PgServer
from tests.support.waits import wait_until

#: Long enough that only a notification (never the polling fallback) can wake a tailer.
NO_POLLING = 3600.0


async def _next(log: EventLog, after: int) -> list[RecordedEvent]:
    async with aclosing(log.tail(after)) as tail:
        async for events in tail:
            return events
    raise AssertionError("the tail ended")


async def test_an_append_on_one_replica_wakes_a_tailer_on_another(pg_dsn: str) -> None:
    a = EventLog(PostgresEventStore(pg_dsn))
    b = EventLog(PostgresEventStore(pg_dsn), poll_interval=NO_POLLING)
    got: list[RecordedEvent] = []
    with trio.fail_after(60):  # a guard against hanging, not a timing assertion
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)

            async def follow() -> None:
                got.extend(await _next(b, 0))

            nursery.start_soon(follow)
            [rec] = await a.append([UserCreated(user_id=1, name="a")], actor=ADMIN)
            await wait_until(lambda: got, what="the other log's tailer to see the event")
            nursery.cancel_scope.cancel()
    assert got == [rec]
    a.store.close()
    b.store.close()


async def test_tailers_wait_out_a_database_crash(pg_server: PgServer, pg_dsn: str) -> None:
    """PostgreSQL killed with -9: appends fail (nothing acknowledged), the tailer waits
    instead of dying, and once the server is back everything acknowledged is there."""
    a = EventLog(PostgresEventStore(pg_dsn), poll_interval=0.05)
    b = EventLog(PostgresEventStore(pg_dsn), poll_interval=0.05)
    acknowledged: list[RecordedEvent] = []
    seen: list[RecordedEvent] = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)

            async def follow() -> None:
                async with aclosing(b.tail(0)) as tail:
                    async for events in tail:
                        seen.extend(events)

            nursery.start_soon(follow)
            acknowledged += await a.append([UserCreated(user_id=1, name="a")], actor=ADMIN)
            await trio.to_thread.run_sync(pg_server.kill)
            try:
                with pytest.raises(EventLogError):
                    await a.append([UserCreated(user_id=2, name="b")], actor=ADMIN)
                await trio.sleep(0.3)  # the tailer meets the dead database meanwhile
            finally:
                await trio.to_thread.run_sync(pg_server.start)

            async def append_once_back() -> tuple[RecordedEvent, ...] | None:
                try:
                    return await a.append([UserCreated(user_id=3, name="c")], actor=ADMIN)
                except EventLogError:
                    return None  # not back yet

            acknowledged += await wait_until(append_once_back, what="the database to take appends again", seconds=60)
            await wait_until(lambda: len(seen) == 2, what="the tailer to catch up", seconds=60)
            nursery.cancel_scope.cancel()
    assert [e.event for e in seen] == [e.event for e in acknowledged]
    assert a.store.verify().ok
    a.store.close()
    b.store.close()
