"""The contract every event-store backend must pass.

Each backend's test module subclasses :class:`StoreContract` and provides ``make_store``
(a fresh, empty store) and, where the backend can be reopened, ``reopen``. The same
assertions then run against SQLite in memory, SQLite on disk and, later, PostgreSQL.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence

import pytest

from eventlog import (
    GENESIS_HASH,
    AppendRequest,
    ChainError,
    EventStore,
    ExpectedSequenceConflict,
    RecordedEvent,
)
from eventlog.codec import encode_event
from eventlog.envelope import chain_hash, to_micros
from eventlog.events import NodeRenamed, PolicySet, UserCreated
from eventlog.rows import StoredRow
from tests.conftest import ADMIN


def user(uid: int) -> UserCreated:
    return UserCreated(user_id=uid, name=f"user{uid}")


def race(stores: Sequence[EventStore], expected_seq: int) -> list[object]:
    """Each of ``stores`` (one store may stand several times) appends ``user(i)`` for
    its 1-based place ``i`` at once, all expecting ``expected_seq``; the outcomes, in
    the order they came."""
    outcomes: list[object] = []
    barrier = threading.Barrier(len(stores))

    def writer(store: EventStore, i: int) -> None:
        barrier.wait()
        [r] = store.append_batch([AppendRequest(events=(user(i),), actor=ADMIN, expected_seq=expected_seq)], i)
        outcomes.append(r)

    threads = [threading.Thread(target=writer, args=(s, i)) for i, s in enumerate(stores, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def chained(times: Sequence[int]) -> list[StoredRow]:
    """Rows of ``user(seq)`` from genesis, one recorded at each of ``times``, each
    linked to and hashed like a store's own."""
    rows: list[StoredRow] = []
    prev = GENESIS_HASH
    for seq, at in enumerate(times, 1):
        event = user(seq)
        fields = {
            "seq": seq, "recorded_at_us": at, "actor_kind": ADMIN.kind.value, "actor_id": ADMIN.id,
            "type": event.type_name(), "schema": event.SCHEMA, "data": encode_event(event),
        }
        row = StoredRow(**fields, prev_hash=prev, hash=chain_hash(prev, **fields))  # type: ignore[arg-type]
        rows.append(row)
        prev = row.hash
    return rows


def appended(result: object) -> tuple[RecordedEvent, ...]:
    assert isinstance(result, tuple), result
    return result


class StoreContract(abc.ABC):
    @abc.abstractmethod
    def make_store(self) -> EventStore: ...

    def test_empty_store(self) -> None:
        store = self.make_store()
        head = store.head()
        assert (head.seq, head.hash) == (0, GENESIS_HASH)
        assert store.read() == []
        assert store.verify().ok

    def test_append_assigns_gapless_sequence_and_chains_hashes(self) -> None:
        store = self.make_store()
        [first] = store.append_batch([AppendRequest(events=(user(1), user(2)), actor=ADMIN)], 10)
        [second] = store.append_batch([AppendRequest(events=(user(3),), actor=ADMIN)], 20)
        events = appended(first) + appended(second)
        assert [e.seq for e in events] == [1, 2, 3]
        assert events[0].prev_hash == GENESIS_HASH
        assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
        assert store.read() == list(events)
        assert store.head().seq == 3 and store.head().hash == events[-1].hash

    def test_read_pages(self) -> None:
        store = self.make_store()
        store.append_batch([AppendRequest(events=tuple(user(i) for i in range(1, 11)), actor=ADMIN)], 1)
        assert [e.seq for e in store.read(3, 4)] == [4, 5, 6, 7]
        assert store.read(10) == []
        assert [r.seq for r in store.iter_rows(page=3)] == list(range(1, 11))

    def test_expected_sequence_refuses_a_stale_writer(self) -> None:
        store = self.make_store()
        store.append_batch([AppendRequest(events=(user(1),), actor=ADMIN, expected_seq=0)], 1)
        [result] = store.append_batch(
            [AppendRequest(events=(user(2),), actor=ADMIN, expected_seq=0)], 2
        )
        assert isinstance(result, ExpectedSequenceConflict)
        assert (result.expected, result.actual) == (0, 1)
        assert store.head().seq == 1

    def test_batch_checks_each_request_against_the_running_head(self) -> None:
        store = self.make_store()
        results = store.append_batch(
            [
                AppendRequest(events=(user(1),), actor=ADMIN, expected_seq=0),
                AppendRequest(events=(user(2),), actor=ADMIN, expected_seq=0),  # stale now
                AppendRequest(events=(user(3),), actor=ADMIN, expected_seq=1),
            ],
            5,
        )
        assert isinstance(results[1], ExpectedSequenceConflict)
        assert [e.seq for e in appended(results[0]) + appended(results[2])] == [1, 2]
        assert store.verify().ok

    def test_concurrent_writers_cannot_both_win(self) -> None:
        store = self.make_store()
        outcomes = race([store] * 8, expected_seq=0)
        winners = [o for o in outcomes if isinstance(o, tuple)]
        assert len(winners) == 1
        assert store.head().seq == 1

    def test_recorded_time_never_goes_backwards(self) -> None:
        store = self.make_store()
        store.append_batch([AppendRequest(events=(user(1),), actor=ADMIN)], 2_000_000)
        store.append_batch([AppendRequest(events=(user(2),), actor=ADMIN)], 1_000_000)
        a, b = store.read()
        assert b.recorded_at >= a.recorded_at
        assert store.seq_at_time(1_999_999) == 0
        assert store.seq_at_time(2_000_000) == 2

    def test_an_append_that_cannot_begin_at_once_appends_nothing(self) -> None:
        store = self.make_store()
        store.append_batch([AppendRequest(events=(user(1),), actor=ADMIN)], 1_000)
        results = store.try_append_batch(
            [AppendRequest(events=(user(2),), actor=ADMIN), AppendRequest(events=(user(3),), actor=ADMIN, expected_seq=1)],
            2_000,
        )
        if results is None:  # (this backend never begins at once)
            assert store.head().seq == 1
        else:  # exactly what append_batch would have done
            assert [e.seq for e in appended(results[0])] == [2]
            assert isinstance(results[1], ExpectedSequenceConflict)
            assert store.head().seq == 2 and store.verify().ok

    def test_the_seq_at_a_time_is_the_last_event_recorded_by_then(self) -> None:
        store = self.make_store()
        # Batches of one to three events; some at the same time, one clock step back.
        times = [1_000, 1_000, 5_000, 4_000, 9_000, 9_000, 9_001, 20_000]
        for i, at in enumerate(times):
            events = tuple(user(10 * i + k) for k in range(1 + i % 3))
            store.append_batch([AppendRequest(events=events, actor=ADMIN)], at)
        recorded = [(e.seq, to_micros(e.recorded_at)) for e in store.read()]
        assert store.head().seq == len(recorded) > len(times)
        for at in [0, 999, 1_000, 1_001, 4_000, 4_999, 5_000, 8_999, 9_000, 9_001, 19_999, 20_000, 10**12]:
            assert store.seq_at_time(at) == max((seq for seq, t in recorded if t <= at), default=0), at

    def test_an_import_refuses_a_row_recorded_before_the_one_before_it(self) -> None:
        store = self.make_store()
        # Well chained and hashed: only the second row's time is wrong (it goes back).
        with pytest.raises(ChainError, match="recorded before") as excinfo:
            store.insert_rows(chained([1_000, 500, 3_000]))
        assert excinfo.value.seq == 2
        assert store.head().seq == 0
        store.insert_rows(chained([1_000, 1_000, 3_000]))
        assert store.verify().ok and store.seq_at_time(2_999) == 2

    def test_round_trips_every_field(self) -> None:
        store = self.make_store()
        events = (
            PolicySet(text='{"acls": []} // ünïcode', sha256="ab" * 32, source="file"),
            NodeRenamed(node_id=7, given_name="db-1"),
        )
        [result] = store.append_batch([AppendRequest(events=events, actor=ADMIN)], 123)
        assert tuple(e.event for e in store.read()) == events
        assert store.read() == list(appended(result))
        assert store.read()[0].actor == ADMIN

    def test_verify_reports_count_and_head(self) -> None:
        store = self.make_store()
        store.append_batch([AppendRequest(events=(user(1), user(2)), actor=ADMIN)], 1)
        report = store.verify()
        assert report.ok and report.count == 2
        assert report.head_hash == store.head().hash

    def test_closed_store_refuses_use(self) -> None:
        from eventlog import StoreClosedError

        store = self.make_store()
        store.close()
        with pytest.raises(StoreClosedError):
            store.head()

    def test_signed_checkpoints_are_stored_in_order_and_audit(self) -> None:
        from nacl.signing import SigningKey

        from eventlog import EventLogError
        from eventlog.audit import audit_log
        from eventlog.signing import SignedCheckpoint, Signer
        from tests.conftest import T0

        store = self.make_store()
        signer = Signer(SigningKey(b"k" * 32))
        assert store.signed_checkpoints() == [] and store.last_signed_checkpoint() is None
        signed: list[SignedCheckpoint] = []
        for i in range(1, 4):
            store.append_batch([AppendRequest(events=(user(i),), actor=ADMIN)], i)
            head = store.head()
            cp = signer.sign(n=i, seq=head.seq, hash=head.hash, at=T0, prev=signed[-1].digest() if signed else "")
            store.add_signed_checkpoint(cp)
            signed.append(cp)
        assert store.signed_checkpoints() == signed
        assert store.signed_checkpoints(2) == signed[2:]
        assert store.last_signed_checkpoint() == signed[-1]
        assert store.hash_at(2) == signed[1].hash and store.hash_at(9) is None
        with pytest.raises(EventLogError):  # a second replica signing the same n loses
            store.add_signed_checkpoint(signed[0])
        report = audit_log(store, public_key=signer.public_key)
        assert report.ok and report.checkpoints == 3 and report.latest == signed[-1]
