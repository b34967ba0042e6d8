"""The SQLite backend: the contract, plus what only a file on disk can show."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from eventlog import (
    AppendRequest,
    ChainError,
    EventLogError,
    EventStore,
    SQLiteEventStore,
    StorageFullError,
)
from eventlog.events import PolicySet, UserCreated
from eventlog.migrations import BUSY_TIMEOUT_MS
from tests.conftest import ADMIN

from .contract import StoreContract, user


class TestMemoryStore(StoreContract):
    def make_store(self) -> EventStore:
        return SQLiteEventStore(":memory:")


class TestFileStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.dir = tmp_path

    def make_store(self) -> EventStore:
        return SQLiteEventStore(self.dir / "log.db")


def _fill(path: Path, n: int = 5) -> None:
    store = SQLiteEventStore(path)
    for i in range(1, n + 1):
        store.append_batch([AppendRequest(events=(user(i),), actor=ADMIN)], i * 1000)
    store.close()


def _raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS events_no_update")
    conn.execute("DROP TRIGGER IF EXISTS events_no_delete")
    return conn


def test_reopen_keeps_events_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _fill(path)
    store = SQLiteEventStore(path)
    assert [e.seq for e in store.read()] == [1, 2, 3, 4, 5]
    [r] = store.append_batch([AppendRequest(events=(user(6),), actor=ADMIN)], 9000)
    assert isinstance(r, tuple) and r[0].seq == 6
    assert store.verify().ok


def test_triggers_refuse_update_and_delete(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _fill(path)
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE events SET actor_id = 'mallory' WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM events WHERE seq = 2")


def test_verify_names_an_altered_event(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _fill(path)
    forged = b'{"type":"user.created","user_id":3,"name":"mallory"}'
    _raw(path).execute("UPDATE events SET data = ? WHERE seq = 3", (forged,))
    report = SQLiteEventStore(path).verify()
    assert report.first_bad == 3
    assert "altered" in (report.reason or "")
    assert report.count == 2


def test_verify_names_a_removed_event(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _fill(path)
    _raw(path).execute("DELETE FROM events WHERE seq = 4")
    report = SQLiteEventStore(path).verify()
    assert report.first_bad == 4
    assert "removed" in (report.reason or "")


def test_verify_names_reordered_events(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _fill(path)
    conn = _raw(path)
    # Swap the payloads and hashes of events 2 and 3 but keep their seq numbers.
    rows = {
        r[0]: r[1:]
        for r in conn.execute("SELECT seq, data, prev_hash, hash FROM events WHERE seq IN (2, 3)")
    }
    for seq, other in ((2, 3), (3, 2)):
        conn.execute(
            "UPDATE events SET data = ?, prev_hash = ?, hash = ? WHERE seq = ?", (*rows[other], seq)
        )
    report = SQLiteEventStore(path).verify()
    assert report.first_bad == 2
    with pytest.raises(ChainError) as excinfo:
        SQLiteEventStore(path).check_chain()
    assert excinfo.value.seq == 2


def test_verify_catches_a_recomputed_hash_that_breaks_the_next_link(tmp_path: Path) -> None:
    """A forger who also rewrites the row's own hash is caught at the next event."""
    from eventlog import chain_hash

    path = tmp_path / "log.db"
    _fill(path)
    conn = _raw(path)
    seq, at, kind, ident, type_, schema, prev = conn.execute(
        "SELECT seq, recorded_at_us, actor_kind, actor_id, type, schema, prev_hash "
        "FROM events WHERE seq = 2"
    ).fetchone()
    forged = b'{"type":"user.created","user_id":2,"name":"mallory"}'
    new_hash = chain_hash(
        prev, seq=seq, recorded_at_us=at, actor_kind=kind, actor_id=ident, type=type_,
        schema=schema, data=forged,
    )
    conn.execute("UPDATE events SET data = ?, hash = ? WHERE seq = 2", (forged, new_hash))
    report = SQLiteEventStore(path).verify()
    assert report.first_bad == 3
    assert "prev_hash" in (report.reason or "")


def test_verify_names_a_time_going_backwards(tmp_path: Path) -> None:
    """Event 3 re-timed before event 2 and every hash after it recomputed: the chain
    holds, but "the state at time T" would not, so verify names it."""
    from eventlog import chain_hash

    path = tmp_path / "log.db"
    _fill(path)
    conn = _raw(path)
    [prev] = conn.execute("SELECT hash FROM events WHERE seq = 2").fetchone()
    for seq in (3, 4, 5):
        at, kind, ident, type_, schema, data, corr, reason = conn.execute(
            "SELECT recorded_at_us, actor_kind, actor_id, type, schema, data, correlation_id, reason "
            "FROM events WHERE seq = ?", (seq,)
        ).fetchone()
        at = 1_500 if seq == 3 else at
        new_hash = chain_hash(
            prev, seq=seq, recorded_at_us=at, actor_kind=kind, actor_id=ident, type=type_,
            schema=schema, data=data, correlation_id=corr, reason=reason,
        )
        conn.execute(
            "UPDATE events SET recorded_at_us = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (at, prev, new_hash, seq),
        )
        prev = new_hash
    report = SQLiteEventStore(path).verify()
    assert report.first_bad == 3, report
    assert "backwards" in (report.reason or "")


def test_an_older_log_loses_its_time_index_and_still_answers_by_time(tmp_path: Path) -> None:
    """Logs written before migration 0005 carry an index on the recorded time; opening
    one for writing drops it (every append paid for it), and the time still finds the
    seq (bisected)."""
    path = tmp_path / "log.db"
    _fill(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE INDEX events_recorded_at ON events (recorded_at_us)")
    conn.execute("DELETE FROM _sqlite_migrations WHERE name = '0005_no_recorded_at_index'")
    conn.close()
    assert SQLiteEventStore(path, read_only=True).seq_at_time(3_500) == 3  # as it is
    store = SQLiteEventStore(path)
    query = "SELECT name FROM sqlite_master WHERE type = 'index'"
    assert "events_recorded_at" not in {r[0] for r in sqlite3.connect(path).execute(query)}
    assert [store.seq_at_time(t) for t in (999, 1_000, 3_500, 5_000)] == [0, 1, 3, 5]


def test_an_append_at_once_does_not_wait_for_another_writers_lock(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _fill(path, 1)
    store = SQLiteEventStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    request = [AppendRequest(events=(user(2),), actor=ADMIN)]
    start = time.monotonic()
    assert store.try_append_batch(request, 2_000) is None  # at once, not after the 10 s timeout
    assert time.monotonic() - start < 5
    other.execute("COMMIT")
    [result] = store.try_append_batch(request, 2_000) or []
    assert isinstance(result, tuple) and result[0].seq == 2
    # Its connection waits for other writers again afterwards (append_batch does).
    assert store._writer.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS


def test_read_only_store_refuses_appends(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _fill(path, 2)
    store = SQLiteEventStore(path, read_only=True)
    assert store.head().seq == 2
    with pytest.raises(EventLogError, match="read-only"):
        store.append_batch([AppendRequest(events=(user(9),), actor=ADMIN)], 1)


def test_two_store_instances_on_one_file_cannot_both_win(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    a, b = SQLiteEventStore(path), SQLiteEventStore(path)
    [ra] = a.append_batch([AppendRequest(events=(user(1),), actor=ADMIN, expected_seq=0)], 1)
    [rb] = b.append_batch([AppendRequest(events=(user(2),), actor=ADMIN, expected_seq=0)], 2)
    assert isinstance(ra, tuple)
    assert not isinstance(rb, tuple)
    assert [e.event for e in b.read()] == [UserCreated(user_id=1, name="user1")]


def test_unreadable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EventLogError, match="cannot open the event log"):
        SQLiteEventStore(tmp_path / "missing-dir" / "log.db")


def _limit_pages(conn: sqlite3.Connection, extra: int = 0) -> None:
    """Make ``conn`` see a full disk: no page beyond the current ones (plus ``extra``)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + extra}")


def test_a_full_disk_is_a_clear_error_and_the_store_recovers(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "log.db")
    store.append_batch([AppendRequest(events=(user(1),), actor=ADMIN)], 1000)
    big = PolicySet(text="x" * 50_000, sha256="0" * 64)
    # The limit holds per connection: it must be the store's own writer that hits it.
    _limit_pages(store._writer, extra=2)  # room for part of the append, not all of it
    with pytest.raises(StorageFullError, match=r"the disk is full: cannot append .* until space is freed"):
        store.append_batch([AppendRequest(events=(user(2), big), actor=ADMIN)], 2000)
    assert store.head().seq == 1 and store.verify().ok  # nothing half-written

    store._writer.execute("PRAGMA max_page_count = 1073741823")  # space returns
    [recorded] = store.append_batch([AppendRequest(events=(user(2), big), actor=ADMIN)], 3000)
    assert not isinstance(recorded, BaseException) and [r.seq for r in recorded] == [2, 3]
    store.close()
    reopened = SQLiteEventStore(tmp_path / "log.db")
    assert reopened.verify().count == 3
    reopened.close()


def test_api_key_actors_of_older_logs_still_read_verify_and_move(tmp_path: Path) -> None:
    """The API's key actor is now ``api:``; rows an older build wrote as ``apikey:``
    read back as they were, verify, and survive an export and import unchanged."""
    from eventlog import Actor, ActorKind
    from eventlog.export import export_lines, import_export

    old = Actor(kind=ActorKind.API_KEY, id="a1b2c3/1")  # what the older build stored
    new = Actor(kind=ActorKind.API, id="a1b2c3/1")
    path = tmp_path / "log.db"
    store = SQLiteEventStore(path)
    store.append_batch([AppendRequest(events=(user(1),), actor=old)], 1000)
    store.append_batch([AppendRequest(events=(user(2),), actor=new)], 2000)
    store.close()
    raw = sqlite3.connect(path)
    assert [r[0] for r in raw.execute("SELECT actor_kind FROM events ORDER BY seq")] == ["apikey", "api"]
    raw.close()
    store = SQLiteEventStore(path, read_only=True)
    assert [str(r.actor) for r in store.read()] == ["apikey:a1b2c3/1", "api:a1b2c3/1"]
    assert store.verify().ok
    lines = b"".join(export_lines(store))
    head = store.head()
    store.close()
    (tmp_path / "export.jsonl").write_bytes(lines)
    copy = SQLiteEventStore(tmp_path / "copy.db")
    import_export(tmp_path / "export.jsonl", copy)
    assert copy.head() == head and copy.verify().ok
    assert [str(r.actor) for r in copy.read()] == ["apikey:a1b2c3/1", "api:a1b2c3/1"]
