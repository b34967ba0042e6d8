"""The log's rows, apart from SQL: what both backends (:mod:`eventlog.store`,
:mod:`eventlog.pgstore`) share.

An :class:`AppendRequest` becomes rows that extend the hash chain at the :class:`Head`
(:func:`stage_append`); rows written as given (an import) must follow the head
(:func:`following`); a fetched row is read back as a :class:`StoredRow`
(:func:`stored_row`), and a replay's pre-filter is one ``WHERE`` clause
(:func:`scan_where`) paged through the log (:func:`paged`). Each backend keeps only its
SQL, its connections and its transactions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from .codec import decode_event, encode_event
from .envelope import Actor, ActorKind, RecordedEvent, chain_hash, from_micros, header_hash
from .errors import ChainError, ExpectedSequenceConflict
from .events import AnyEvent
from .signing import SignedCheckpoint

__all__ = [
    "CHECKPOINT_COLUMNS",
    "COLUMNS",
    "AppendRequest",
    "AppendResult",
    "Head",
    "RowParams",
    "StoredRow",
    "checkpoint_from_row",
    "following",
    "paged",
    "row_params",
    "scan_where",
    "stage_append",
    "stored_row",
]

#: The ``events`` table's columns, in the order of :class:`StoredRow`'s fields.
COLUMNS: Final = (
    "seq, recorded_at_us, actor_kind, actor_id, type, schema, data, prev_hash, hash, "
    "correlation_id, reason"
)
#: The ``signed_checkpoints`` table's columns, as :func:`checkpoint_from_row` reads them.
CHECKPOINT_COLUMNS: Final = "n, seq, hash, signed_at_us, prev, public_key, signature"


class AppendRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Events to append atomically, all caused by ``actor``.

    ``expected_seq`` is the head the caller decided against; ``None`` appends wherever the
    head is (for events whose validity does not depend on state, such as a policy set
    from a file that was already validated).
    """

    events: tuple[AnyEvent, ...]
    actor: Actor
    expected_seq: int | None = None
    correlation_id: str = ""  # shared by the events of one request (see eventlog.cause)
    reason: str = ""  # the operator's reason, stored with each event


@dataclass(frozen=True, slots=True)
class Head:
    """The newest event's sequence number and chain hash (0 and genesis when empty)."""

    seq: int
    hash: str
    recorded_at_us: int


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A row exactly as stored, for verification and export (no decoding)."""

    seq: int
    recorded_at_us: int
    actor_kind: str
    actor_id: str
    type: str
    schema: int
    data: bytes
    prev_hash: str
    hash: str
    correlation_id: str = ""
    reason: str = ""

    def to_event(self) -> RecordedEvent:
        return RecordedEvent(
            seq=self.seq,
            recorded_at=from_micros(self.recorded_at_us),
            actor=Actor(kind=ActorKind(self.actor_kind), id=self.actor_id),
            type=self.type,
            schema=self.schema,
            event=decode_event(self.type, self.schema, self.data),
            prev_hash=self.prev_hash,
            hash=self.hash,
            correlation_id=self.correlation_id,
            reason=self.reason,
        )

    def computed_hash(self) -> str:
        """This row's chain hash recomputed from its stored content."""
        return chain_hash(
            self.prev_hash,
            seq=self.seq,
            recorded_at_us=self.recorded_at_us,
            actor_kind=self.actor_kind,
            actor_id=self.actor_id,
            type=self.type,
            schema=self.schema,
            data=self.data,
            correlation_id=self.correlation_id,
            reason=self.reason,
        )


AppendResult = tuple[RecordedEvent, ...] | ExpectedSequenceConflict
#: One row's values for an ``INSERT`` of :data:`COLUMNS`.
RowParams = tuple[int, int, str, str, str, int, bytes, str, str, str, str]


def stage_append(
    requests: Sequence[AppendRequest], head: Head, now_us: int
) -> tuple[list[AppendResult], list[RowParams]]:
    """The outcome of appending ``requests`` after ``head``, and the rows to insert.

    Each request's ``expected_seq`` is checked against the head including the earlier
    requests; a refused one gets its conflict and adds no row. Every event is recorded at
    ``max(now_us, head.recorded_at_us)``, so recorded times never go backwards.
    """
    results: list[AppendResult] = []
    rows: list[RowParams] = []
    seq, prev, at = head.seq, head.hash, max(now_us, head.recorded_at_us)
    at_dt = from_micros(at)
    for req in requests:
        if req.expected_seq is not None and req.expected_seq != seq:
            results.append(ExpectedSequenceConflict(req.expected_seq, seq))
            continue
        recorded: list[RecordedEvent] = []
        actor, corr, reason = req.actor, req.correlation_id, req.reason
        kind, actor_id = actor.kind.value, actor.id
        cause = (corr, reason) if corr or reason else ()  # (see chain_hash)
        for event in req.events:
            seq += 1
            data = encode_event(event)
            type_, schema = event.type_name(), event.SCHEMA
            h = header_hash(prev, (seq, at, kind, actor_id, type_, schema, *cause), data)
            rows.append((seq, at, kind, actor_id, type_, schema, data, prev, h, corr, reason))
            recorded.append(
                RecordedEvent(
                    seq=seq, recorded_at=at_dt, actor=actor, type=type_, schema=schema, event=event,
                    prev_hash=prev, hash=h, correlation_id=corr, reason=reason,
                )
            )
            prev = h
        results.append(tuple(recorded))
    return results, rows


def following(rows: Iterable[StoredRow], head: Head) -> Iterator[StoredRow]:
    """``rows`` as they come, each checked to extend the chain from ``head``, recorded
    no earlier than the row before it (a log's times never go backwards).

    Raises:
        ChainError: at the first row that does not follow (seq, prev_hash or time).
    """
    seq, prev, at = head.seq, head.hash, head.recorded_at_us
    for row in rows:
        if row.seq != seq + 1 or row.prev_hash != prev:
            raise ChainError(row.seq, f"does not follow the head (seq {seq})")
        if row.recorded_at_us < at:
            raise ChainError(row.seq, f"recorded before the event before it (seq {seq})")
        seq, prev, at = row.seq, row.hash, row.recorded_at_us
        yield row


def row_params(r: StoredRow) -> RowParams:
    """``r``'s values for an ``INSERT`` of :data:`COLUMNS`."""
    return (
        r.seq, r.recorded_at_us, r.actor_kind, r.actor_id, r.type, r.schema,
        r.data, r.prev_hash, r.hash, r.correlation_id, r.reason,
    )


def stored_row(r: Sequence[object]) -> StoredRow:
    """A fetched row of :data:`COLUMNS`.

    Rows normally come back with their declared types (the payload as bytes) and are
    taken as they are; only the others (a payload stored as TEXT in SQLite, or a buffer)
    take the converting path.
    """
    if type(r[6]) is bytes:
        return StoredRow(*r)  # type: ignore[arg-type]
    raw = r[6]
    data = bytes(raw) if isinstance(raw, bytes | bytearray | memoryview) else str(raw).encode()
    return StoredRow(
        int(str(r[0])), int(str(r[1])), str(r[2]), str(r[3]), str(r[4]), int(str(r[5])),
        data, str(r[7]), str(r[8]), str(r[9]), str(r[10]),
    )


def checkpoint_from_row(r: Sequence[object]) -> SignedCheckpoint:
    """A fetched row of :data:`CHECKPOINT_COLUMNS`."""
    return SignedCheckpoint(
        n=int(str(r[0])), seq=int(str(r[1])), hash=str(r[2]), signed_at_us=int(str(r[3])),
        prev=str(r[4]), public_key=str(r[5]), signature=str(r[6]),
    )


def scan_where(
    type_prefixes: tuple[str, ...],
    types_containing: tuple[str, ...],
    contains: tuple[bytes, ...],
    *,
    starts: Callable[[str], str],
    has: str,
) -> tuple[str, list[object]] | None:
    """The ``WHERE`` condition and its arguments of :meth:`EventStore.scan`'s filter, or
    ``None`` when it can match nothing.

    ``starts(prefix)`` is the backend's condition "type starts with the parameter"
    (``prefix`` only for its length) and ``has`` its condition "the payload contains the
    parameter".
    """
    wanted = [starts(p) for p in type_prefixes]
    args: list[object] = list(type_prefixes)
    if types_containing and contains:
        kinds = " OR ".join(starts(p) for p in types_containing)
        found = " OR ".join(has for _ in contains)
        wanted.append(f"(({kinds}) AND ({found}))")
        args += [*types_containing, *contains]
    if not wanted:
        return None
    return " OR ".join(wanted), args


def paged(fetch: Callable[[int], Sequence[Sequence[object]]], after_seq: int) -> Iterator[StoredRow]:
    """The rows of successive pages ``fetch(after)`` (fetched rows of :data:`COLUMNS`,
    ordered by seq), each page starting after the last row of the one before, until one
    is empty."""
    while True:
        fetched = fetch(after_seq)
        if not fetched:
            return
        for r in fetched:
            yield stored_row(r)
        after_seq = int(str(fetched[-1][0]))
