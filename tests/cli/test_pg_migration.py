"""Moving a log between SQLite and PostgreSQL: ``log export`` from one, ``log import``
into the other, and the head hash is the same (both ways)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from cli.main import main
from eventlog import SQLiteEventStore
from eventlog.pgstore import PostgresEventStore

ROOT = Path(__file__).resolve().parents[2] / "replay-fixtures"
FIXTURE = ROOT / "incident-subnet-route" / "events.jsonl"


def _run(capfd: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out = capfd.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.fixture
def on_postgres(pg_dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The CLI's configuration points at a fresh PostgreSQL database."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = tmp_path / "pg.toml"
    config.write_text(f'data_dir = "{tmp_path / "pgdata"}"\n[database]\ntype = "postgres"\ndsn = "{pg_dsn}"\n')
    return str(config)


def test_sqlite_to_postgres_and_back_keeps_the_head(
    on_postgres: str, pg_dsn: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    lite = tmp_path / "lite"
    _run(capfd, "log", "import", str(FIXTURE), "--data", str(lite))
    sqlite_head = SQLiteEventStore(lite / "ledger.db", read_only=True).head()
    exported = tmp_path / "from-sqlite.jsonl"
    _run(capfd, "log", "export", "-f", str(exported), "--data", str(lite))

    text = _run(capfd, "log", "import", str(exported), "--config", on_postgres, "-o", "json")
    assert json.loads(text)["head_hash"] == sqlite_head.hash
    pg = PostgresEventStore(pg_dsn, read_only=True)
    assert pg.head() == sqlite_head and pg.verify().ok
    pg.close()
    assert "chain intact" in _run(capfd, "log", "verify", "--config", on_postgres)
    # The same history answers the same questions on either backend.
    assert _run(capfd, "replay", "state", "-o", "json", "--config", on_postgres) == _run(
        capfd, "replay", "state", "-o", "json", "--data", str(lite)
    )

    back = tmp_path / "from-postgres.jsonl"
    _run(capfd, "log", "export", "-f", str(back), "--config", on_postgres)
    assert back.read_bytes() == exported.read_bytes()
    again = tmp_path / "again"
    text = _run(capfd, "log", "import", str(back), "--data", str(again), "-o", "json")
    assert json.loads(text)["head_hash"] == sqlite_head.hash
    assert SQLiteEventStore(again / "ledger.db", read_only=True).head() == sqlite_head


def test_a_refused_import_leaves_the_postgres_log_empty(
    on_postgres: str, pg_dsn: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    lines = FIXTURE.read_bytes().splitlines()
    row = msgspec.json.decode(lines[6])
    row["actor"] = "admin:mallory"
    lines[6] = msgspec.json.encode(row)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["log", "import", str(bad), "--config", on_postgres]) == 1
    assert "event 7" in capfd.readouterr().err
    store = PostgresEventStore(pg_dsn, read_only=True)
    assert store.head().seq == 0  # the first six verified lines were not kept either
    store.close()
    _run(capfd, "log", "import", str(FIXTURE), "--config", on_postgres)
    assert main(["log", "import", str(FIXTURE), "--config", on_postgres]) == 1
    assert "not empty" in capfd.readouterr().err
