"""The tamper-evident event log: the single source of truth of tailledger.

Everything that changes the tailnet (users, keys, nodes, routes, policy) is an event
appended here; users, nodes and netmaps are projections folded from it (see the
``projections`` package). The log is append-only and hash-chained (see
:mod:`eventlog.envelope`), stored behind one small interface (:class:`EventStore`)
whose SQLite implementation is the embedded default.

Layering: ``eventlog`` imports nothing else of ours; everything else may import it.
"""

from .cause import MAX_REASON, Cause, caused_by, check_reason, current_cause, new_correlation_id
from .codec import decode_event, encode_event
from .envelope import (
    GENESIS_HASH,
    Actor,
    ActorKind,
    RecordedEvent,
    chain_hash,
    from_micros,
    to_micros,
)
from .errors import (
    ChainError,
    EventLogError,
    ExpectedSequenceConflict,
    StorageFullError,
    StoreClosedError,
    StoreUnavailableError,
    UnknownEventError,
)
from .events import EVENT_TYPES, AnyEvent, Event
from .log import Clock, EventLog
from .rows import AppendRequest, Head, StoredRow
from .store import EventStore, SQLiteEventStore, VerifyReport
from .upcast import register_upcaster, upcast

__all__ = [
    "EVENT_TYPES",
    "GENESIS_HASH",
    "MAX_REASON",
    "Actor",
    "ActorKind",
    "AnyEvent",
    "AppendRequest",
    "Cause",
    "ChainError",
    "Clock",
    "Event",
    "EventLog",
    "EventLogError",
    "EventStore",
    "ExpectedSequenceConflict",
    "Head",
    "RecordedEvent",
    "SQLiteEventStore",
    "StorageFullError",
    "StoreClosedError",
    "StoreUnavailableError",
    "StoredRow",
    "UnknownEventError",
    "VerifyReport",
    "caused_by",
    "chain_hash",
    "check_reason",
    "current_cause",
    "decode_event",
    "encode_event",
    "from_micros",
    "new_correlation_id",
    "register_upcaster",
    "to_micros",
    "upcast",
]
