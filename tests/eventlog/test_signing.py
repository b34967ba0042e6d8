"""Signed checkpoints: every way to tamper with a stolen data directory is detected.

The attacker here can write the database (drops the append-only triggers, edits rows,
recomputes hashes) but cannot read the signing key, which lives elsewhere.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from eventlog import GENESIS_HASH, AppendRequest, SQLiteEventStore, StoredRow
from eventlog.audit import audit_log
from eventlog.signing import (
    SignedCheckpoint,
    Signer,
    load_or_create_signing_key,
    parse_anchor,
)
from tests.conftest import ADMIN, T0

from .contract import user

SIGN_AT = (5, 10)  # the heads signed while the log grew to 12 events


def _build(path: Path, signer: Signer, events: int = 12) -> list[SignedCheckpoint]:
    store = SQLiteEventStore(path)
    signed: list[SignedCheckpoint] = []
    for i in range(1, events + 1):
        store.append_batch([AppendRequest(events=(user(i),), actor=ADMIN)], i * 1000)
        if i in SIGN_AT:
            head = store.head()
            cp = signer.sign(
                n=len(signed) + 1, seq=head.seq, hash=head.hash, at=T0 + timedelta(seconds=i),
                prev=signed[-1].digest() if signed else "",
            )
            store.add_signed_checkpoint(cp)
            signed.append(cp)
    store.close()
    return signed


def _raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    for table in ("events", "signed_checkpoints"):
        conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
        conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    return conn


def _forge(conn: sqlite3.Connection, seq: int) -> None:
    """What a careful forger does: rename the user created at ``seq`` (its payload edited
    in place), then recompute every hash from ``seq`` on."""
    data = f'{{"type":"user.created","user_id":{seq},"name":"mallory"}}'.encode()
    conn.execute("UPDATE events SET data = ? WHERE seq = ?", (data, seq))
    prev = conn.execute("SELECT hash FROM events WHERE seq = ?", (seq - 1,)).fetchone()
    prev_hash = prev[0] if prev else GENESIS_HASH
    rows = conn.execute(
        "SELECT seq, recorded_at_us, actor_kind, actor_id, type, schema, data, correlation_id, reason "
        "FROM events WHERE seq >= ? ORDER BY seq",
        (seq,),
    ).fetchall()
    for r in rows:
        row = StoredRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], prev_hash, "", r[7], r[8])
        new = row.computed_hash()
        conn.execute("UPDATE events SET prev_hash = ?, hash = ? WHERE seq = ?", (prev_hash, new, r[0]))
        prev_hash = new


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


def test_an_untouched_signed_log_verifies(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "log.db"
    signed = _build(path, signer)
    report = audit_log(SQLiteEventStore(path), public_key=signer.public_key, anchors=[signed[-1]])
    assert report.ok, report.problems
    assert (report.events, report.checkpoints, report.anchors) == (12, 2, 1)
    assert report.latest == signed[-1]


def test_trigger_drop_edit_and_full_rehash_is_caught(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "log.db"
    _build(path, signer)
    conn = _raw(path)
    _forge(conn, 7)
    store = SQLiteEventStore(path)
    assert store.verify().ok  # the chain alone is fooled …
    report = audit_log(store, public_key=signer.public_key)
    assert not report.ok  # … the signed checkpoint at seq 10 is not
    assert report.first_bad == 6  # everything up to the checkpoint at seq 5 still proves
    assert "re-hashed" in (report.reason or "")


def test_rehash_with_re_signed_checkpoints_fails_on_the_trusted_key(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "log.db"
    _build(path, signer)
    conn = _raw(path)
    _forge(conn, 2)
    # The forger signs the new history with a key of their own.
    conn.execute("DELETE FROM signed_checkpoints")
    own = Signer.generate()
    store = SQLiteEventStore(path)
    prev = ""
    for n, seq in enumerate(SIGN_AT, 1):
        cp = own.sign(n=n, seq=seq, hash=store.hash_at(seq) or "", at=T0, prev=prev)
        store.add_signed_checkpoint(cp)
        prev = cp.digest()
    report = audit_log(store, public_key=signer.public_key)
    assert report.first_bad == 1
    assert "does not verify against the public key" in (report.reason or "")


@pytest.mark.parametrize(
    ("tamper", "first_bad", "reason"),
    [
        ("DELETE FROM events WHERE seq > 8", 9, "truncated"),
        ("UPDATE signed_checkpoints SET seq = 4 WHERE n = 1", 1, "does not verify"),
    ],
    ids=["truncated-log", "altered-checkpoint"],
)
def test_tampering_is_caught_by_a_signed_checkpoint(
    tmp_path: Path, signer: Signer, tamper: str, first_bad: int, reason: str
) -> None:
    path = tmp_path / "log.db"
    _build(path, signer)
    _raw(path).execute(tamper)
    report = audit_log(SQLiteEventStore(path), public_key=signer.public_key)
    assert report.first_bad == first_bad
    assert reason in (report.reason or "")


def test_truncation_with_its_checkpoints_removed_is_caught_by_an_anchor(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "log.db"
    signed = _build(path, signer)
    anchor = parse_anchor(signed[-1].anchor_line())  # kept elsewhere, as one line
    conn = _raw(path)
    conn.execute("DELETE FROM events WHERE seq > 8")
    conn.execute("DELETE FROM signed_checkpoints WHERE n = 2")
    store = SQLiteEventStore(path)
    assert audit_log(store, public_key=signer.public_key).ok  # without the anchor: undetectable
    report = audit_log(store, public_key=signer.public_key, anchors=[anchor])
    assert report.first_bad == 6
    reasons = " ".join(p.reason for p in report.problems)
    assert "signed checkpoint 2 named by an anchor is missing" in reasons
    assert "truncated" in reasons


def test_a_deleted_signed_checkpoint_is_caught(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "log.db"
    signed = _build(path, signer, events=16)
    store = SQLiteEventStore(path)
    head = store.head()
    third = signer.sign(n=3, seq=head.seq, hash=head.hash, at=T0, prev=signed[-1].digest())
    store.add_signed_checkpoint(third)
    store.close()
    _raw(path).execute("DELETE FROM signed_checkpoints WHERE n = 2")
    report = audit_log(SQLiteEventStore(path), public_key=signer.public_key)
    assert report.first_bad == 6
    assert "signed checkpoint 2 is missing (removed)" in (report.reason or "")
    # The newest one deleted: the anchor beside the key (or kept elsewhere) names it.
    _raw(path).execute("DELETE FROM signed_checkpoints WHERE n = 3")
    report = audit_log(SQLiteEventStore(path), public_key=signer.public_key, anchors=[third])
    assert not report.ok
    assert any("signed checkpoint 3 named by an anchor is missing" in p.reason for p in report.problems)


def test_a_forged_anchor_is_refused(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "log.db"
    signed = _build(path, signer)
    forged = Signer.generate().sign(n=2, seq=10, hash=signed[-1].hash, at=T0, prev=signed[0].digest())
    report = audit_log(SQLiteEventStore(path), public_key=signer.public_key, anchors=[forged])
    assert "anchor 2 (seq 10) does not verify" in (report.reason or "")


def test_anchor_lines_round_trip_and_reject_garbage(signer: Signer) -> None:
    cp = signer.sign(n=1, seq=3, hash="ab" * 32, at=T0, prev="")
    line = cp.anchor_line()
    assert "\n" not in line and line.startswith("tailledger-anchor/1 n=1 seq=3 ")
    assert parse_anchor(line) == cp and parse_anchor(line).verifies(signer.public_key)
    with pytest.raises(ValueError, match="malformed"):
        parse_anchor("tailledger-anchor/1 n=1 seq=x")
    with pytest.raises(ValueError, match="not a"):
        parse_anchor("hello")


def test_the_signing_key_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.key"
    first, created = load_or_create_signing_key(path)
    assert created and path.stat().st_mode & 0o777 == 0o600
    again, created = load_or_create_signing_key(path)
    assert not created and again.public_key == first.public_key
    path.write_text("not a key\n")
    with pytest.raises(ValueError, match="does not hold"):
        load_or_create_signing_key(path)


def test_the_chain_is_checked_as_events_are_read_for_folding(tmp_path: Path, signer: Signer) -> None:
    from eventlog import GENESIS_HASH, ChainError

    path = tmp_path / "log.db"
    _build(path, signer)
    conn = _raw(path)
    conn.execute("UPDATE events SET data = ? WHERE seq = 4", (b'{"type":"user.created","user_id":4,"name":"x"}',))
    store = SQLiteEventStore(path)
    assert len(store.read_checked(0, 3, GENESIS_HASH)) == 3
    with pytest.raises(ChainError) as err:
        store.read_checked(0, 100, GENESIS_HASH)
    assert err.value.seq == 4
