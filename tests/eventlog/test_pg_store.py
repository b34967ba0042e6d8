"""The PostgreSQL backend: the contract, plus what only a shared server can show."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from eventlog import AppendRequest, EventLogError, EventStore, ExpectedSequenceConflict
from eventlog.pgstore import MIGRATIONS, PostgresEventStore, migrate
from tests.conftest import ADMIN
from tests.pgserver import PgServer
from tests.support.waits import wait_until_sync

from .contract import StoreContract, race, user


class TestPostgresStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _database(self, pg_dsn: str) -> Iterator[None]:
        self.dsn = pg_dsn
        self.opened: list[PostgresEventStore] = []
        yield
        for store in self.opened:
            store.close()

    def make_store(self) -> EventStore:
        store = PostgresEventStore(self.dsn)
        self.opened.append(store)
        return store


def _fill(store: EventStore, n: int) -> None:
    for i in range(1, n + 1):
        store.append_batch([AppendRequest(events=(user(i),), actor=ADMIN)], i * 1000)


def test_two_replicas_can_never_both_win(pg_dsn: str) -> None:
    """Eight stores (eight connections, as eight replicas) race for the same head:
    exactly one appends, every other one hears the conflict, and the chain holds."""
    stores = [PostgresEventStore(pg_dsn) for _ in range(8)]
    try:
        for round_ in range(5):
            outcomes = race(stores, expected_seq=round_)
            winners = [o for o in outcomes if isinstance(o, tuple)]
            assert len(winners) == 1
            assert all(isinstance(o, ExpectedSequenceConflict) for o in outcomes if o not in winners)
        assert stores[0].head().seq == 5
        assert stores[3].verify().ok
    finally:
        for s in stores:
            s.close()


def test_unique_seq_refuses_a_writer_that_bypasses_the_lock(pg_dsn: str) -> None:
    store = PostgresEventStore(pg_dsn)
    _fill(store, 1)
    [row] = store.read_rows()
    with psycopg.connect(pg_dsn) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO events (seq, recorded_at_us, actor_kind, actor_id, type, schema, data, "
            "prev_hash, hash) VALUES (1, 1, 'admin', 'x', 't', 1, '\\x00', 'p', 'h')"
        )
    assert store.read_rows() == [row]
    store.close()


def test_the_log_is_append_only(pg_dsn: str) -> None:
    store = PostgresEventStore(pg_dsn)
    _fill(store, 2)
    for statement in ("UPDATE events SET actor_id = 'mallory'", "DELETE FROM events", "TRUNCATE events"):
        with psycopg.connect(pg_dsn) as conn, pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute(statement.encode())
    assert store.verify().count == 2
    store.close()


def test_migrations_are_versioned_and_applied_once(pg_dsn: str) -> None:
    a = PostgresEventStore(pg_dsn)
    b = PostgresEventStore(pg_dsn)  # a second replica starting finds nothing to do
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
        assert names == [name for name, _ in MIGRATIONS]
        assert migrate(conn) == []
    a.close()
    b.close()


def test_the_same_events_hash_the_same_on_both_backends(pg_dsn: str) -> None:
    from eventlog import SQLiteEventStore

    pg, lite = PostgresEventStore(pg_dsn), SQLiteEventStore(":memory:")
    for store in (pg, lite):
        _fill(store, 5)
    assert pg.read_rows() == lite.read_rows()
    assert pg.head() == lite.head()
    pg.close()


def test_a_notification_announces_an_append_by_another_replica(pg_dsn: str) -> None:
    a, b = PostgresEventStore(pg_dsn), PostgresEventStore(pg_dsn)
    assert b.wait_for_append(0.01) is False  # starts listening; nothing yet
    _fill(a, 1)
    assert b.wait_for_append(30) is True
    a.close()
    b.close()


def test_losing_the_server_fails_fast_then_recovers(pg_server: PgServer, pg_dsn: str) -> None:
    store = PostgresEventStore(pg_dsn)
    _fill(store, 3)
    pg_server.kill()
    try:
        with pytest.raises(EventLogError):
            store.append_batch([AppendRequest(events=(user(9),), actor=ADMIN)], 9)
        assert not store.health().ok
        with pytest.raises(EventLogError):
            store.head()
        assert not store.ping().ok
    finally:
        pg_server.start()
    # Back-off: the next attempt comes within a few seconds; the data is all there.
    wait_until_sync(lambda: store.ping().ok, what="the store to reconnect", seconds=10)
    assert store.verify().count == 3
    [r] = store.append_batch([AppendRequest(events=(user(4),), actor=ADMIN)], 10_000)
    assert isinstance(r, tuple) and r[0].seq == 4
    store.close()


def test_a_restart_of_the_server_costs_no_failed_call(pg_server: PgServer, pg_dsn: str) -> None:
    """Connections that died while idle (a restart between two calls) are replaced on
    the spot: the first read and the first append after the restart succeed."""
    store = PostgresEventStore(pg_dsn)
    _fill(store, 2)
    pg_server.kill()
    pg_server.start()
    assert store.head().seq == 2
    [r] = store.append_batch([AppendRequest(events=(user(3),), actor=ADMIN)], 9000)
    assert isinstance(r, tuple) and r[0].seq == 3
    assert store.health().ok
    store.close()
