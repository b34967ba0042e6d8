"""Side tables: compactable state kept in the log's database, beside the log.

Two kinds of facts belong to the server but not to the log:

* **presence** (``presence``): when each node was last seen and whether it was online.
  It changes all the time and decides nothing about reachability, so it is not an
  event (see the README's design notes); it is kept here so that ``last_seen``
  survives a restart (the ephemeral-node clean-up counts from it);
* **pending interactive registrations** (``pending_registrations``): a machine that
  asked to join without a key, waiting for an admin. Anyone who can reach the control
  port can ask, so a request is not an event: it becomes one only when an admin
  approves it (``node.registered``) or rejects it (``node.registration_rejected``).
  Until then it is a bounded, expiring row here, so that a restart (or another
  replica on the same database) still finds it.

Rows here are replaced and deleted (last value wins); they are not hash-chained and no
fold reads them. They share the log's SQLite file so that one backup holds everything,
but they are written through their own connection with ``synchronous=NORMAL`` (durable
across a crash of the process, not necessarily of the machine: losing the last second
of presence costs nothing). Like :mod:`eventlog.store`, this module is synchronous; the
trio layers call it through ``trio.to_thread.run_sync`` with a limiter of one.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Final, TypeVar

import msgspec

from .envelope import from_micros, to_micros
from .errors import EventLogError, StoreClosedError
from .migrations import connect, prepare

__all__ = [
    "Admission",
    "PendingRegistration",
    "PresenceRecord",
    "SideTables",
    "SweepResult",
]


class PendingRegistration(msgspec.Struct, frozen=True, kw_only=True):
    """What is kept of an interactive registration request: what an admin needs to
    decide, nothing more (the request's full Hostinfo is never stored).

    ``rejected_reason`` is ``None`` while the request waits; a rejected request stays
    until it expires, so that the client, asking again, hears why.
    """

    auth_id: str
    machine_key: str  # hex, as in the log
    node_key: str  # hex, as in the log
    hostname: str
    os: str
    request_tags: tuple[str, ...]
    ephemeral: bool
    source: str  # the client's address, as the server saw it
    created: datetime
    expires: datetime
    rejected_reason: str | None = None
    rejected_by: str | None = None

    @property
    def rejected(self) -> bool:
        return self.rejected_reason is not None


class Admission(Enum):
    """The answer to :meth:`SideTables.add_pending`."""

    ADMITTED = "admitted"
    GLOBAL_CAP = "global"  # too many pending requests in all
    SOURCE_CAP = "source"  # too many pending requests from this address


@dataclass(frozen=True, slots=True)
class SweepResult:
    """The outcome of :meth:`SideTables.sweep_pending`.

    Attributes:
        expired: rows deleted because they expired.
        remaining: rows left (waiting or rejected).
        next_expiry: the earliest expiry among the rows left (``None``: none left).
        watched: for each watched id still present, its rejection reason (``None``
            while it waits); ids that are gone are absent.
    """

    expired: int
    remaining: int
    next_expiry: datetime | None
    watched: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class PresenceRecord:
    """One node's persisted presence (last value wins)."""

    node_id: int
    last_seen: datetime
    online: bool


T = TypeVar("T")

_PENDING_COLUMNS: Final = (
    "auth_id, machine_key, node_key, hostname, os, request_tags, ephemeral, source, "
    "created_us, expires_us, rejected_reason, rejected_by"
)
_tags_encoder: Final = msgspec.json.Encoder()
_tags_decoder: Final = msgspec.json.Decoder(tuple[str, ...])

_PendingRow = tuple[str, str, str, str, str, str, int, str, int, int, str | None, str | None]


def _pending_from_row(row: _PendingRow) -> PendingRegistration:
    return PendingRegistration(
        auth_id=row[0], machine_key=row[1], node_key=row[2], hostname=row[3], os=row[4],
        request_tags=_tags_decoder.decode(row[5]), ephemeral=bool(row[6]), source=row[7],
        created=from_micros(row[8]), expires=from_micros(row[9]),
        rejected_reason=row[10], rejected_by=row[11],
    )


class SideTables:
    """The side tables of one log database.

    Args:
        path: the log's database file (``":memory:"`` gives a private in-memory
            database, for tests and for servers without a data directory).
        synchronous: SQLite's ``synchronous`` pragma for this connection.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        self._path = str(path)
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._conn = connect(self._path)
            prepare(self._conn, self._path, synchronous=synchronous)
        except sqlite3.Error as exc:
            raise EventLogError(f"cannot open the side tables at {self._path}: {exc}") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._conn.close()

    def _run(self, what: str, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """Run ``fn(conn)`` under the lock; a write in one ``BEGIN IMMEDIATE`` transaction
        (it takes SQLite's write lock first, so checks and writes of two replicas never
        interleave)."""
        if self._closed:
            raise StoreClosedError("the side tables are closed")
        with self._lock:
            conn = self._conn
            try:
                if not write:
                    return fn(conn)
                conn.execute("BEGIN IMMEDIATE")
                result = fn(conn)
                conn.execute("COMMIT")
                return result
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise EventLogError(f"{what} failed: {exc}") from exc
                raise

    # -- pending interactive registrations ----------------------------------------------

    def add_pending(
        self, reg: PendingRegistration, *, max_total: int, max_per_source: int
    ) -> Admission:
        """Store a new request unless a cap refuses it.

        In one transaction: expired rows go, an earlier request of the same machine is
        replaced (it does not count against the caps), then the caps are checked.
        """
        now_us = to_micros(reg.created)

        def work(conn: sqlite3.Connection) -> Admission:
            conn.execute("DELETE FROM pending_registrations WHERE expires_us <= ?", (now_us,))
            conn.execute("DELETE FROM pending_registrations WHERE machine_key = ?", (reg.machine_key,))
            (total,) = conn.execute("SELECT count(*) FROM pending_registrations").fetchone()
            if total >= max_total:
                return Admission.GLOBAL_CAP
            (same,) = conn.execute(
                "SELECT count(*) FROM pending_registrations WHERE source = ?", (reg.source,)
            ).fetchone()
            if same >= max_per_source:
                return Admission.SOURCE_CAP
            conn.execute(
                f"INSERT INTO pending_registrations ({_PENDING_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    reg.auth_id, reg.machine_key, reg.node_key, reg.hostname, reg.os,
                    _tags_encoder.encode(reg.request_tags).decode(), int(reg.ephemeral),
                    reg.source, now_us, to_micros(reg.expires), reg.rejected_reason,
                    reg.rejected_by,
                ),
            )
            return Admission.ADMITTED

        return self._run("storing a pending registration", work)

    def get_pending(self, auth_id: str) -> PendingRegistration | None:
        """The request ``auth_id`` (expired or not), or ``None``."""

        def work(conn: sqlite3.Connection) -> PendingRegistration | None:
            row = conn.execute(
                f"SELECT {_PENDING_COLUMNS} FROM pending_registrations WHERE auth_id = ?",
                (auth_id,),
            ).fetchone()
            return None if row is None else _pending_from_row(row)

        return self._run("reading a pending registration", work, write=False)

    def list_pending(self, now: datetime) -> list[PendingRegistration]:
        """Every request that has not expired by ``now``, oldest first."""

        def work(conn: sqlite3.Connection) -> list[PendingRegistration]:
            rows = conn.execute(
                f"SELECT {_PENDING_COLUMNS} FROM pending_registrations WHERE expires_us > ? "
                "ORDER BY created_us, auth_id",
                (to_micros(now),),
            ).fetchall()
            return [_pending_from_row(r) for r in rows]

        return self._run("listing pending registrations", work, write=False)

    def count_pending(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute("SELECT count(*) FROM pending_registrations").fetchone()
            return int(n)

        return self._run("counting pending registrations", work, write=False)

    def reject_pending(self, auth_id: str, *, reason: str, by: str) -> bool:
        """Mark a waiting request rejected; ``False`` if it is gone or already rejected."""

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE pending_registrations SET rejected_reason = ?, rejected_by = ? "
                "WHERE auth_id = ? AND rejected_reason IS NULL",
                (reason, by, auth_id),
            )
            return cur.rowcount > 0

        return self._run("rejecting a pending registration", work)

    def delete_pending(self, auth_id: str) -> bool:
        """Forget a request (it was approved); ``False`` if it was already gone."""

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM pending_registrations WHERE auth_id = ?", (auth_id,))
            return cur.rowcount > 0

        return self._run("deleting a pending registration", work)

    def sweep_pending(self, now: datetime, watch: Collection[str] = ()) -> SweepResult:
        """Delete the requests expired by ``now``; report the next expiry and the state
        of the ``watch`` ids (the requests this server's clients wait on)."""
        now_us = to_micros(now)

        def work(conn: sqlite3.Connection) -> SweepResult:
            expired = conn.execute(
                "DELETE FROM pending_registrations WHERE expires_us <= ?", (now_us,)
            ).rowcount
            remaining, nxt = conn.execute(
                "SELECT count(*), min(expires_us) FROM pending_registrations"
            ).fetchone()
            watched: dict[str, str | None] = {}
            ids = list(watch)
            for i in range(0, len(ids), 500):  # SQLite's parameter limit
                chunk = ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for auth_id, reason in conn.execute(
                    "SELECT auth_id, rejected_reason FROM pending_registrations "
                    f"WHERE auth_id IN ({marks})",
                    chunk,
                ):
                    watched[auth_id] = reason
            return SweepResult(
                expired, int(remaining), None if nxt is None else from_micros(nxt), watched
            )

        return self._run("expiring pending registrations", work)

    # -- presence ---------------------------------------------------------------------

    def load_presence(self) -> list[PresenceRecord]:
        def work(conn: sqlite3.Connection) -> list[PresenceRecord]:
            rows = conn.execute("SELECT node_id, last_seen_us, online FROM presence").fetchall()
            return [PresenceRecord(int(n), from_micros(int(t)), bool(o)) for n, t, o in rows]

        return self._run("loading presence", work, write=False)

    def save_presence(self, records: Iterable[PresenceRecord], forget: Iterable[int] = ()) -> None:
        """Write ``records`` (replacing each node's row) and delete the ``forget`` rows."""
        rows = [(r.node_id, to_micros(r.last_seen), int(r.online)) for r in records]
        gone = [(n,) for n in forget]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO presence (node_id, last_seen_us, online) VALUES (?, ?, ?) "
                "ON CONFLICT (node_id) DO UPDATE SET "
                "last_seen_us = excluded.last_seen_us, online = excluded.online",
                rows,
            )
            conn.executemany("DELETE FROM presence WHERE node_id = ?", gone)

        self._run("saving presence", work)

