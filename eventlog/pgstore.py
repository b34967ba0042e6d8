"""The PostgreSQL backend of the event log, and its side tables.

Several ``tailledger serve`` processes (replicas) share one log here. The store keeps
the contract of :class:`~eventlog.store.EventStore` exactly: the same rows, the same
hash chain, the same answers (``tests/eventlog/contract.py`` runs on both backends).

Driver: psycopg 3, synchronous, like the SQLite store; the trio layer
(:mod:`eventlog.log`) calls it through ``trio.to_thread.run_sync``. Each store holds
three connections: a writer, a reader (autocommit) and, once something waits for other
writers, a listener.

Concurrency: an append runs in one transaction that first takes a transaction-scoped
advisory lock (:data:`APPEND_LOCK`), then reads the head, checks each request's
``expected_seq`` and inserts. Appends of every replica are therefore serialised, and
the loser of an ``expected_seq`` race gets :class:`ExpectedSequenceConflict`. The
primary key on ``seq`` is a second guard: a writer that bypassed the lock (or a bug)
fails on the duplicate sequence number instead of forking the chain.

Tailing: an append notifies the channel :data:`CHANNEL` (delivered at commit);
:meth:`PostgresEventStore.wait_for_append` blocks on it, and :class:`EventLog` still
polls as a fallback (a notification lost with a connection is found by the next poll).

Connection loss: a failed connection is dropped; the next call reconnects, at most once
per back-off interval (0.1 s doubling to 5 s), failing fast in between with
:class:`DatabaseUnavailable`. :meth:`PostgresEventStore.health` reports the state for
``/health``. An append whose connection broke during the commit is reported as failed
with its outcome unknown (as with any database); it was not acknowledged.

Schema: versioned migrations in ``schema_migrations``, applied under an advisory lock,
each in the transaction that records it (so two replicas starting together migrate once).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

import psycopg
from psycopg import sql

from .envelope import GENESIS_HASH
from .errors import (
    EventLogError,
    StoreClosedError,
    StoreUnavailableError,
)
from .rows import (
    CHECKPOINT_COLUMNS,
    COLUMNS,
    AppendRequest,
    AppendResult,
    Head,
    RowParams,
    StoredRow,
    checkpoint_from_row,
    following,
    paged,
    row_params,
    scan_where,
    stage_append,
    stored_row,
)
from .sidetables import SideTables
from .signing import SignedCheckpoint
from .store import EventStore

__all__ = [
    "APPEND_LOCK",
    "CHANNEL",
    "DatabaseUnavailable",
    "LeaderLock",
    "PostgresEventStore",
    "PostgresSideTables",
    "StoreHealth",
    "migrate",
]

#: The notification channel of appends (payload: the new head's seq).
CHANNEL: Final = "tailledger_events"
#: Advisory lock keys (one namespace; arbitrary but fixed).
APPEND_LOCK: Final = 0x7A11_1ED6_E000_0001
MIGRATE_LOCK: Final = 0x7A11_1ED6_E000_0002
SIDE_LOCK: Final = 0x7A11_1ED6_E000_0003
#: Held (session-level) by the replica elected to run the run-once jobs.
LEADER_LOCK: Final = 0x7A11_1ED6_E000_0004
#: High 32 bits of each replica's liveness lock (the low 32: a hash of its name), held
#: by its presence listener's session: a replica whose lock is gone is gone.
LIVENESS_LOCK_HIGH: Final = 0x7A11_1ED7

_BACKOFF_MIN: Final = 0.1
_BACKOFF_MAX: Final = 5.0

T = TypeVar("T")


#: The database cannot be reached now (the store retries with back-off).
DatabaseUnavailable = StoreUnavailableError


@dataclass(frozen=True, slots=True)
class StoreHealth:
    ok: bool
    error: str = ""


# -- schema ---------------------------------------------------------------------------


def _append_only(table: str, function: str, message: str) -> str:
    """SQL that makes ``table`` refuse updates, deletes and truncation with ``message``,
    through the trigger function ``function``."""
    return f"""
        CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '{message}';
        END $$;
        CREATE TRIGGER {table}_no_update BEFORE UPDATE OR DELETE ON {table}
            FOR EACH ROW EXECUTE FUNCTION {function}();
        CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION {function}();
        """


#: Versioned migrations, in order: (name, SQL). Never edit one that shipped; add one.
MIGRATIONS: Final[tuple[tuple[str, str], ...]] = (
    (
        "0001_events",
        """
        CREATE TABLE events (
            seq            BIGINT PRIMARY KEY,
            recorded_at_us BIGINT NOT NULL,
            actor_kind     TEXT   NOT NULL,
            actor_id       TEXT   NOT NULL,
            type           TEXT   NOT NULL,
            schema         INTEGER NOT NULL,
            data           BYTEA  NOT NULL,
            prev_hash      TEXT   NOT NULL,
            hash           TEXT   NOT NULL,
            correlation_id TEXT   NOT NULL DEFAULT '',
            reason         TEXT   NOT NULL DEFAULT ''
        );
        CREATE INDEX events_recorded_at ON events (recorded_at_us);
        """
        + _append_only("events", "tailledger_append_only", "the event log is append-only"),
    ),
    (
        "0002_side_tables",
        """
        CREATE TABLE presence (
            node_id      BIGINT PRIMARY KEY,
            last_seen_us BIGINT NOT NULL,
            online       INTEGER NOT NULL
        );
        CREATE TABLE pending_registrations (
            auth_id         TEXT    PRIMARY KEY,
            machine_key     TEXT    NOT NULL,
            node_key        TEXT    NOT NULL,
            hostname        TEXT    NOT NULL,
            os              TEXT    NOT NULL,
            request_tags    TEXT    NOT NULL,
            ephemeral       INTEGER NOT NULL,
            source          TEXT    NOT NULL,
            created_us      BIGINT  NOT NULL,
            expires_us      BIGINT  NOT NULL,
            rejected_reason TEXT,
            rejected_by     TEXT
        );
        CREATE INDEX pending_by_source ON pending_registrations (source);
        CREATE INDEX pending_by_machine ON pending_registrations (machine_key);
        CREATE INDEX pending_by_expiry ON pending_registrations (expires_us);
        """,
    ),
    (
        "0003_signed_checkpoints",
        """
        CREATE TABLE signed_checkpoints (
            n            BIGINT PRIMARY KEY,
            seq          BIGINT NOT NULL,
            hash         TEXT   NOT NULL,
            signed_at_us BIGINT NOT NULL,
            prev         TEXT   NOT NULL,
            public_key   TEXT   NOT NULL,
            signature    TEXT   NOT NULL
        );
        """
        + _append_only(
            "signed_checkpoints", "tailledger_checkpoints_append_only", "signed checkpoints are append-only"
        ),
    ),
    (
        "0004_presence_live",
        """
        CREATE SEQUENCE presence_live_version;
        CREATE TABLE presence_live (
            node_id  BIGINT PRIMARY KEY,
            replica  TEXT   NOT NULL,
            version  BIGINT NOT NULL,
            state    BYTEA  NOT NULL
        );
        CREATE INDEX presence_live_by_version ON presence_live (version);
        """,
    ),
    (
        "0005_presence_live_online",
        """
        ALTER TABLE presence_live ADD COLUMN online BOOLEAN NOT NULL DEFAULT false;
        CREATE INDEX presence_live_online ON presence_live (replica) WHERE online;
        """,
    ),
    (
        "0006_relay_mesh",
        """
        CREATE TABLE relay_mesh_key (
            only_row  BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
            mesh_key  TEXT NOT NULL
        );
        CREATE TABLE relay_nodes (
            replica     TEXT   PRIMARY KEY,
            peer        BYTEA  NOT NULL,
            node        BYTEA  NOT NULL,
            updated_us  BIGINT NOT NULL
        );
        """,
    ),
    (
        "0007_append_lock_head",
        """
        CREATE FUNCTION tailledger_lock_head(lock_key BIGINT)
            RETURNS TABLE (seq BIGINT, hash TEXT, recorded_at_us BIGINT)
            LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(lock_key);
            -- A statement of its own: its snapshot is taken once the lock is held, so
            -- it sees the head the previous holder committed.
            RETURN QUERY SELECT e.seq, e.hash, e.recorded_at_us FROM events e ORDER BY e.seq DESC LIMIT 1;
        END $$;
        """,
    ),
)

#: Takes the liveness lock of the replica named by the parameter (see ``hold_liveness``).
_TAKE_LIVENESS: Final = (
    f"SELECT pg_try_advisory_lock(({LIVENESS_LOCK_HIGH}::bigint << 32) | (hashtext(%s)::bigint & 4294967295))"
)


def _replica_alive(column: str) -> str:
    """SQL that is true while the replica named in ``column`` holds its liveness lock
    (its presence listener's session is alive: see ``hold_liveness``)."""
    return (
        "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        f"AND l.classid = {LIVENESS_LOCK_HIGH}::oid AND l.objid = (hashtext({column})::bigint & 4294967295)::oid)"
    )


#: How long the row of a gone replica's relay stays in ``relay_nodes`` (for a look
#: after the fact); it is left out of the live relays at once.
RELAY_ROW_KEEP_US: Final = 3600 * 1_000_000

#: The notification channel of live presence changes.
PRESENCE_CHANNEL: Final = "tailledger_presence"


def migrate(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply the migrations ``conn``'s database lacks; return their names.

    Runs under :data:`MIGRATE_LOCK`, each migration in the transaction that records it.
    """
    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {str(r[0]) for r in conn.execute("SELECT name FROM schema_migrations")}
        for name, text in MIGRATIONS:
            if name in done:
                continue
            with conn.transaction():
                conn.execute(text.encode())
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
            applied.append(name)
    return applied


# -- connections ----------------------------------------------------------------------


class _Connection:
    """One lazily (re)connected psycopg connection, used under its own lock.

    A call that fails on a broken connection drops it; reconnecting is attempted at
    most once per back-off interval, so a dead server costs a fast failure, not a hang.
    """

    def __init__(self, conninfo: str, what: str, *, connect_timeout: float) -> None:
        self._conninfo = conninfo
        self._what = what
        self._timeout = connect_timeout
        self.lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._backoff = 0.0
        self._next_try = 0.0
        self.last_error = ""
        self.fresh = False  # whether the last get() connected anew
        self.setup: Callable[[psycopg.Connection[Any]], None] | None = None

    def get(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed:
            self.fresh = False
            return conn
        now = time.monotonic()
        if now < self._next_try:
            raise DatabaseUnavailable(
                f"the database is unavailable ({self.last_error}); retrying in "
                f"{self._next_try - now:.1f}s"
            )
        try:
            conn = psycopg.connect(
                self._conninfo, autocommit=True, connect_timeout=max(1, round(self._timeout))
            )
            if self.setup is not None:
                self.setup(conn)
        except psycopg.Error as exc:
            self._failed(exc)
            raise DatabaseUnavailable(f"cannot connect to the database: {_short(exc)}") from exc
        self._conn = conn
        self._backoff = 0.0
        self.last_error = ""
        self.fresh = True
        return conn

    def retry_now(self) -> None:
        """Allow one reconnection at once (a connection found dead, not a dead server)."""
        self._next_try = 0.0

    def _failed(self, exc: BaseException) -> None:
        self.last_error = _short(exc)
        self._backoff = min(_BACKOFF_MAX, max(_BACKOFF_MIN, self._backoff * 2))
        self._next_try = time.monotonic() + self._backoff

    def broken(self, exc: BaseException) -> None:
        """Drop the connection after ``exc`` if it is no longer usable."""
        conn = self._conn
        if conn is None:
            return
        if conn.closed or conn.broken or isinstance(exc, psycopg.OperationalError):
            self._conn = None
            with contextlib.suppress(Exception):
                conn.close()
            self._failed(exc)

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a notification on this (listening)
        connection; ``True`` when one came. An error counts as "no news" (the caller
        polls): the connection is dropped and the wait lasts the shortest back-off."""
        with self.lock:
            try:
                conn = self.get()
                for _ in conn.notifies(timeout=timeout, stop_after=1):
                    return True
                return False
            except (psycopg.Error, EventLogError) as exc:
                self.broken(exc)
        time.sleep(min(timeout, _BACKOFF_MIN))
        return False

    @property
    def healthy(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- the store ------------------------------------------------------------------------

_SELECT: Final = f"SELECT {COLUMNS} FROM events "
_INSERT: Final = f"INSERT INTO events ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
_HEAD: Final = "SELECT seq, hash, recorded_at_us FROM events ORDER BY seq DESC LIMIT 1"
_COPY: Final = f"COPY events ({COLUMNS}) FROM STDIN"
#: Takes :data:`APPEND_LOCK` (transaction-scoped), then reads the head (migration 0007).
_LOCK_HEAD: Final = "SELECT * FROM tailledger_lock_head(%s)"


def _head_from(r: tuple[Any, ...] | None) -> Head:
    """The head read by :data:`_HEAD` or :data:`_LOCK_HEAD` (``None``: an empty log)."""
    return Head(0, GENESIS_HASH, 0) if r is None else Head(int(r[0]), str(r[1]), int(r[2]))


def _head(conn: psycopg.Connection[Any]) -> Head:
    return _head_from(conn.execute(_HEAD).fetchone())


def _listen(conn: psycopg.Connection[Any]) -> None:
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))


def _listen_presence(conn: psycopg.Connection[Any]) -> None:
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(PRESENCE_CHANNEL)))


class PostgresEventStore(EventStore):
    """The event log in a PostgreSQL database, shared by every replica.

    Args:
        conninfo: a libpq connection string or URI (``host=/run/pg dbname=ledger`` or
            ``postgresql://user@host/ledger``); a password may come from libpq's
            ``PGPASSWORD``/``PGPASSFILE`` or be part of it.
        connect_timeout: seconds one connection attempt may take.

    Raises:
        EventLogError: the database cannot be reached at start or its schema cannot be
            migrated.
    """

    notifies_appends = True

    def __init__(
        self, conninfo: str, *, connect_timeout: float = 5.0, read_only: bool = False
    ) -> None:
        self._conninfo = conninfo
        self._read_only = read_only
        self._closed = False
        self._writer = _Connection(conninfo, "writer", connect_timeout=connect_timeout)
        self._reader = _Connection(conninfo, "reader", connect_timeout=connect_timeout)
        self._listener = _Connection(conninfo, "listener", connect_timeout=connect_timeout)
        self._listener.setup = _listen
        try:
            with self._writer.lock:
                conn = self._writer.get()
                if not read_only:
                    migrate(conn)
                elif conn.execute("SELECT to_regclass('events')").fetchone() in (None, (None,)):
                    raise EventLogError("there is no event log in this database")
            if not read_only:
                # Subscribe now, so no append after the store exists goes unannounced.
                with self._listener.lock:
                    self._listener.get()
        except psycopg.Error as exc:
            self.close()
            raise EventLogError(f"cannot prepare the event log database: {_short(exc)}") from exc
        except StoreUnavailableError as exc:
            self.close()
            raise EventLogError(f"cannot open the event log: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @property
    def conninfo(self) -> str:
        return self._conninfo

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the event store is closed")

    def _call(
        self,
        c: _Connection,
        what: str,
        fn: Callable[[psycopg.Connection[Any]], T],
        *,
        retry_if: Callable[[], bool] = lambda: True,
    ) -> T:
        """``fn(conn)`` under the connection's lock, errors as :class:`EventLogError`.

        A connection that broke while idle (the server restarted) is only found out by
        using it: when that happens on a connection kept from before and ``retry_if()``
        says nothing can have reached the database (always, for reads; for a write,
        until its first statement succeeded), ``fn`` runs once more on a new one.
        """
        self._check_open()
        with c.lock:
            conn, fresh = c.get(), c.fresh
            for attempt in (1, 2):
                try:
                    return fn(conn)
                except psycopg.Error as exc:
                    c.broken(exc)
                    stale = isinstance(exc, psycopg.OperationalError) and not fresh
                    if attempt == 1 and stale and retry_if():
                        c.retry_now()
                        try:
                            conn, fresh = c.get(), True
                            continue
                        except StoreUnavailableError:
                            pass
                    if isinstance(exc, psycopg.OperationalError):
                        raise StoreUnavailableError(
                            f"the database is unavailable: {what} failed: {_short(exc)}"
                        ) from exc
                    raise EventLogError(f"{what} failed: {_short(exc)}") from exc
            raise AssertionError("unreachable")

    def health(self) -> StoreHealth:
        """Whether the last use of the database succeeded (no I/O here)."""
        for c in (self._writer, self._reader):
            if c.last_error:
                return StoreHealth(False, c.last_error)
        return StoreHealth(True)

    def ping(self) -> StoreHealth:
        """Reach the database now (reconnecting if due) and report."""
        try:
            for c in (self._reader, self._writer):
                self._call(c, "ping", lambda conn: conn.execute("SELECT 1").fetchone())
        except EventLogError as exc:
            return StoreHealth(False, str(exc))
        return self.health()

    # -- writing ---------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._read_only:
            raise EventLogError("the event store was opened read-only")

    def append_batch(self, requests: Sequence[AppendRequest], now_us: int) -> list[AppendResult]:
        self._check_writable()
        sent: list[bool] = []

        def work(conn: psycopg.Connection[Any]) -> list[AppendResult]:
            # The lock and the head in one call; the rows by COPY (about twice as fast
            # as an INSERT per row); acknowledged only once COMMIT has answered.
            with conn.transaction():
                r = conn.execute(_LOCK_HEAD, (APPEND_LOCK,)).fetchone()
                sent.append(True)
                results, rows = stage_append(requests, _head_from(r), now_us)
                if rows:
                    with conn.cursor() as cur, cur.copy(_COPY) as copy:
                        for row in rows:
                            copy.write_row(row)
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(rows[-1][0])))
            return results

        return self._call(self._writer, "append", work, retry_if=lambda: not sent)

    def insert_rows(self, rows: Sequence[StoredRow]) -> None:
        """Write rows exactly as given (an import): each must extend the chain at the head."""
        self.import_rows(rows, batch=max(1, len(rows)))

    def import_rows(self, rows: Iterable[StoredRow], *, batch: int = 5000) -> int:
        """The whole import in one transaction: a failure (a row that does not verify,
        a lost connection) leaves the log as it was, which matters because the log
        refuses deletes."""
        self._check_writable()

        def work(conn: psycopg.Connection[Any]) -> int:
            count = 0
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
                pending: list[RowParams] = []
                seq = 0
                with conn.cursor() as cur:
                    for r in following(rows, _head(conn)):
                        seq = r.seq
                        pending.append(row_params(r))
                        if len(pending) >= batch:
                            cur.executemany(_INSERT, pending)
                            count += len(pending)
                            pending = []
                    if pending:
                        cur.executemany(_INSERT, pending)
                        count += len(pending)
                if count:
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))
            return count

        return self._call(self._writer, "import", work, retry_if=lambda: False)

    # -- reading ---------------------------------------------------------------------

    def read_rows(self, after_seq: int = 0, limit: int = 1000) -> list[StoredRow]:
        def work(conn: psycopg.Connection[Any]) -> list[StoredRow]:
            cur = conn.execute(_SELECT + "WHERE seq > %s ORDER BY seq LIMIT %s", (after_seq, limit))
            return [stored_row(r) for r in cur.fetchall()]

        return self._call(self._reader, "read", work)

    def scan(
        self,
        after_seq: int,
        upto_seq: int,
        *,
        type_prefixes: tuple[str, ...],
        types_containing: tuple[str, ...] = (),
        contains: tuple[bytes, ...] = (),
    ) -> Iterator[StoredRow]:
        found = scan_where(
            type_prefixes, types_containing, contains,
            starts=lambda _: "starts_with(type, %s)", has="position(%s::bytea in data) > 0",
        )
        if found is None:
            return
        where, args = found
        query = (_SELECT + f"WHERE seq > %s AND seq <= %s AND ({where}) ORDER BY seq LIMIT 2000").encode()

        def page(conn: psycopg.Connection[Any], after: int) -> list[tuple[Any, ...]]:
            return conn.execute(query, (after, upto_seq, *args)).fetchall()

        yield from paged(lambda after: self._call(self._reader, "read", partial(page, after=after)), after_seq)

    def head(self) -> Head:
        return self._call(self._reader, "read", _head)

    def seq_at_time(self, at_us: int) -> int:
        def work(conn: psycopg.Connection[Any]) -> int:
            r = conn.execute("SELECT max(seq) FROM events WHERE recorded_at_us <= %s", (at_us,)).fetchone()
            return int(r[0]) if r and r[0] is not None else 0

        return self._call(self._reader, "read", work)

    # -- signed checkpoints ------------------------------------------------------------

    def add_signed_checkpoint(self, checkpoint: SignedCheckpoint) -> None:
        self._check_writable()
        c = checkpoint
        self._call(
            self._writer,
            f"storing signed checkpoint {c.n}",
            lambda conn: conn.execute(
                f"INSERT INTO signed_checkpoints ({CHECKPOINT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (c.n, c.seq, c.hash, c.signed_at_us, c.prev, c.public_key, c.signature),
            ),
        )

    def signed_checkpoints(self, after_n: int = 0) -> list[SignedCheckpoint]:
        def work(conn: psycopg.Connection[Any]) -> list[SignedCheckpoint]:
            rows = conn.execute(
                f"SELECT {CHECKPOINT_COLUMNS} FROM signed_checkpoints WHERE n > %s ORDER BY n", (after_n,)
            ).fetchall()
            return [checkpoint_from_row(r) for r in rows]

        return self._call(self._reader, "read", work)

    def wait_for_append(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for an append by anyone (this store included);
        ``True`` when one was announced. Errors count as "no news" (the caller polls)."""
        return not self._closed and self._listener.wait(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in (self._writer, self._reader, self._listener):
            c.close()


# -- side tables ----------------------------------------------------------------------


class _QmarkConnection:
    """The slice of :class:`sqlite3.Connection` that :class:`SideTables` uses, over
    psycopg: ``?`` placeholders become ``%s``."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, query: str, params: Sequence[object] = ()) -> psycopg.Cursor[Any]:
        return self._conn.execute(query.replace("?", "%s").encode(), params)

    def executemany(self, query: str, params: Sequence[Sequence[object]]) -> psycopg.Cursor[Any]:
        cur = self._conn.cursor()
        cur.executemany(query.replace("?", "%s").encode(), params)
        return cur


class PostgresSideTables(SideTables):
    """:class:`~eventlog.sidetables.SideTables` in the log's PostgreSQL database, shared
    by the replicas: a write runs in one transaction under :data:`SIDE_LOCK`, so the
    cap checks of two replicas never interleave (as ``BEGIN IMMEDIATE`` does in SQLite).
    """

    def __init__(self, conninfo: str, *, connect_timeout: float = 5.0) -> None:
        self._path = conninfo
        self._lock = threading.Lock()
        self._closed = False
        self._pg = _Connection(conninfo, "side tables", connect_timeout=connect_timeout)
        self._listen: _Connection | None = None
        try:
            with self._pg.lock:
                migrate(self._pg.get())
        except psycopg.Error as exc:
            self._pg.broken(exc)
            raise EventLogError(f"cannot prepare the side tables: {_short(exc)}") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pg.close()
        if self._listen is not None:
            self._listen.close()

    # -- live presence, shared by the replicas -----------------------------------------

    def publish_presence(self, replica: str, states: Sequence[tuple[int, bool, bytes]]) -> None:
        """Store each node's live presence (``(node id, online, opaque state bytes)``) as
        last written by ``replica``, and notify the other replicas once."""
        if not states:
            return

        def work(conn: Any) -> None:
            conn.executemany(
                "INSERT INTO presence_live (node_id, replica, version, online, state) "
                "VALUES (?, ?, nextval('presence_live_version'), ?, ?) ON CONFLICT (node_id) DO UPDATE "
                "SET replica = excluded.replica, version = excluded.version, online = excluded.online, "
                "state = excluded.state",
                [(n, replica, online, st) for n, online, st in states],
            )
            conn.execute("SELECT pg_notify(?, ?)", (PRESENCE_CHANNEL, replica))

        self._run("publishing presence", work, write=False)

    def hold_liveness(self, replica: str) -> None:
        """Take ``replica``'s liveness lock on the presence listener's session (again
        on each reconnection): while it is held, the nodes it published online stay
        online for the others (see :meth:`stale_presence`).

        Raises:
            EventLogError: the database cannot be reached (the next reconnection of
                the listener takes the lock).
        """

        def setup(conn: psycopg.Connection[Any]) -> None:
            _listen_presence(conn)
            conn.execute(_TAKE_LIVENESS, (replica,))

        listen = self._listener()
        listen.setup = setup
        with listen.lock:
            try:
                conn = listen.get()
                if not listen.fresh:
                    setup(conn)
            except psycopg.Error as exc:
                listen.broken(exc)
                raise EventLogError(f"taking the liveness lock failed: {_short(exc)}") from exc

    def stale_presence(self, replica: str) -> list[tuple[int, str, int, bytes]]:
        """Nodes published online by replicas that are gone (their liveness lock is not
        held: killed, or cut off from the database), other than ``replica``:
        ``(node id, replica, version, state)``."""

        def work(conn: Any) -> list[tuple[int, str, int, bytes]]:
            rows = conn.execute(
                "SELECT p.node_id, p.replica, p.version, p.state FROM presence_live p "
                f"WHERE p.online AND p.replica <> ? AND NOT {_replica_alive('p.replica')} ORDER BY p.node_id",
                (replica,),
            ).fetchall()
            return [(int(r[0]), str(r[1]), int(r[2]), bytes(r[3])) for r in rows]

        return self._run("reading stale presence", work, write=False)

    def expire_presence(self, states: Sequence[tuple[int, int, bytes]]) -> int:
        """Mark offline (with the new ``state`` bytes) each node whose row is still at
        the version :meth:`stale_presence` read (a node that came back meanwhile is left
        alone); notify the replicas. Returns how many rows changed."""
        if not states:
            return 0

        def work(conn: Any) -> int:
            changed = 0
            for node_id, version, state in states:
                cur = conn.execute(
                    "UPDATE presence_live SET version = nextval('presence_live_version'), online = false, "
                    "state = ? WHERE node_id = ? AND version = ?",
                    (state, node_id, version),
                )
                changed += cur.rowcount
            if changed:
                conn.execute("SELECT pg_notify(?, ?)", (PRESENCE_CHANNEL, "expired"))
            return changed

        return self._run("expiring presence", work, write=False)

    # -- the replicas' embedded relays, meshed into one region -------------------------

    def relay_mesh_key(self, proposed: str) -> str:
        """The region's mesh key shared by every replica's relay: ``proposed`` if no
        replica stored one before, else the stored one (the first replica's wins)."""

        def work(conn: Any) -> str:
            conn.execute(
                "INSERT INTO relay_mesh_key (mesh_key) VALUES (?) ON CONFLICT (only_row) DO NOTHING", (proposed,)
            )
            return str(conn.execute("SELECT mesh_key FROM relay_mesh_key").fetchone()[0])

        return self._run("reading the relay mesh key", work)

    def exchange_relays(self, replica: str, peer: bytes, node: bytes, now_us: int) -> list[tuple[str, bytes, bytes]]:
        """Publish ``replica``'s relay (how a mesh link dials it, ``peer``, and its DERP
        map node, ``node``: opaque bytes), forget the relays of replicas gone for
        :data:`RELAY_ROW_KEEP_US`, and return the relays of the live replicas (this one
        included) as ``(replica, peer, node)``, by replica name.

        A replica is live while it holds its liveness lock (:meth:`hold_liveness`): a
        replica killed with -9 drops out of the answer as soon as its session is gone.
        """

        def work(conn: Any) -> list[tuple[str, bytes, bytes]]:
            conn.execute(
                "INSERT INTO relay_nodes (replica, peer, node, updated_us) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (replica) DO UPDATE SET peer = excluded.peer, node = excluded.node, "
                "updated_us = excluded.updated_us",
                (replica, peer, node, now_us),
            )
            conn.execute(
                f"DELETE FROM relay_nodes r WHERE r.updated_us < ? AND NOT {_replica_alive('r.replica')}",
                (now_us - RELAY_ROW_KEEP_US,),
            )
            rows = conn.execute(
                f"SELECT r.replica, r.peer, r.node FROM relay_nodes r WHERE r.replica = ? "
                f"OR {_replica_alive('r.replica')} ORDER BY r.replica",
                (replica,),
            ).fetchall()
            return [(str(r[0]), bytes(r[1]), bytes(r[2])) for r in rows]

        return self._run("exchanging the relays", work, write=False)

    def _listener(self) -> _Connection:
        if self._listen is None:
            self._listen = _Connection(self._path, "presence listener", connect_timeout=5.0)
            self._listen.setup = _listen_presence
        return self._listen

    def presence_since(self, replica: str, version: int) -> tuple[list[tuple[int, bytes]], int]:
        """The live presence written after ``version`` by other replicas (and this one's
        rows that another replica marked offline: :meth:`expire_presence`), and the
        newest version seen (``version`` itself when nothing is newer)."""

        def work(conn: Any) -> tuple[list[tuple[int, bytes]], int]:
            rows = conn.execute(
                "SELECT node_id, replica, version, state, online FROM presence_live WHERE version > ? "
                "ORDER BY version",
                (version,),
            ).fetchall()
            newest = max([version, *(int(r[2]) for r in rows)])
            return [(int(r[0]), bytes(r[3])) for r in rows if r[1] != replica or not r[4]], newest

        return self._run("reading presence", work, write=False)

    def wait_presence(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a presence notification by anyone."""
        return not self._closed and self._listener().wait(timeout)

    def _run(self, what: str, fn: Callable[[Any], T], *, write: bool = True) -> T:
        if self._closed:
            raise StoreClosedError("the side tables are closed")
        with self._pg.lock:
            try:
                conn = self._pg.get()
                if not write:
                    return fn(_QmarkConnection(conn))
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SIDE_LOCK,))
                    return fn(_QmarkConnection(conn))
            except psycopg.Error as exc:
                self._pg.broken(exc)
                raise EventLogError(f"{what} failed: {_short(exc)}") from exc


# -- election -------------------------------------------------------------------------


class LeaderLock:
    """The election of the replica that runs the run-once jobs (ephemeral-node clean-up,
    subnet-route failover, signing the head): whoever holds the session-level advisory
    lock :data:`LEADER_LOCK` on its own connection.

    :meth:`poll` tries to take the lock, or checks that the connection holding it is
    still alive; the lock goes with the connection (a replica killed with -9, a
    network partition), so another replica's next :meth:`poll` takes it over.
    """

    def __init__(self, conninfo: str, *, connect_timeout: float = 5.0) -> None:
        self._conn = _Connection(conninfo, "leader", connect_timeout=connect_timeout)
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def poll(self) -> bool:
        """Whether this replica leads now (taking the lock when it is free)."""
        with self._conn.lock:
            try:
                conn = self._conn.get()
                if self._held:
                    conn.execute("SELECT 1").fetchone()
                else:
                    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
                    self._held = bool(row and row[0])
            except psycopg.Error as exc:
                self._conn.broken(exc)
                self._held = False
            except StoreUnavailableError:
                self._held = False
        return self._held

    def close(self) -> None:
        self._held = False
        self._conn.close()
