"""``tailledger bench log --backend postgres`` prints its figures (no timing asserted)."""

from __future__ import annotations

import pytest

from cli.main import main
from eventlog.pgstore import PostgresEventStore


def test_bench_log_on_postgres_prints_both_rates(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "log", "--backend", "postgres", "--dsn", pg_dsn, "--events", "300", "--writers", "10"]) == 0
    out = capsys.readouterr().out
    assert "events appended          300" in out
    for label in ("tailledger log", "plain psycopg inserts", "ratio", "store: PostgreSQL insert + commit"):
        assert label in out
    store = PostgresEventStore(pg_dsn, read_only=True)
    assert store.verify().count == 300  # the appends were real, and the chain holds
    store.close()


def test_bench_log_refuses_a_database_with_a_log(pg_dsn: str) -> None:
    assert main(["bench", "log", "--backend", "postgres", "--dsn", pg_dsn, "--events", "10", "--writers", "10"]) == 0
    with pytest.raises(SystemExit, match="not empty"):
        main(["bench", "log", "--backend", "postgres", "--dsn", pg_dsn, "--events", "10", "--writers", "10"])
