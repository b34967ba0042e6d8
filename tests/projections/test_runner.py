"""The projection runner: backlog before readiness, checkpoints, subscriptions, service."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from eventlog import EventLog, SQLiteEventStore
from eventlog.events import UserCreated
from projections import (
    CheckpointStore,
    CommandError,
    ProjectionRunner,
    Tailnet,
    TailnetState,
    UnavailableError,
    fold,
)
from projections import commands as c
from tests.conftest import ADMIN

_ALLOW_ALL = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}\n'


async def _fill(log: EventLog, n: int, start: int = 1) -> None:
    for i in range(start, start + n):
        await log.append([UserCreated(user_id=i, name=f"u{i}")], actor=ADMIN)


async def test_backlog_is_folded_before_ready_and_tail_follows(tmp_path: Path) -> None:
    log = EventLog(SQLiteEventStore(tmp_path / "log.db"))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await _fill(log, 5)
        runner = ProjectionRunner(log)
        await nursery.start(runner.run)
        assert runner.state.seq == 5  # ready means caught up
        await _fill(log, 3, start=6)
        state = await runner.wait_for(8)
        assert len(state.users) == 8
        nursery.cancel_scope.cancel()


async def test_checkpoint_resumes_and_equals_a_full_fold(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "log.db")
    cps = CheckpointStore(tmp_path / "cp.db")
    log = EventLog(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await _fill(log, 10)
        runner = ProjectionRunner(log, cps, checkpoint_every=4)
        await nursery.start(runner.run)
        await _fill(log, 10, start=11)
        await runner.wait_for(20)
        nursery.cancel_scope.cancel()
    loaded = cps.load("tailnet", store)
    assert loaded is not None and loaded.seq == 20  # saved on shutdown
    full, _ = fold(TailnetState(), store.read(0, 100))
    assert loaded == full


async def test_checkpoint_from_another_log_is_ignored(tmp_path: Path) -> None:
    cps = CheckpointStore(tmp_path / "cp.db")
    a = SQLiteEventStore(tmp_path / "a.db")
    b = SQLiteEventStore(tmp_path / "b.db")
    for store, name in ((a, "alice"), (b, "bob")):
        log = EventLog(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            await log.append([UserCreated(user_id=1, name=name)], actor=ADMIN)
            nursery.cancel_scope.cancel()
    state, _ = fold(TailnetState(), a.read())
    cps.save("tailnet", state, a.read()[-1].hash)
    assert cps.load("tailnet", a) is not None
    assert cps.load("tailnet", b) is None  # same seq, different chain


async def test_slow_subscriber_gets_merged_deltas_not_a_queue() -> None:
    log = EventLog(SQLiteEventStore(":memory:"))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        runner = ProjectionRunner(log)
        await nursery.start(runner.run)
        sub = runner.subscribe()
        await _fill(log, 5)
        await runner.wait_for(5)
        state, delta = await sub.next()  # one wake-up covers all five
        assert delta.users_changed == frozenset(range(1, 6))
        assert state.seq == 5
        assert sub.take().is_empty()
        sub.close()
        nursery.cancel_scope.cancel()


async def test_service_retries_a_stale_decision_and_refuses_bad_commands(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "log.db")
    log = EventLog(store)
    other = EventLog(SQLiteEventStore(tmp_path / "log.db"))  # another writer, e.g. a replica
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await nursery.start(other.run)
        runner = ProjectionRunner(log)
        await nursery.start(runner.run)
        tailnet = Tailnet(log, runner)
        calls = 0

        def decide(state: TailnetState) -> c.Decision[int]:
            nonlocal calls
            calls += 1
            return c.decide_create_user(state, "carol")

        # The other writer appends behind the runner's back first: the first decision is stale.
        await other.append([UserCreated(user_id=1, name="zed")], actor=ADMIN)
        uid, recorded = await tailnet.execute(decide, actor=ADMIN)
        assert uid == 2 and recorded[0].seq == 2 and calls == 2
        with pytest.raises(CommandError, match="already exists"):
            await tailnet.execute(decide, actor=ADMIN)
        assert store.head().seq == 2
        nursery.cancel_scope.cancel()


async def test_a_burst_of_concurrent_commands_all_land(tmp_path: Path) -> None:
    # 60 registrations at once all decide against the same state; only one can win
    # each append. With a handful of retries each they must still all land: losers
    # go on one at a time instead of conflicting with each other until they give up.
    log = EventLog(SQLiteEventStore(tmp_path / "log.db"))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        runner = ProjectionRunner(log)
        await nursery.start(runner.run)
        tailnet = Tailnet(log, runner, max_retries=3)
        results: list[int] = []

        async def create(i: int) -> None:
            uid, _ = await tailnet.execute(lambda s: c.decide_create_user(s, f"u{i}"), actor=ADMIN)
            results.append(uid)

        async with trio.open_nursery() as burst:
            for i in range(60):
                burst.start_soon(create, i)
        assert sorted(results) == list(range(1, 61))
        assert {u.name for u in runner.state.users.values()} == {f"u{i}" for i in range(60)}
        nursery.cancel_scope.cancel()


def _limit_pages(conn: sqlite3.Connection) -> None:
    """Make ``conn`` see a full disk: no page beyond the ones it has."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


async def test_a_command_the_log_cannot_record_is_refused_clearly(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "log.db")
    log = EventLog(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        runner = ProjectionRunner(log)
        await nursery.start(runner.run)
        tailnet = Tailnet(log, runner)
        await tailnet.execute(lambda s: c.decide_create_user(s, "alice"), actor=ADMIN)
        _limit_pages(store._writer)  # the store's writer is what must meet the full disk
        big = "x" * 20_000  # needs new pages
        with pytest.raises(UnavailableError, match=r"the disk is full.*; nothing was changed"):
            await tailnet.execute(lambda s: c.decide_set_policy(s, _ALLOW_ALL + "// " + big, source="db"), actor=ADMIN)
        assert runner.state.seq == 1 and store.head().seq == 1
        store._writer.execute("PRAGMA max_page_count = 1073741823")  # space returns
        _, recorded = await tailnet.execute(
            lambda s: c.decide_set_policy(s, _ALLOW_ALL + "// " + big, source="db"), actor=ADMIN
        )
        assert recorded[0].seq == 2 and runner.state.policy_text is not None
        nursery.cancel_scope.cancel()


async def test_a_checkpoint_that_cannot_be_saved_is_logged_and_the_runner_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteEventStore(tmp_path / "log.db")
    cps = CheckpointStore(tmp_path / "cp.db")
    _limit_pages(cps._conn)  # a full disk under the checkpoint file
    log = EventLog(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        runner = ProjectionRunner(log, cps, checkpoint_every=10)
        await nursery.start(runner.run)
        await _fill(log, 100)  # a state far larger than the checkpoint file's one page
        await runner.wait_for(100)
        nursery.cancel_scope.cancel()  # and the save on shutdown fails too: no error
    assert "checkpoint 'tailnet' at seq 100 not saved" in caplog.text
    events = store.read(0, 1000)
    earlier = cps.load("tailnet", store)  # the last one that fitted is intact
    assert earlier is not None and earlier.seq < 100
    assert earlier == fold(TailnetState(), events[: earlier.seq])[0]

    cps._conn.execute("PRAGMA max_page_count = 1073741823")  # space returns
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        runner = ProjectionRunner(log, cps)
        await nursery.start(runner.run)  # saves the folded backlog before it is ready
        nursery.cancel_scope.cancel()
    loaded = cps.load("tailnet", store)
    assert loaded is not None and loaded == fold(TailnetState(), events)[0]
