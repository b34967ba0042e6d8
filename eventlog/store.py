"""The event store interface and its SQLite backend.

This is the only module (with :mod:`eventlog.migrations`) that speaks SQL. The store is
synchronous on purpose: SQLite blocks and its connections are thread-bound, so the trio
layer (:mod:`eventlog.log`) calls it through ``trio.to_thread.run_sync`` with a capacity
limiter of one. Every backend implements :class:`EventStore` and passes the same
contract suite (``tests/eventlog/contract.py``).

Durability: an append returns only after its transaction committed. The SQLite backend
runs in WAL mode with ``synchronous=FULL`` by default, so an acknowledged event survives
a crash of the process and of the machine. Several appends may share one transaction
(group commit): :meth:`EventStore.append_batch` takes a batch of independent requests,
checks each one's expected sequence in order, and commits them together.

Concurrency: ``BEGIN IMMEDIATE`` takes SQLite's write lock before the head is read, so
two writers (threads or processes) cannot both append after the same head; the loser of
an ``expected_seq`` race gets :class:`~eventlog.errors.ExpectedSequenceConflict`.
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .envelope import GENESIS_HASH, RecordedEvent
from .errors import (
    ChainError,
    EventLogError,
    StorageFullError,
    StoreClosedError,
)
from .migrations import BUSY_TIMEOUT_MS, connect, prepare
from .rows import (
    CHECKPOINT_COLUMNS,
    COLUMNS,
    AppendRequest,
    AppendResult,
    Head,
    StoredRow,
    checkpoint_from_row,
    following,
    paged,
    row_params,
    scan_where,
    stage_append,
    stored_row,
)
from .signing import SignedCheckpoint

__all__ = ["EventStore", "SQLiteEventStore", "VerifyReport"]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of recomputing the hash chain.

    ``first_bad`` is the first sequence number at which the chain breaks, with
    ``reason`` saying how; both are ``None`` when the whole log verifies.
    """

    count: int
    head_seq: int
    head_hash: str
    first_bad: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None


class EventStore(abc.ABC):
    """The contract every log backend implements.

    All methods are synchronous and may block. Implementations must be safe to call from
    any single thread at a time for writes (the caller serialises them) and from other
    threads concurrently for reads.
    """

    @abc.abstractmethod
    def append_batch(self, requests: Sequence[AppendRequest], now_us: int) -> list[AppendResult]:
        """Append every request that passes its ``expected_seq`` check, in one commit.

        Args:
            requests: independent append requests, checked and applied in order; a
                request's ``expected_seq`` is compared with the head *including* the
                earlier requests of the same batch.
            now_us: the wall-clock time to record, in Unix microseconds. The store
                records ``max(now_us, previous recorded_at)`` so recorded times never go
                backwards and "the state at time T" is well defined.

        Returns:
            One entry per request: its recorded events, or the conflict that refused it.

        Raises:
            EventLogError: the commit failed; nothing of the batch was appended.
        """

    def read(self, after_seq: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Up to ``limit`` events with ``seq > after_seq``, in order."""
        return [row.to_event() for row in self.read_rows(after_seq, limit)]

    @abc.abstractmethod
    def read_rows(self, after_seq: int = 0, limit: int = 1000) -> list[StoredRow]:
        """Like :meth:`read` but undecoded, exactly as stored."""

    @abc.abstractmethod
    def head(self) -> Head:
        """The newest event's position (seq 0 when the log is empty)."""

    @abc.abstractmethod
    def seq_at_time(self, at_us: int) -> int:
        """The sequence number of the last event recorded at or before ``at_us``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. Further calls raise :class:`StoreClosedError`."""

    @abc.abstractmethod
    def add_signed_checkpoint(self, checkpoint: SignedCheckpoint) -> None:
        """Store a signed checkpoint (its ``n`` must be the next one).

        Raises:
            EventLogError: ``n`` is taken or the write failed.
        """

    @abc.abstractmethod
    def signed_checkpoints(self, after_n: int = 0) -> list[SignedCheckpoint]:
        """The signed checkpoints with ``n > after_n``, in order."""

    def last_signed_checkpoint(self) -> SignedCheckpoint | None:
        """The newest signed checkpoint stored, if any."""
        found = self.signed_checkpoints(0)
        return found[-1] if found else None

    def hash_at(self, seq: int) -> str | None:
        """The stored chain hash of event ``seq`` (``None`` when there is none)."""
        rows = self.read_rows(seq - 1, 1)
        return rows[0].hash if rows and rows[0].seq == seq else None

    #: Whether :meth:`wait_for_append` hears appends made through other connections
    #: (other processes); without it, :class:`~eventlog.log.EventLog` only polls.
    notifies_appends: bool = False

    def try_append_batch(self, requests: Sequence[AppendRequest], now_us: int) -> list[AppendResult] | None:
        """:meth:`append_batch` if it can begin at once, without waiting for a lock held
        by another thread or process; ``None`` (nothing appended) when it cannot.

        A local database answers this in microseconds, so :class:`~eventlog.log.EventLog`
        may commit on its own event loop's thread while that loop has nothing else to
        do. A backend that cannot promise it (a database over the network) returns
        ``None`` always, and every commit goes through the writer's thread.
        """
        return None

    def wait_for_append(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for an append by anyone; ``True`` when one
        was announced. Only for backends with :attr:`notifies_appends`."""
        raise NotImplementedError

    def insert_rows(self, rows: Sequence[StoredRow]) -> None:
        """Write rows exactly as given (an import): each must extend the chain at the head.

        Raises:
            ChainError: a row does not follow the head (seq, prev_hash or time).
            EventLogError: the store is read-only or the commit failed.
        """
        raise NotImplementedError

    def import_rows(self, rows: Iterable[StoredRow], *, batch: int = 5000) -> int:
        """Write a stream of rows with :meth:`insert_rows`, ``batch`` per commit; return
        how many. A backend that can keep the whole import in one transaction does (so
        that a failure leaves nothing behind in a log that refuses deletes)."""
        count = 0
        pending: list[StoredRow] = []
        for row in rows:
            pending.append(row)
            if len(pending) >= batch:
                self.insert_rows(pending)
                count += len(pending)
                pending = []
        if pending:
            self.insert_rows(pending)
            count += len(pending)
        return count

    def iter_rows(self, after_seq: int = 0, page: int = 5000) -> Iterator[StoredRow]:
        """Every stored row after ``after_seq``, paging through the log."""
        while True:
            rows = self.read_rows(after_seq, page)
            if not rows:
                return
            yield from rows
            after_seq = rows[-1].seq

    def scan(
        self,
        after_seq: int,
        upto_seq: int,
        *,
        type_prefixes: tuple[str, ...],
        types_containing: tuple[str, ...] = (),
        contains: tuple[bytes, ...] = (),
    ) -> Iterator[StoredRow]:
        """Rows ``after_seq < seq <= upto_seq`` whose type starts with one of
        ``type_prefixes``, or whose type starts with one of ``types_containing`` and whose
        payload contains one of ``contains`` (a replay's pre-filter; rows are not
        verified here). Backends may push the filter down; this one pages in Python."""
        for row in self.iter_rows(after_seq):
            if row.seq > upto_seq:
                return
            if row.type.startswith(type_prefixes) or (
                row.type.startswith(types_containing) and any(c in row.data for c in contains)
            ):
                yield row

    def read_checked(self, after_seq: int, limit: int, prev_hash: str) -> list[RecordedEvent]:
        """Like :meth:`read`, checking that each event links to the one before it
        (``prev_hash`` for the first) and matches its own hash.

        Raises:
            ChainError: the first event that does not.
        """
        events: list[RecordedEvent] = []
        expected = after_seq + 1
        for row in self.read_rows(after_seq, limit):
            if row.seq != expected:
                raise ChainError(expected, f"missing: found seq {row.seq} instead (events removed)")
            if row.prev_hash != prev_hash:
                raise ChainError(
                    row.seq, "does not link to the event before it (removed, reordered or re-hashed)"
                )
            if row.computed_hash() != row.hash:
                raise ChainError(row.seq, "content does not match its hash (altered)")
            events.append(row.to_event())
            prev_hash = row.hash
            expected += 1
        return events

    def verify(self) -> VerifyReport:
        """Recompute the hash chain from genesis and report the first break (a recorded
        time going backwards is one too: "the state at time T" relies on it)."""
        expected_seq = 1
        prev = GENESIS_HASH
        at = 0
        count = 0
        for row in self.iter_rows():
            if row.seq != expected_seq:
                return VerifyReport(
                    count, expected_seq - 1, prev, expected_seq,
                    f"missing: expected seq {expected_seq}, found {row.seq} (events removed)",
                )
            if row.prev_hash != prev:
                return VerifyReport(
                    count, row.seq - 1, prev, row.seq,
                    "prev_hash does not match the previous event's hash (removed or reordered)",
                )
            computed = row.computed_hash()
            if computed != row.hash:
                return VerifyReport(
                    count, row.seq - 1, prev, row.seq,
                    "content does not match its hash (altered)",
                )
            if row.recorded_at_us < at:
                return VerifyReport(
                    count, row.seq - 1, prev, row.seq,
                    "recorded before the event before it (times go backwards)",
                )
            prev, at = row.hash, row.recorded_at_us
            expected_seq += 1
            count += 1
        return VerifyReport(count, expected_seq - 1, prev)

    def check_chain(self) -> None:
        """Raise :class:`ChainError` when :meth:`verify` finds a break."""
        report = self.verify()
        if report.first_bad is not None:
            raise ChainError(report.first_bad, report.reason or "broken")


_SELECT: Final = f"SELECT {COLUMNS} FROM events "
#: SQLite's primary result codes for "database or disk is full" and "the database
#: file is locked" (sqlite3.h).
_SQLITE_FULL: Final = 13
_SQLITE_BUSY: Final = 5
_INSERT: Final = f"INSERT INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


class _Busy(EventLogError):
    """Another connection holds the write lock (its busy timeout ran out)."""


class SQLiteEventStore(EventStore):
    """The embedded default: one SQLite file in WAL mode.

    Args:
        path: the database file, or ``":memory:"`` for a private in-memory log (tests).
        synchronous: SQLite's ``synchronous`` pragma; ``"FULL"`` (the default) makes a
            commit durable across power loss, ``"NORMAL"`` only across process crashes.
        read_only: open for reading only (``tailledger log verify`` on a live server).
        immutable: with ``read_only``, also promise SQLite that nobody writes the file
            (no WAL, no locks): nothing at all is created next to it. Only for a log
            that no server is writing (the replay tool checks for a WAL file first).
    """

    def __init__(
        self, path: str | Path, *, synchronous: str = "FULL", read_only: bool = False,
        immutable: bool = False,
    ) -> None:
        self._path = str(path)
        self._immutable = immutable and read_only
        self._memory = self._path == ":memory:"
        self._read_only = read_only
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._writer = self._connect()
            if not read_only:
                prepare(self._writer, self._path, synchronous=synchronous)
        except sqlite3.Error as exc:
            raise EventLogError(f"cannot open the event log at {self._path}: {exc}") from exc
        # Readers use their own connection so they never wait for a writer (WAL).
        # In-memory databases are private to one connection, so they share the writer's.
        self._reader = self._writer if self._memory else self._connect()
        self._reader_lock = self._lock if self._memory else threading.Lock()
        self._select = _SELECT
        if read_only:
            # A log written before the envelope grew its columns, opened without
            # migrating it (read-only): those events have neither field.
            columns = {str(r[1]) for r in self._reader.execute("PRAGMA table_info(events)")}
            if columns and "correlation_id" not in columns:
                self._select = _SELECT.replace("correlation_id, reason", "'' AS correlation_id, '' AS reason")

    def _connect(self) -> sqlite3.Connection:
        return connect(self._path, read_only=self._read_only, immutable=self._immutable)

    @property
    def path(self) -> str:
        return self._path

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the event store is closed")

    def append_batch(self, requests: Sequence[AppendRequest], now_us: int) -> list[AppendResult]:
        self._check_writable()
        with self._lock:
            return self._append(requests, now_us)

    def try_append_batch(self, requests: Sequence[AppendRequest], now_us: int) -> list[AppendResult] | None:
        self._check_writable()
        if not self._lock.acquire(blocking=False):
            return None  # another thread is writing (or, in memory, reading)
        try:
            conn = self._writer
            try:
                conn.execute("PRAGMA busy_timeout=0")  # another process's lock: SQLITE_BUSY at once
            except sqlite3.Error:
                return None  # (the writer's thread meets the failure and reports it)
            try:
                return self._append(requests, now_us)
            except _Busy:
                return None
            finally:
                # Not raised: the append's outcome stands (a connection this broken fails
                # the next append anyway).
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        finally:
            self._lock.release()

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise EventLogError("the event store was opened read-only")

    def _append(self, requests: Sequence[AppendRequest], now_us: int) -> list[AppendResult]:
        """The append, under the lock: one transaction, rolled back on any failure
        (:class:`_Busy` when another connection holds the write lock)."""
        conn = self._writer
        try:
            self._rollback(conn)  # a transaction left open by an earlier failure
            conn.execute("BEGIN IMMEDIATE")
            results, rows = stage_append(requests, self._head(conn), now_us)
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException as exc:
            self._rollback(conn)
            if isinstance(exc, sqlite3.Error):
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF == _SQLITE_BUSY:
                    raise _Busy(f"append failed: {exc}") from exc
                raise self._append_error(exc) from exc
            raise
        return results

    def insert_rows(self, rows: Sequence[StoredRow]) -> None:
        """Write rows exactly as given (an import): each must extend the chain at the head.

        Raises:
            ChainError: a row does not follow the head (seq, prev_hash or time).
            EventLogError: the store is read-only or the commit failed.
        """
        self._check_writable()
        with self._lock:
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT, [row_params(r) for r in following(rows, self._head(conn))])
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise EventLogError(f"import failed: {exc}") from exc
                raise

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        """Roll back a failed append, if SQLite has not done so itself.

        SQLite rolls back on its own after some errors (a full disk during the commit).
        A rollback that fails too must not hide the first error; the next append calls
        this again before it begins, so one failure cannot wedge the writer.
        """
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _append_error(self, exc: sqlite3.Error) -> EventLogError:
        # The primary result code is the low byte of the extended one (sqlite3.h).
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF == _SQLITE_FULL:
            return StorageFullError(
                f"the disk is full: cannot append to the event log at {self._path} until space "
                "is freed"
            )
        return EventLogError(f"append failed: {exc}")

    @staticmethod
    def _head(conn: sqlite3.Connection) -> Head:
        row = conn.execute(
            "SELECT seq, hash, recorded_at_us FROM events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return Head(0, GENESIS_HASH, 0)
        return Head(int(row[0]), str(row[1]), int(row[2]))

    def read_rows(self, after_seq: int = 0, limit: int = 1000) -> list[StoredRow]:
        self._check_open()
        try:
            with self._reader_lock:
                cur = self._reader.execute(
                    self._select + "WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
                )
                fetched = cur.fetchall()
        except sqlite3.Error as exc:
            raise EventLogError(f"read failed: {exc}") from exc
        return [stored_row(r) for r in fetched]

    def scan(
        self,
        after_seq: int,
        upto_seq: int,
        *,
        type_prefixes: tuple[str, ...],
        types_containing: tuple[str, ...] = (),
        contains: tuple[bytes, ...] = (),
    ) -> Iterator[StoredRow]:
        # The filter runs inside SQLite: a replay of one pair over a million events
        # reads only the rows that can matter to it.
        found = scan_where(
            type_prefixes, types_containing, contains,
            starts=lambda p: f"substr(type, 1, {len(p)}) = ?", has="instr(data, ?) > 0",
        )
        if found is None:
            return
        where, args = found

        def page(after: int) -> list[tuple[object, ...]]:
            self._check_open()
            try:
                with self._reader_lock:
                    return self._reader.execute(
                        self._select + f"WHERE seq > ? AND seq <= ? AND ({where}) ORDER BY seq LIMIT 2000",
                        (after, upto_seq, *args),
                    ).fetchall()
            except sqlite3.Error as exc:
                raise EventLogError(f"read failed: {exc}") from exc

        yield from paged(page, after_seq)

    def head(self) -> Head:
        self._check_open()
        try:
            with self._reader_lock:
                return self._head(self._reader)
        except sqlite3.Error as exc:
            raise EventLogError(f"read failed: {exc}") from exc

    def seq_at_time(self, at_us: int) -> int:
        # Recorded times never go backwards along the log (append_batch records the
        # later of now and the head's time; an import refuses a row that goes back and
        # verify names one), so the answer bisects the primary key: the number of events
        # recorded at or before at_us is the seq of the last of them. No index on the
        # time, which every append would pay for.
        self._check_open()
        select = "SELECT recorded_at_us FROM events WHERE seq = ?"
        with self._reader_lock:
            conn = self._reader

            def recorded_at(seq: int) -> int:
                row = conn.execute(select, (seq,)).fetchone()
                if row is None:
                    raise ChainError(seq, "missing (events removed)")
                return int(row[0])

            try:
                return bisect.bisect_right(range(1, self._head(conn).seq + 1), at_us, key=recorded_at)
            except sqlite3.Error as exc:
                raise EventLogError(f"read failed: {exc}") from exc

    def add_signed_checkpoint(self, checkpoint: SignedCheckpoint) -> None:
        self._check_writable()
        c = checkpoint
        try:
            with self._lock:
                self._writer.execute(
                    f"INSERT INTO signed_checkpoints ({CHECKPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (c.n, c.seq, c.hash, c.signed_at_us, c.prev, c.public_key, c.signature),
                )
        except sqlite3.Error as exc:
            raise EventLogError(f"cannot store signed checkpoint {c.n}: {exc}") from exc

    def signed_checkpoints(self, after_n: int = 0) -> list[SignedCheckpoint]:
        self._check_open()
        try:
            with self._reader_lock:
                rows = self._reader.execute(
                    f"SELECT {CHECKPOINT_COLUMNS} FROM signed_checkpoints WHERE n > ? ORDER BY n",
                    (after_n,),
                ).fetchall()
        except sqlite3.Error as exc:
            if "no such table" in str(exc):  # a read-only look at a log never migrated
                return []
            raise EventLogError(f"read failed: {exc}") from exc
        return [checkpoint_from_row(r) for r in rows]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._writer.close()
            if self._reader is not self._writer:
                self._reader.close()
