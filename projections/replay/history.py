"""Reading the past: a verified, read-only walk of the log with verified snapshots.

:class:`History` wraps an :class:`~eventlog.EventStore` (opened read-only by the CLI,
or an in-memory store loaded from a verified export) and answers "the state after event
N" for any N. It never writes to the store.

Theory of operation
-------------------
*Points.* A point in the past is a sequence number, or an RFC 3339 time meaning "after
the last event recorded at or before it" (:meth:`History.point`). A :class:`Point`
also carries the instant at which time-dependent facts (key expiry) are judged: the
given time, or for a sequence number the time that event was recorded. So the same
question always gets the same answer, whenever it is asked.

*Folding with proof.* Every row folded is checked against the chain: its ``seq``
follows the previous one, its ``prev_hash`` is the previous row's hash, and its own
hash is recomputed from the stored bytes (:func:`~eventlog.chain_hash`). A mismatch
raises :class:`~eventlog.ChainError` naming the sequence number, so no answer is ever
built on an event that does not verify.

*Snapshots.* A fold from zero of a long log is slow, so folds leave snapshots behind
every ``snapshot_every`` events in a :class:`SnapshotStore` (in memory, or the CLI's
cache file outside the data directory: replay writes nothing next to the log). A
snapshot is ``(seq, event_hash, content_sha256, blob)``. It is used only when the log
still holds event ``seq`` with hash ``event_hash`` (the chain vouches for everything
before it, and the fold from the snapshot checks every link after it) and the blob still
hashes to ``content_sha256``; otherwise it is ignored and the fold starts from an
earlier one or from zero. The property tests hold "state from a snapshot at N" equal to
"fold from zero to N".

Trust: a snapshot proves *where* it sits in the chain, not who wrote it. It is as
trustworthy as the cache it was read from, which is why the CLI keeps the cache in the
auditor's own account, never in the data directory; ``--no-cache`` answers from a
fold in which every row is verified. Signed checkpoints, once the log has them, are
the natural anchors for snapshots.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from eventlog import (
    ChainError,
    EventStore,
    RecordedEvent,
    StoredRow,
    chain_hash,
    from_micros,
    to_micros,
)
from eventlog.envelope import GENESIS_HASH

from ..checkpoint import decode_state, encode_state
from ..fold import apply
from ..state import TailnetState

__all__ = [
    "History",
    "MemorySnapshots",
    "Point",
    "ReplayError",
    "Snapshot",
    "SnapshotStore",
    "parse_time",
]


class ReplayError(Exception):
    """A question the history cannot answer (bad point, unknown node): exit status 1."""


@dataclass(frozen=True, slots=True)
class Point:
    """A position in the log: after event ``seq``, judged at instant ``now``."""

    seq: int
    now: datetime


@dataclass(frozen=True, slots=True)
class Snapshot:
    seq: int
    event_hash: str
    content_sha256: str
    blob: bytes
    policy_seq: int = 0  # the policy.set event in force (0: none)


class SnapshotStore(Protocol):
    """Where folds leave snapshots (a cache: losing it costs time, never answers)."""

    def seqs(self) -> list[int]:
        """Sequence numbers of the stored snapshots, ascending."""
        ...

    def get(self, seq: int) -> Snapshot | None: ...

    def put(self, snapshot: Snapshot) -> None: ...


class MemorySnapshots:
    """Snapshots held in this process only."""

    def __init__(self) -> None:
        self._by_seq: dict[int, Snapshot] = {}

    def seqs(self) -> list[int]:
        return sorted(self._by_seq)

    def get(self, seq: int) -> Snapshot | None:
        return self._by_seq.get(seq)

    def put(self, snapshot: Snapshot) -> None:
        self._by_seq[snapshot.seq] = snapshot


def parse_time(text: str) -> datetime:
    """An RFC 3339 time (``Z`` or an offset; a naive time is refused)."""
    try:
        value = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ReplayError(f"not a sequence number or an RFC 3339 time: {text!r}") from None
    if value.tzinfo is None:
        raise ReplayError(f"the time {text!r} has no time zone (add Z or an offset)")
    return value.astimezone(UTC)


def _check(row: StoredRow, prev: str) -> None:
    if row.prev_hash != prev:
        raise ChainError(row.seq, "prev_hash does not match the previous event's hash")
    computed = chain_hash(
        row.prev_hash, seq=row.seq, recorded_at_us=row.recorded_at_us,
        actor_kind=row.actor_kind, actor_id=row.actor_id, type=row.type,
        schema=row.schema, data=row.data, correlation_id=row.correlation_id, reason=row.reason,
    )
    if computed != row.hash:
        raise ChainError(row.seq, "content does not match its hash (altered)")


class History:
    """The log, read-only, with verified folds and snapshots (see the module docstring).

    Args:
        store: the log (never written).
        snapshots: where to keep snapshots (default: in memory).
        snapshot_every: leave a snapshot after this many folded events.
        progress: called with (events folded, events to fold) during long folds.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        snapshots: SnapshotStore | None = None,
        snapshot_every: int = 20_000,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.store = store
        self.snapshots: SnapshotStore = snapshots if snapshots is not None else MemorySnapshots()
        self.snapshot_every = snapshot_every
        self.progress = progress
        self.head = store.head()
        self._cache: tuple[int, TailnetState] | None = None
        #: state seq -> seq of the policy.set event in force then (for folded states).
        self._policy_seq: dict[int, int] = {0: 0}

    # -- points ----------------------------------------------------------------

    def time_of(self, seq: int) -> datetime:
        """When event ``seq`` was recorded (the epoch for 0)."""
        if seq == 0:
            return from_micros(0)
        rows = self.store.read_rows(seq - 1, 1)
        if not rows or rows[0].seq != seq:
            raise ReplayError(f"the log has no event {seq} (head is {self.head.seq})")
        return from_micros(rows[0].recorded_at_us)

    def point(self, text: str | None) -> Point:
        """Parse ``--at``: a sequence number or an RFC 3339 time; ``None`` is the head."""
        if text is None or text == "head":
            return Point(self.head.seq, self.time_of(self.head.seq))
        text = text.strip()
        if text.isascii() and text.isdigit():
            seq = int(text)
            if seq > self.head.seq:
                raise ReplayError(f"seq {seq} is past the head of the log ({self.head.seq})")
            return Point(seq, self.time_of(seq))
        at = parse_time(text)
        return Point(self.store.seq_at_time(to_micros(at)), at)

    def point_at_seq(self, seq: int) -> Point:
        return Point(seq, self.time_of(seq))

    # -- reading ---------------------------------------------------------------

    def rows(self, after_seq: int, upto_seq: int | None = None) -> Iterator[StoredRow]:
        """Rows ``after_seq < seq <= upto_seq``, each verified against its predecessor."""
        prev = GENESIS_HASH if after_seq == 0 else self._hash_at(after_seq)
        expected = after_seq + 1
        for row in self.store.iter_rows(after_seq):
            if upto_seq is not None and row.seq > upto_seq:
                return
            if row.seq != expected:
                raise ChainError(expected, f"missing: expected seq {expected}, found {row.seq}")
            _check(row, prev)
            prev = row.hash
            expected += 1
            yield row

    def events(self, after_seq: int, upto_seq: int | None = None) -> Iterator[RecordedEvent]:
        for row in self.rows(after_seq, upto_seq):
            yield row.to_event()

    def _hash_at(self, seq: int) -> str:
        rows = self.store.read_rows(seq - 1, 1)
        if not rows or rows[0].seq != seq:
            raise ChainError(seq, "the event is missing")
        return rows[0].hash

    # -- states ----------------------------------------------------------------

    def _snapshot_state(self, snap: Snapshot) -> TailnetState | None:
        rows = self.store.read_rows(snap.seq - 1, 1)
        if not rows or rows[0].seq != snap.seq or rows[0].hash != snap.event_hash:
            return None
        if hashlib.sha256(snap.blob).hexdigest() != snap.content_sha256:
            return None
        try:
            state = decode_state(snap.blob)
        except Exception:  # a damaged cache entry is only a cache miss
            return None
        if state.seq != snap.seq:
            return None
        self._policy_seq[state.seq] = snap.policy_seq
        return state

    def trusted_upto(self, seq: int) -> int:
        """The latest snapshot seq <= ``seq`` whose event the log still holds with the same
        hash: the rows up to it were verified when the snapshot was made (0: none)."""
        seqs = self.snapshots.seqs()
        for candidate in reversed(seqs[: bisect.bisect_right(seqs, seq)]):
            snap = self.snapshots.get(candidate)
            rows = self.store.read_rows(candidate - 1, 1)
            if snap is not None and rows and rows[0].seq == candidate and rows[0].hash == snap.event_hash:
                return candidate
        return 0

    def start_for(self, seq: int) -> TailnetState:
        """The latest verified snapshot at or before ``seq`` (an empty state if none)."""
        if self._cache is not None and self._cache[0] <= seq:
            best = self._cache[1]
        else:
            best = TailnetState()
        seqs = self.snapshots.seqs()
        i = bisect.bisect_right(seqs, seq)
        while i > 0 and seqs[i - 1] > best.seq:
            snap = self.snapshots.get(seqs[i - 1])
            state = self._snapshot_state(snap) if snap is not None else None
            if state is not None:
                return state
            i -= 1
        return best

    def state_at(self, seq: int, *, from_zero: bool = False) -> TailnetState:
        """The state after event ``seq``, folded from the best snapshot (or from zero)."""
        if seq > self.head.seq:
            raise ReplayError(f"seq {seq} is past the head of the log ({self.head.seq})")
        state = TailnetState() if from_zero else self.start_for(seq)
        state = self.fold(state, seq, leave_snapshots=not from_zero)
        self._cache = (seq, state)
        return state

    def policy_seq(self, seq: int) -> int:
        """The seq of the ``policy.set`` in force after event ``seq`` (0: none)."""
        if seq not in self._policy_seq:
            self.state_at(seq)
        return self._policy_seq[seq]

    def fold(self, state: TailnetState, upto_seq: int, *, leave_snapshots: bool = True) -> TailnetState:
        """Fold verified events ``state.seq < seq <= upto_seq`` into ``state``."""
        total = upto_seq - state.seq
        every = self.snapshot_every
        policy_seq = self._policy_seq.get(state.seq)
        if policy_seq is None:  # a state from elsewhere: find its policy event
            policy_seq = 0
            for row in self.rows(0, state.seq):
                if row.type == "policy.set":
                    policy_seq = row.seq
        for done, row in enumerate(self.rows(state.seq, upto_seq), 1):
            state, _ = apply(state, row.to_event())
            if row.type == "policy.set":
                policy_seq = row.seq
            if leave_snapshots and every and row.seq % every == 0:
                self._policy_seq[state.seq] = policy_seq
                self.save_snapshot(state, row.hash)
            if self.progress is not None and done % 10_000 == 0:
                self.progress(done, total)
        if self.progress is not None and total:
            self.progress(total, total)
        self._policy_seq[state.seq] = policy_seq
        return state

    def save_snapshot(self, state: TailnetState, event_hash: str) -> None:
        if self.snapshots.get(state.seq) is not None:
            return
        blob = encode_state(state)
        self.snapshots.put(
            Snapshot(state.seq, event_hash, hashlib.sha256(blob).hexdigest(), blob,
                     self._policy_seq.get(state.seq, 0))
        )
