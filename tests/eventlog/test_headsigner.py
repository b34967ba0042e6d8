"""The signing task: every N events, every T while events arrive, at shutdown, on demand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from eventlog import EventLog, SQLiteEventStore
from eventlog.audit import audit_log
from eventlog.headsigner import HeadSigner
from eventlog.signing import Signer, read_anchor
from tests.conftest import ADMIN
from tests.support.waits import wait_until

from .contract import user


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    """Time moves only when the test jumps it (the store's threads never race a timer)."""
    return trio.testing.MockClock()


async def _until(condition: Callable[[], bool]) -> None:
    """Let the other tasks (and their store threads) run until ``condition`` holds
    (in real time: the virtual clock stays where the test put it)."""
    await wait_until(condition, seconds=30)


async def test_signs_every_n_events_every_interval_and_at_shutdown(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    store = SQLiteEventStore(tmp_path / "log.db")
    log = EventLog(store, poll_interval=0.5)
    signer = Signer.generate()
    anchor = tmp_path / "signing.key.0.anchor"
    heads = HeadSigner(log, signer, every_events=3, every_seconds=60, anchor_file=anchor)

    def signed_seqs() -> list[int]:
        return [cp.seq for cp in store.signed_checkpoints()]

    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await nursery.start(heads.run)
        for i in (1, 2):
            await log.append([user(i)], actor=ADMIN)
        await trio.testing.wait_all_tasks_blocked()
        assert signed_seqs() == []  # fewer than N events, less than T
        await log.append([user(3)], actor=ADMIN)
        await _until(lambda: heads.signed == 1)  # N events (and the next wait has begun)
        assert signed_seqs() == [3]
        await log.append([user(4)], actor=ADMIN)
        mock_clock.jump(30)
        await trio.testing.wait_all_tasks_blocked()
        assert signed_seqs() == [3]
        mock_clock.jump(31)
        await _until(lambda: signed_seqs() == [3, 4])  # T elapsed with an unsigned event
        for _ in range(10):  # an idle log is not signed again
            mock_clock.jump(61)
            await trio.testing.wait_all_tasks_blocked()
        assert signed_seqs() == [3, 4]
        on_demand = await heads.sign_head()
        assert on_demand is not None and on_demand.seq == 4 and signed_seqs() == [3, 4]
        await log.append([user(5)], actor=ADMIN)
        nursery.cancel_scope.cancel()
    assert signed_seqs() == [3, 4, 5]  # at shutdown
    kept = read_anchor(anchor)
    assert kept is not None and kept.seq == 5 and kept.n == 3
    assert audit_log(store, public_key=signer.public_key, anchors=[kept]).ok


async def test_a_restart_continues_the_numbering(mock_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "log.db")
    signer = Signer.generate()
    for round_ in (1, 2):
        log = EventLog(store)
        heads = HeadSigner(log, signer, every_events=100, every_seconds=60)
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            await nursery.start(heads.run)
            await log.append([user(round_)], actor=ADMIN)
            nursery.cancel_scope.cancel()
    assert [(cp.n, cp.seq) for cp in store.signed_checkpoints()] == [(1, 1), (2, 2)]
    assert audit_log(store, public_key=signer.public_key).ok
