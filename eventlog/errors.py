"""Errors raised by the event log.

Every driver error (sqlite3, and later psycopg) is translated into one of these at the
store boundary, so callers above the log never see a backend's exception types.
"""

from __future__ import annotations

__all__ = [
    "ChainError",
    "EventLogError",
    "ExpectedSequenceConflict",
    "StorageFullError",
    "StoreClosedError",
    "UnknownEventError",
]


class EventLogError(Exception):
    """Base class of every error the event log raises."""


class ExpectedSequenceConflict(EventLogError):
    """An append named an expected head sequence that is no longer the head.

    This is optimistic concurrency: the caller decided its events against a state folded
    up to ``expected`` but another writer appended in between. The caller catches up and
    decides again.
    """

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"expected the log head at seq {expected}, but it is at {actual}")
        self.expected = expected
        self.actual = actual


class StorageFullError(EventLogError):
    """The disk holding the log is full: the append was rolled back, nothing was appended.

    The store stays usable: reads go on, and appends succeed again once space is freed,
    without reopening anything.
    """


class StoreUnavailableError(EventLogError):
    """The store's database cannot be reached now (a server-based backend retries with
    back-off; readers such as :meth:`EventLog.tail` wait and try again)."""


class StoreClosedError(EventLogError):
    """The store was used after ``close()``."""


class UnknownEventError(EventLogError):
    """A stored row has a type or schema version this build cannot decode."""


class ChainError(EventLogError):
    """The hash chain does not verify: an event was altered, removed or reordered."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"event {seq}: {reason}")
        self.seq = seq
        self.reason = reason
