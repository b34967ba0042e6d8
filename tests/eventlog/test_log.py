"""The trio event log: group commit, optimistic concurrency, tailing."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import aclosing
from pathlib import Path

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from eventlog import (
    EventLog,
    EventLogError,
    ExpectedSequenceConflict,
    Head,
    RecordedEvent,
    SQLiteEventStore,
)
from eventlog.events import UserCreated
from eventlog.log import AT_ONCE_BUDGET
from eventlog.rows import AppendRequest, AppendResult, StoredRow
from tests.conftest import ADMIN, StepClock


async def test_append_needs_the_writer_task() -> None:
    log = EventLog(SQLiteEventStore(":memory:"))
    with pytest.raises(EventLogError, match="not running"):
        await log.append([UserCreated(user_id=1, name="a")], actor=ADMIN)


async def test_concurrent_appends_are_group_committed(tmp_path: Path) -> None:
    log = EventLog(SQLiteEventStore(tmp_path / "log.db"), clock=StepClock())
    seqs: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)

        async def one(i: int) -> None:
            [rec] = await log.append([UserCreated(user_id=i, name=f"u{i}")], actor=ADMIN)
            seqs.append(rec.seq)

        async with trio.open_nursery() as appenders:
            for i in range(200):
                appenders.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert sorted(seqs) == list(range(1, 201))
    assert log.appended == 200
    assert log.commits < 200  # several appends shared a transaction
    assert log.store.verify().ok


async def test_expected_seq_conflict_is_raised_to_the_loser() -> None:
    log = EventLog(SQLiteEventStore(":memory:"))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await log.append([UserCreated(user_id=1, name="a")], actor=ADMIN, expected_seq=0)
        with pytest.raises(ExpectedSequenceConflict):
            await log.append([UserCreated(user_id=2, name="b")], actor=ADMIN, expected_seq=0)
        nursery.cancel_scope.cancel()


class _HeldStore(SQLiteEventStore):
    """A store whose next append waits in the writer's thread until ``release`` is set
    (it never begins at once, so no commit runs on the loop's thread)."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.entered = threading.Event()
        self.release = threading.Event()

    def try_append_batch(self, requests: Sequence[AppendRequest], now_us: int) -> list[AppendResult] | None:
        return None

    def append_batch(self, requests: Sequence[AppendRequest], now_us: int) -> list[AppendResult]:
        self.entered.set()
        self.release.wait(10)
        return super().append_batch(requests, now_us)


async def test_an_idle_loop_commits_at_once_and_slow_commits_go_to_the_thread(tmp_path: Path) -> None:
    class SlowStore(SQLiteEventStore):
        """Each append takes ``delay`` seconds more, wherever it runs."""

        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.delay = 0.0
            self.threads: list[str] = []

        def try_append_batch(self, requests: Sequence[AppendRequest], now_us: int) -> list[AppendResult] | None:
            self.threads.append(threading.current_thread().name)
            time.sleep(self.delay)
            return super().try_append_batch(requests, now_us)

        def append_batch(self, requests: Sequence[AppendRequest], now_us: int) -> list[AppendResult]:
            self.threads.append(threading.current_thread().name)
            time.sleep(self.delay)
            return super().append_batch(requests, now_us)

    store = SlowStore(tmp_path / "log.db")
    log = EventLog(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for i in range(1, 6):
            [rec] = await log.append([UserCreated(user_id=i, name=f"u{i}")], actor=ADMIN)
            assert rec.seq == i
        assert log.commits == log.commits_at_once == 5  # nothing else to run: on the loop
        assert set(store.threads) == {threading.current_thread().name}
        store.delay = 4 * AT_ONCE_BUDGET
        store.threads.clear()
        for i in range(6, 16):
            await log.append([UserCreated(user_id=i, name=f"u{i}")], actor=ADMIN)
        nursery.cancel_scope.cancel()
    # Once commits took longer than the budget, they went to the writer's thread.
    assert 5 < log.commits_at_once < 15
    assert store.threads[-1] != threading.current_thread().name
    assert "event log" in store.threads[-1]
    assert store.head().seq == 15 and store.verify().ok


async def test_a_lock_held_by_another_process_is_waited_for_in_the_thread(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "log.db")
    log = EventLog(store)
    other = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process is writing
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)

        async def append() -> None:
            [rec] = await log.append([UserCreated(user_id=1, name="a")], actor=ADMIN)
            assert rec.seq == 1
            done.set()

        nursery.start_soon(append)
        # The loop is not blocked meanwhile: this task runs, and so does a timer.
        await trio.sleep(0.3)
        assert not done.is_set()
        other.execute("COMMIT")
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert log.commits_at_once == 0 and log.commits == 1


async def test_appends_queued_when_the_writer_stops_fail_instead_of_waiting() -> None:
    store = _HeldStore()
    log = EventLog(store)
    outcomes: dict[str, object] = {}

    async def append(name: str, user_id: int) -> None:
        try:
            [rec] = await log.append([UserCreated(user_id=user_id, name=name)], actor=ADMIN)
            outcomes[name] = rec.seq
        except EventLogError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        writer_scope = trio.CancelScope()

        async def writer() -> None:
            with writer_scope:
                await log.run()

        nursery.start_soon(writer)
        await wait_all_tasks_blocked()
        nursery.start_soon(append, "first", 1)
        await trio.to_thread.run_sync(store.entered.wait, 5)  # the first one is being committed
        nursery.start_soon(append, "second", 2)
        await wait_all_tasks_blocked()  # queued behind it
        writer_scope.cancel()
        store.release.set()
    # The commit under way finished and answered; the queued one was told, not left waiting.
    assert outcomes["first"] == 1
    assert isinstance(outcomes["second"], EventLogError)
    assert "stopped" in str(outcomes["second"])
    assert store.head().seq == 1


def test_each_run_commits_on_a_thread_that_ends_with_it() -> None:
    """The writer's commit thread starts and stops with ``run``; the log runs again (here
    in a second trio run) with a thread of its own."""
    store = SQLiteEventStore(":memory:")
    log = EventLog(store)
    committers: list[threading.Thread] = []

    async def session(user_id: int) -> None:
        before = set(threading.enumerate())
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            [rec] = await log.append([UserCreated(user_id=user_id, name=f"u{user_id}")], actor=ADMIN)
            assert rec.seq == user_id
            committers.extend(t for t in threading.enumerate() if t not in before and "event log" in t.name)
            nursery.cancel_scope.cancel()

    trio.run(session, 1)
    trio.run(session, 2)
    assert len(committers) == 2 and committers[0] is not committers[1]
    for thread in committers:
        thread.join(5)
        assert not thread.is_alive()
    assert [e.seq for e in store.read()] == [1, 2] and store.verify().ok


async def test_a_cancelled_appender_does_not_stop_the_others() -> None:
    log = EventLog(SQLiteEventStore(":memory:"))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        with trio.move_on_after(0) as scope:
            await log.append([UserCreated(user_id=1, name="gone")], actor=ADMIN)
        assert scope.cancelled_caught
        [rec] = await log.append([UserCreated(user_id=2, name="kept")], actor=ADMIN)
        nursery.cancel_scope.cancel()
    # The cancelled append may still have committed (see the module docstring); the
    # next one follows it either way.
    assert rec.seq == log.store.head().seq
    assert log.store.verify().ok


async def _follow_while_appending(log: EventLog, nursery: trio.Nursery, users: range) -> list[int]:
    """Tail ``log`` from the start in ``nursery`` while appending one user per id in
    ``users``, each once the tailer waits for the next event; the sequence numbers it
    saw, up to the last user's (each user is the event of its own id's sequence number)."""
    seen: list[int] = []
    last = users[-1]
    caught_up = trio.Event()

    async def follow() -> None:
        async with aclosing(log.tail(0)) as tail:
            async for batch in tail:
                seen.extend(e.seq for e in batch)
                if seen[-1] >= last:
                    caught_up.set()
                    return

    nursery.start_soon(follow)
    for i in users:
        await wait_all_tasks_blocked()  # the tailer is waiting for the next event
        await log.append([UserCreated(user_id=i, name=f"u{i}")], actor=ADMIN)
    with trio.fail_after(5):
        await caught_up.wait()
    return seen


async def test_tail_sees_backlog_then_new_events_in_order() -> None:
    log = EventLog(SQLiteEventStore(":memory:"))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await log.append([UserCreated(user_id=1, name="a")], actor=ADMIN)
        seen = await _follow_while_appending(log, nursery, range(2, 6))
        nursery.cancel_scope.cancel()
    assert seen == [1, 2, 3, 4, 5]


async def test_tail_follows_its_own_process_with_one_read_per_wake() -> None:
    """A tailer woken by a commit of this process reads the new events at once: it does
    not ask the store for its head first (a thread hop per commit for every tailer,
    the projection's among them, during a registration storm)."""

    class CountingStore(SQLiteEventStore):
        heads = 0

        def head(self) -> Head:
            CountingStore.heads += 1
            return super().head()

    log = EventLog(CountingStore(":memory:"))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        seen = await _follow_while_appending(log, nursery, range(1, 21))
        nursery.cancel_scope.cancel()
    assert seen == list(range(1, 21))
    assert CountingStore.heads == 0


async def test_tail_finds_events_written_by_another_process(tmp_path: Path) -> None:
    """A second store on the same file stands in for another process: no in-process
    notification reaches the tailer, polling must find the event."""
    path = tmp_path / "log.db"
    log = EventLog(SQLiteEventStore(path), poll_interval=0.05)
    other = EventLog(SQLiteEventStore(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(other.run)
        got: list[int] = []
        found = trio.Event()

        async def follow() -> None:
            async with aclosing(log.tail(0)) as tail:
                async for batch in tail:
                    got.extend(e.seq for e in batch)
                    found.set()
                    return

        nursery.start_soon(follow)
        await wait_all_tasks_blocked()  # the tailer has read the (empty) log and waits
        await other.append([UserCreated(user_id=1, name="a")], actor=ADMIN)
        with trio.fail_after(5):
            await found.wait()
        nursery.cancel_scope.cancel()
    assert got == [1]


async def test_tail_takes_its_own_commits_without_reading_them_back(tmp_path: Path) -> None:
    """Issue 19 (registration CPU): the events this process committed reach its
    tailers as a read would return them (payload decoded from its encoding, links
    and hashes as stored) without a read of the store; events another process wrote
    in between are read from the store, in order, links checked."""

    class CountingStore(SQLiteEventStore):
        rows_read = 0
        reads = 0

        def read_rows(self, after_seq: int = 0, limit: int = 1000) -> list[StoredRow]:
            rows = super().read_rows(after_seq, limit)
            CountingStore.rows_read += len(rows)
            CountingStore.reads += 1
            return rows

    path = tmp_path / "log.db"
    log = EventLog(CountingStore(path), poll_interval=3600)  # no polls: only wake-ups
    other = EventLog(SQLiteEventStore(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await nursery.start(other.run)
        seen = await _follow_while_appending(log, nursery, range(1, 11))
        assert seen == list(range(1, 11))
        # One (empty) read when the tail started; none per commit since.
        assert (CountingStore.rows_read, CountingStore.reads) == (0, 1)
        # Another process's event between two of ours: read from the store.
        got: list[RecordedEvent] = []
        done = trio.Event()

        async def follow() -> None:
            async with aclosing(log.tail(10, prev_hash=log.store.hash_at(10))) as tail:
                async for batch in tail:
                    got.extend(batch)
                    if got[-1].seq >= 13:
                        done.set()
                        return

        nursery.start_soon(follow)
        await wait_all_tasks_blocked()
        await other.append([UserCreated(user_id=11, name="u11")], actor=ADMIN)
        with trio.fail_after(5):
            while len(await log.read(10)) < 1:
                await trio.sleep(0.01)
        await log.append([UserCreated(user_id=12, name="u12")], actor=ADMIN)
        await log.append([UserCreated(user_id=13, name="u13")], actor=ADMIN)
        with trio.fail_after(5):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert [e.seq for e in got] == [11, 12, 13]
    assert got == log.store.read(10)


async def test_an_announced_append_by_another_process_is_read_at_once(tmp_path: Path) -> None:
    """A store that announces other processes' appends (PostgreSQL's LISTEN/NOTIFY)
    wakes the tailers and head waiters, and that wake-up must make them ask the store:
    taken for one of this process's own commits, it left a replica without the other
    replica's events until a poll, and with announcements coming faster than the poll
    interval, for good (two replicas' relays refused each other's nodes)."""
    announce = threading.Event()

    class AnnouncingStore(SQLiteEventStore):
        notifies_appends = True

        def wait_for_append(self, timeout: float) -> bool:
            if announce.wait(timeout):
                announce.clear()
                return True
            return False

    path = tmp_path / "log.db"
    log = EventLog(AnnouncingStore(path), poll_interval=3600)  # no polls: only wake-ups
    other = EventLog(SQLiteEventStore(path))
    got: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await nursery.start(other.run)

        async def follow() -> None:
            async with aclosing(log.tail(0)) as tail:
                async for batch in tail:
                    got.extend(e.seq for e in batch)

        nursery.start_soon(follow)
        for n in range(1, 4):
            await wait_all_tasks_blocked()
            if n == 2:  # one of this process's own commits in between
                await log.append([UserCreated(user_id=100, name="own")], actor=ADMIN)
                with trio.fail_after(5):
                    while len(got) < n:
                        await trio.sleep(0.01)
            await other.append([UserCreated(user_id=n, name=f"u{n}")], actor=ADMIN)
            announce.set()
            with trio.fail_after(5):
                while len(got) < n + (n >= 2):
                    await trio.sleep(0.01)
        assert got == [1, 2, 3, 4]

        head_passed = trio.Event()

        async def wait_head() -> None:
            await log.wait_for_new(4)
            head_passed.set()

        nursery.start_soon(wait_head)
        await wait_all_tasks_blocked()
        await other.append([UserCreated(user_id=5, name="u5")], actor=ADMIN)
        announce.set()
        with trio.fail_after(5):
            await head_passed.wait()
        nursery.cancel_scope.cancel()


async def test_own_commits_are_kept_only_until_every_tail_has_passed_them(tmp_path: Path) -> None:
    """Idle memory (issue 19): the events kept for this process's tails are dropped once
    the slowest running tail has taken them, and none are kept with no tail running."""
    log = EventLog(SQLiteEventStore(tmp_path / "log.db"), poll_interval=0.05)
    got: dict[str, list[int]] = {"fast": [], "slow": []}
    gates = {"fast": trio.Event(), "slow": trio.Event()}
    gates["fast"].set()

    async def follow(name: str) -> None:
        async with aclosing(log.tail(1)) as tail:
            async for batch in tail:
                got[name].extend(e.seq for e in batch)
                await gates[name].wait()  # the slow one holds its place until let go

    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await log.append([UserCreated(user_id=1, name="u1")], actor=ADMIN)
        assert not log._recent  # no tail running: nothing kept
        async with trio.open_nursery() as tails:
            tails.start_soon(follow, "fast")
            tails.start_soon(follow, "slow")
            await wait_all_tasks_blocked()
            await log.append([UserCreated(user_id=2, name="u2"), UserCreated(user_id=3, name="u3")], actor=ADMIN)
            with trio.fail_after(5):
                while got != {"fast": [2, 3], "slow": [2, 3]}:
                    await trio.sleep(0.01)
            assert list(log._recent) == [2, 3]  # the slow tail has not asked for more
            gates["slow"].set()
            with trio.fail_after(5):
                while log._recent:
                    await trio.sleep(0.01)
            tails.cancel_scope.cancel()
        await log.append([UserCreated(user_id=4, name="u4")], actor=ADMIN)
        assert not log._recent
        nursery.cancel_scope.cancel()


async def test_wait_for_new_learns_its_own_commits_without_asking_the_store(tmp_path: Path) -> None:
    """Issue 19 (registration CPU): the head signer waits for the log to pass a seq;
    commits of this process wake it with their own seq, so the store's head is asked
    once at first, not after every commit. Another process's appends are still found
    by polling."""

    class CountingStore(SQLiteEventStore):
        heads = 0

        def head(self) -> Head:
            CountingStore.heads += 1
            return super().head()

    path = tmp_path / "log.db"
    log = EventLog(CountingStore(path), poll_interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        passed = trio.Event()

        async def wait(after: int, done: trio.Event) -> None:
            await log.wait_for_new(after)
            done.set()

        nursery.start_soon(wait, 5, passed)
        for i in range(1, 7):
            await wait_all_tasks_blocked()
            assert not passed.is_set()
            await log.append([UserCreated(user_id=i, name=f"u{i}")], actor=ADMIN)
        with trio.fail_after(5):
            await passed.wait()
        assert CountingStore.heads == 1
        nursery.cancel_scope.cancel()

    polled = EventLog(SQLiteEventStore(path), poll_interval=0.05)
    other = EventLog(SQLiteEventStore(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(other.run)
        found = trio.Event()

        async def wait_polled() -> None:
            await polled.wait_for_new(6)
            found.set()

        nursery.start_soon(wait_polled)
        await wait_all_tasks_blocked()
        assert not found.is_set()
        await other.append([UserCreated(user_id=7, name="u7")], actor=ADMIN)
        with trio.fail_after(5):
            await found.wait()
        nursery.cancel_scope.cancel()
