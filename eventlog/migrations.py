"""Schema migrations of the SQLite event store (sqlite-utils' migration registry).

Each migration runs in a transaction together with the row that records it. The
``events`` table is append-only: triggers refuse UPDATE and DELETE, so an accidental
write through the SQL shell fails loudly. (A determined editor can drop the triggers;
that is what the hash chain and ``tailledger log verify`` are for.)

:func:`connect` and :func:`prepare` open the database the same way for the event store
and the side tables that share its file.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

__all__ = ["BUSY_TIMEOUT_MS", "MIGRATIONS", "connect", "prepare"]

MIGRATIONS = Migrations("tailledger.eventlog")


@MIGRATIONS(name="0001_events")
def create_events(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE events (
            seq            INTEGER PRIMARY KEY,
            recorded_at_us INTEGER NOT NULL,
            actor_kind     TEXT    NOT NULL,
            actor_id       TEXT    NOT NULL,
            type           TEXT    NOT NULL,
            schema         INTEGER NOT NULL,
            data           BLOB    NOT NULL,
            prev_hash      TEXT    NOT NULL,
            hash           TEXT    NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX events_recorded_at ON events (recorded_at_us)")
    db.execute(
        "CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
        "BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END"
    )
    db.execute(
        "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
        "BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END"
    )


@MIGRATIONS(name="0002_event_cause")
def add_event_cause(db: Database) -> None:
    # Rows written before these columns existed read as "" and hash as they always did.
    db.execute("ALTER TABLE events ADD COLUMN correlation_id TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE events ADD COLUMN reason TEXT NOT NULL DEFAULT ''")


@MIGRATIONS(name="0003_side_tables")
def create_side_tables(db: Database) -> None:
    """Compactable tables beside the log (see :mod:`eventlog.sidetables`): rows are
    replaced and deleted, they are not chained, and no fold reads them."""
    db.execute(
        """
        CREATE TABLE presence (
            node_id      INTEGER PRIMARY KEY,
            last_seen_us INTEGER NOT NULL,
            online       INTEGER NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE pending_registrations (
            auth_id         TEXT    PRIMARY KEY,
            machine_key     TEXT    NOT NULL,
            node_key        TEXT    NOT NULL,
            hostname        TEXT    NOT NULL,
            os              TEXT    NOT NULL,
            request_tags    TEXT    NOT NULL,
            ephemeral       INTEGER NOT NULL,
            source          TEXT    NOT NULL,
            created_us      INTEGER NOT NULL,
            expires_us      INTEGER NOT NULL,
            rejected_reason TEXT,
            rejected_by     TEXT
        )
        """
    )
    db.execute("CREATE INDEX pending_by_source ON pending_registrations (source)")
    db.execute("CREATE INDEX pending_by_machine ON pending_registrations (machine_key)")
    db.execute("CREATE INDEX pending_by_expiry ON pending_registrations (expires_us)")


@MIGRATIONS(name="0004_signed_checkpoints")
def create_signed_checkpoints(db: Database) -> None:
    # Beside the log, append-only like it (see eventlog/signing.py).
    db.execute(
        """
        CREATE TABLE signed_checkpoints (
            n            INTEGER PRIMARY KEY,
            seq          INTEGER NOT NULL,
            hash         TEXT    NOT NULL,
            signed_at_us INTEGER NOT NULL,
            prev         TEXT    NOT NULL,
            public_key   TEXT    NOT NULL,
            signature    TEXT    NOT NULL
        )
        """
    )
    db.execute(
        "CREATE TRIGGER signed_checkpoints_no_update BEFORE UPDATE ON signed_checkpoints "
        "BEGIN SELECT RAISE(ABORT, 'signed checkpoints are append-only'); END"
    )
    db.execute(
        "CREATE TRIGGER signed_checkpoints_no_delete BEFORE DELETE ON signed_checkpoints "
        "BEGIN SELECT RAISE(ABORT, 'signed checkpoints are append-only'); END"
    )


#: How long a connection waits for another writer's lock (milliseconds).
BUSY_TIMEOUT_MS: Final = 10_000


def connect(path: str, *, read_only: bool = False, immutable: bool = False) -> sqlite3.Connection:
    """A connection to the log's database at ``path`` as the stores use one: usable from
    any thread, in autocommit (transactions are explicit), waiting up to 10 s for
    another writer's lock. ``read_only`` opens it for reading only; ``immutable`` (with
    it) also promises SQLite that nobody writes the file."""
    if read_only:
        uri = f"file:{path}?mode=ro" + ("&immutable=1" if immutable else "")
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def prepare(conn: sqlite3.Connection, path: str, *, synchronous: str) -> None:
    """Make the database at ``path`` ready for writing through ``conn``: WAL mode (for a
    file), the ``synchronous`` pragma, and the migrations it lacks."""
    db = Database(conn)
    if path != ":memory:":
        db.enable_wal()
    conn.execute(f"PRAGMA synchronous={synchronous}")
    MIGRATIONS.apply(db)


@MIGRATIONS(name="0005_no_recorded_at_index")
def drop_recorded_at_index(db: Database) -> None:
    # Recorded times never go backwards along the log, so "the last event at or before
    # T" bisects the primary key (SQLiteEventStore.seq_at_time): an index on the time
    # only cost every append (a tenth of ``tailledger bench log``).
    db.execute("DROP INDEX IF EXISTS events_recorded_at")
