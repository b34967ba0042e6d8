"""Reading a server's event log from the outside, as an auditor would.

The tests of the CLI and the API check what a running (or
stopped) server recorded by opening its ``ledger.db`` read-only: that never takes a
write lock or creates WAL files, so the server is not disturbed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eventlog import RecordedEvent, SQLiteEventStore

__all__ = ["log_head", "reading", "recorded"]


@contextmanager
def reading(data: Path) -> Iterator[SQLiteEventStore]:
    """The log in the data directory ``data``, open read-only for the block."""
    store = SQLiteEventStore(data / "ledger.db", read_only=True)
    try:
        yield store
    finally:
        store.close()


def log_head(data: Path) -> int:
    """The sequence number of the last event in ``data``'s log (0: none)."""
    with reading(data) as store:
        return store.head().seq


def recorded(data: Path, after: int = 0) -> list[RecordedEvent]:
    """The events after ``after`` (one read: at most the store's default batch)."""
    with reading(data) as store:
        return store.read(after)
