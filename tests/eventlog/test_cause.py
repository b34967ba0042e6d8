"""The envelope's cause: correlation ids shared per request, reasons, old logs."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import sqlite_utils
import trio

from eventlog import EventLog, SQLiteEventStore, caused_by, chain_hash
from eventlog.cause import new_correlation_id
from eventlog.events import UserCreated
from eventlog.migrations import MIGRATIONS
from tests.conftest import ADMIN


async def test_appends_inside_one_cause_share_its_id_and_reason() -> None:
    log = EventLog(SQLiteEventStore(":memory:"))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        with caused_by(reason="ticket OPS-7") as cause:
            [a] = await log.append([UserCreated(user_id=1, name="a")], actor=ADMIN)
            [b] = await log.append([UserCreated(user_id=2, name="b")], actor=ADMIN)
        [c] = await log.append([UserCreated(user_id=3, name="c")], actor=ADMIN)
        [d] = await log.append([UserCreated(user_id=4, name="d")], actor=ADMIN)
        nursery.cancel_scope.cancel()
    assert a.correlation_id == b.correlation_id == cause.correlation_id
    assert a.reason == b.reason == "ticket OPS-7"
    # Outside a cause every append is its own request.
    assert len({a.correlation_id, c.correlation_id, d.correlation_id}) == 3
    assert c.reason == d.reason == ""
    # Stored and read back identically, covered by the hash.
    rows = log.store.read(0, 10)
    assert [r.correlation_id for r in rows] == [a.correlation_id, b.correlation_id, c.correlation_id, d.correlation_id]
    assert rows[0].reason == "ticket OPS-7"
    assert log.store.verify().ok


def test_a_nested_cause_keeps_the_outer_correlation_id() -> None:
    with caused_by(reason="outer") as outer, caused_by() as inner:
        assert inner.correlation_id == outer.correlation_id
        assert inner.reason == "outer"


def test_a_reason_that_cannot_be_stored_is_refused() -> None:
    with pytest.raises(ValueError, match="longer"), caused_by(reason="x" * 1001):
        pass
    with pytest.raises(ValueError, match="one line"), caused_by(reason="a\nb"):
        pass


def test_editing_the_reason_breaks_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteEventStore(path)
    from eventlog import AppendRequest

    store.append_batch(
        [AppendRequest(events=(UserCreated(user_id=1, name="a"),), actor=ADMIN, correlation_id="c1", reason="why")],
        1_000_000,
    )
    store.append_batch([AppendRequest(events=(UserCreated(user_id=2, name="b"),), actor=ADMIN)], 2_000_000)
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER events_no_update")
    conn.execute("UPDATE events SET reason = 'nothing to see' WHERE seq = 1")
    conn.close()
    report = SQLiteEventStore(path).verify()
    assert report.first_bad == 1


def test_a_log_written_before_the_cause_columns_still_verifies(tmp_path: Path) -> None:
    """Old rows: the migration adds the columns, the old hashes still verify."""
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(sqlite3.connect(path, isolation_level=None))
    MIGRATIONS.apply(db, stop_before="0002_event_cause")
    data = b'{"type":"user.created","user_id":1,"name":"a"}'
    h = chain_hash("0" * 64, seq=1, recorded_at_us=5, actor_kind="admin", actor_id="root",
                   type="user.created", schema=1, data=data)
    db.execute(
        "INSERT INTO events (seq, recorded_at_us, actor_kind, actor_id, type, schema, data, prev_hash, hash) "
        "VALUES (1, 5, 'admin', 'root', 'user.created', 1, ?, ?, ?)",
        (data, "0" * 64, h),
    )
    db.conn.close()
    store = SQLiteEventStore(path)  # migrates
    [rec] = store.read()
    assert (rec.correlation_id, rec.reason, rec.hash) == ("", "", h)
    assert store.verify().ok


def test_correlation_ids_are_distinct_hex_and_a_forked_child_does_not_repeat_its_parents() -> None:
    """Ids come from a seeded generator, not a system call each: 16 hex digits, never
    the same twice, and a child process (a forked worker) is reseeded, so its ids are
    not its parent's next ones."""
    ids = [new_correlation_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, " ".join(new_correlation_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [new_correlation_id() for _ in range(5)]
    assert len(child) == 5 and not set(child) & set(parent)
