"""Projection checkpoints are authenticated; the runner checks every event it folds."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import trio
from msgspec.structs import replace

from eventlog import ChainError, EventLog, SQLiteEventStore
from eventlog.events import UserCreated
from projections import CheckpointStore, ProjectionRunner, TailnetState, fold
from projections.checkpoint import encode_state
from projections.state import PreAuthKey
from tests.conftest import ADMIN

KEY = b"k" * 32


async def _log_with_users(path: Path, n: int) -> SQLiteEventStore:
    store = SQLiteEventStore(path)
    log = EventLog(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for i in range(1, n + 1):
            await log.append([UserCreated(user_id=i, name=f"u{i}")], actor=ADMIN)
        nursery.cancel_scope.cancel()
    return store


def _forge(cp_path: Path, state: TailnetState, event_hash: str) -> None:
    """What an attacker with the data directory writes: a state the log never produced."""
    planted = PreAuthKey(
        id=99, prefix="planted", secret_sha256="0" * 64, user_id=1, reusable=True,
        ephemeral=False, tags=(), expires_at=None, created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    forged = replace(state, preauth_keys=state.preauth_keys.set(99, planted))
    conn = sqlite3.connect(cp_path, isolation_level=None)
    conn.execute(
        "UPDATE checkpoints SET state = ? WHERE name = 'tailnet'", (encode_state(forged),)
    )
    conn.close()


async def test_a_forged_checkpoint_is_discarded_and_the_state_refolded(tmp_path: Path) -> None:
    store = await _log_with_users(tmp_path / "log.db", 3)
    cps = CheckpointStore(tmp_path / "cp.db", mac_key=KEY)
    truth, _ = fold(TailnetState(), store.read())
    cps.save("tailnet", truth, store.read()[-1].hash)
    assert cps.load("tailnet", store) == truth  # an honest one is used
    _forge(tmp_path / "cp.db", truth, store.read()[-1].hash)
    assert cps.load("tailnet", store) is None
    assert cps.discarded == 1
    # The runner refolds from the log: no planted key.
    log = EventLog(store)
    runner = ProjectionRunner(log, cps)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await nursery.start(runner.run)
        nursery.cancel_scope.cancel()
    assert 99 not in runner.state.preauth_keys
    assert runner.state == truth


def test_a_checkpoint_written_with_another_key_or_none_is_discarded(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "log.db")
    from eventlog import AppendRequest

    store.append_batch([AppendRequest(events=(UserCreated(user_id=1, name="a"),), actor=ADMIN)], 1)
    state, _ = fold(TailnetState(), store.read())
    h = store.read()[-1].hash
    CheckpointStore(tmp_path / "other.db", mac_key=b"x" * 32).save("tailnet", state, h)
    CheckpointStore(tmp_path / "none.db").save("tailnet", state, h)
    assert CheckpointStore(tmp_path / "other.db", mac_key=KEY).load("tailnet", store) is None
    assert CheckpointStore(tmp_path / "none.db", mac_key=KEY).load("tailnet", store) is None


def test_an_old_checkpoint_file_without_macs_is_upgraded_and_ignored(tmp_path: Path) -> None:
    path = tmp_path / "cp.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "CREATE TABLE checkpoints (name TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
        "event_hash TEXT NOT NULL, schema INTEGER NOT NULL, state BLOB NOT NULL)"
    )
    conn.execute("INSERT INTO checkpoints VALUES ('tailnet', 1, 'h', 1, x'00')")
    conn.close()
    store = SQLiteEventStore(":memory:")
    assert CheckpointStore(path, mac_key=KEY).load("tailnet", store) is None


async def test_the_runner_refuses_to_fold_an_edited_event(tmp_path: Path) -> None:
    store = await _log_with_users(tmp_path / "log.db", 4)
    conn = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    conn.execute("DROP TRIGGER events_no_update")
    conn.execute("UPDATE events SET data = ? WHERE seq = 3", (b'{"type":"user.created","user_id":3,"name":"mallory"}',))
    conn.close()
    log = EventLog(store)
    runner = ProjectionRunner(log)
    caught: list[ChainError] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            await nursery.start(runner.run)
    except* ChainError as group:
        caught.extend(e for e in group.exceptions if isinstance(e, ChainError))
    assert [e.seq for e in caught] == [3]
    assert runner.state.seq == 0  # nothing served from it


async def test_saving_or_loading_a_checkpoint_hands_its_cached_pages_back(tmp_path: Path) -> None:
    # A checkpoint's pages are not read again before the next one rewrites them: after
    # a save and after a load the connection releases its page cache (issue 19: up to
    # 2 MiB held by an idle server), and the checkpoint is still the one saved.
    store = await _log_with_users(tmp_path / "log.db", 3)
    cps = CheckpointStore(tmp_path / "cp.db", mac_key=KEY)
    truth, _ = fold(TailnetState(), store.read())
    statements: list[str] = []
    cps._conn.set_trace_callback(statements.append)
    cps.save("tailnet", truth, store.read()[-1].hash)
    assert [s.split()[0] for s in statements] == ["INSERT", "PRAGMA"]
    assert statements[-1] == "PRAGMA shrink_memory"
    statements.clear()
    assert cps.load("tailnet", store) == truth
    assert [s.split()[0] for s in statements] == ["SELECT", "PRAGMA"]
    assert statements[-1] == "PRAGMA shrink_memory"
