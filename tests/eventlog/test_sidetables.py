"""The side tables beside the log: pending registrations and presence."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from eventlog import SQLiteEventStore
from eventlog.sidetables import Admission, PendingRegistration, PresenceRecord, SideTables
from tests.conftest import T0


def reg(n: int, *, source: str = "192.0.2.1", machine: str | None = None, minutes: int = 30) -> PendingRegistration:
    return PendingRegistration(
        auth_id=f"id{n}", machine_key=machine or f"{n:064x}", node_key=f"{n + 1000:064x}",
        hostname=f"host{n}", os="linux", request_tags=("tag:a",), ephemeral=False,
        source=source, created=T0 + timedelta(seconds=n), expires=T0 + timedelta(minutes=minutes, seconds=n),
    )


@pytest.fixture(params=["sqlite", "postgres"])
def side(request: pytest.FixtureRequest) -> Iterator[SideTables]:
    """The side tables on each backend (the same assertions hold on both)."""
    if request.param == "sqlite":
        tables = SideTables(":memory:")
    else:
        from eventlog.pgstore import PostgresSideTables

        tables = PostgresSideTables(request.getfixturevalue("pg_dsn"))
    yield tables
    tables.close()


def test_global_and_per_source_caps(side: SideTables) -> None:
    def add(r: PendingRegistration) -> Admission:
        return side.add_pending(r, max_total=3, max_per_source=2)

    assert add(reg(1, source="a")) is Admission.ADMITTED
    assert add(reg(2, source="a")) is Admission.ADMITTED
    assert add(reg(3, source="a")) is Admission.SOURCE_CAP  # a third from the same address
    assert add(reg(4, source="b")) is Admission.ADMITTED  # another address is not affected
    assert add(reg(5, source="c")) is Admission.GLOBAL_CAP
    assert [r.auth_id for r in side.list_pending(T0)] == ["id1", "id2", "id4"]


def test_a_machine_asking_again_replaces_its_request(side: SideTables) -> None:
    def add(r: PendingRegistration) -> Admission:
        return side.add_pending(r, max_total=10, max_per_source=1)

    assert add(reg(1, machine="m" * 64)) is Admission.ADMITTED
    assert add(reg(2, machine="m" * 64)) is Admission.ADMITTED  # not counted twice
    assert [r.auth_id for r in side.list_pending(T0)] == ["id2"]


def test_expired_requests_free_their_place_and_are_swept(side: SideTables) -> None:
    assert side.add_pending(reg(1, minutes=1), max_total=1, max_per_source=1) is Admission.ADMITTED
    late = reg(120)  # created two minutes later: the first one has expired
    assert side.add_pending(late, max_total=1, max_per_source=1) is Admission.ADMITTED
    assert side.get_pending("id1") is None
    result = side.sweep_pending(late.expires, watch=["id120", "nope"])
    assert (result.expired, result.remaining, result.watched) == (1, 0, {})
    assert side.count_pending() == 0


def test_reject_marks_once_and_the_sweep_reports_it(side: SideTables) -> None:
    side.add_pending(reg(1), max_total=5, max_per_source=5)
    side.add_pending(reg(2), max_total=5, max_per_source=5)
    assert side.reject_pending("id1", reason="who is this?", by="admin:alice")
    assert not side.reject_pending("id1", reason="again", by="admin:bob")
    got = side.get_pending("id1")
    assert got is not None and got.rejected and got.rejected_reason == "who is this?"
    assert got.rejected_by == "admin:alice" and got.request_tags == ("tag:a",)
    result = side.sweep_pending(T0, watch=["id1", "id2"])
    assert result.watched == {"id1": "who is this?", "id2": None}
    assert result.next_expiry == reg(1).expires
    assert side.delete_pending("id2") and not side.delete_pending("id2")


def test_presence_rows_last_value_wins_and_forget(side: SideTables) -> None:
    side.save_presence([PresenceRecord(1, T0, True), PresenceRecord(2, T0, False)])
    side.save_presence([PresenceRecord(1, T0 + timedelta(hours=1), False)], forget=[2])
    assert side.load_presence() == [PresenceRecord(1, T0 + timedelta(hours=1), False)]


def test_side_tables_live_in_the_log_database_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = SQLiteEventStore(path)
    side = SideTables(path)
    side.add_pending(reg(1), max_total=5, max_per_source=5)
    side.save_presence([PresenceRecord(7, T0, True)])
    side.close()
    store.close()
    again = SideTables(path)
    assert [r.auth_id for r in again.list_pending(T0)] == ["id1"]
    assert again.load_presence() == [PresenceRecord(7, T0, True)]
    again.close()
    # The log itself is untouched by them: still empty and verifying.
    store = SQLiteEventStore(path)
    assert store.head().seq == 0 and store.verify().ok
    store.close()


def test_replicas_share_pending_registrations_and_presence(pg_dsn: str) -> None:
    """What one replica stores, another sees: a request admitted on A is approved
    (deleted) on B, and the caps count both replicas' requests."""
    from eventlog.pgstore import PostgresEventStore, PostgresSideTables

    store = PostgresEventStore(pg_dsn)
    a, b = PostgresSideTables(pg_dsn), PostgresSideTables(pg_dsn)
    assert a.add_pending(reg(1), max_total=2, max_per_source=5) is Admission.ADMITTED
    assert b.add_pending(reg(2), max_total=2, max_per_source=5) is Admission.ADMITTED
    assert a.add_pending(reg(3), max_total=2, max_per_source=5) is Admission.GLOBAL_CAP
    got = b.get_pending("id1")
    assert got is not None and got.hostname == "host1"
    assert b.delete_pending("id1") and a.get_pending("id1") is None
    a.save_presence([PresenceRecord(7, T0, True)])
    assert b.load_presence() == [PresenceRecord(7, T0, True)]
    for t in (a, b, store):
        t.close()
