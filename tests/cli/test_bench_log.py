"""``tailledger bench log`` (SQLite): both rates, their ratio, and where the log's time
went, in parts that add up to the log's own time (no timing asserted)."""

from __future__ import annotations

import re

import pytest

from cli.main import main


def _seconds(out: str, label: str) -> float:
    match = re.search(rf"^\s*{re.escape(label)}\s+([\d.]+) s", out, re.MULTILINE)
    assert match is not None, f"no {label!r} line in:\n{out}"
    return float(match[1])


def test_bench_log_prints_rates_and_where_the_time_goes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "log", "--events", "300", "--writers", "10", "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    assert "events appended          300" in out
    # Three rounds, and the figures shown are the median round's.
    ratios = [float(r) for r in re.findall(r"([\d.]+)%", re.search(r"^rounds +3 +\(ratios (.*);", out, re.MULTILINE)[1])]  # type: ignore[index]
    shown = float(re.search(r"^ratio +([\d.]+)%", out, re.MULTILINE)[1])  # type: ignore[index]
    assert len(ratios) == 3 and shown == sorted(ratios)[1]
    # Where the commits ran: all of them are counted, on the loop's thread or the writer's.
    commits = int(re.search(r"^group commits +(\d+)", out, re.MULTILINE)[1])  # type: ignore[index]
    at_once = int(re.search(r"^  on the loop's thread +(\d+)", out, re.MULTILINE)[1])  # type: ignore[index]
    assert 0 <= at_once <= commits
    for label in ("tailledger log", "plain sqlite3 inserts", "ratio", "where the log's time goes"):
        assert label in out
    total = float(re.search(r"tailledger log .*\(([\d.]+) s", out)[1])  # type: ignore[index]
    parts = [
        _seconds(out, label)
        for label in ("store: SQLite insert + commit", "store: encode + chain hash", "trio: queue, hand-offs, wake-ups")
    ]
    assert all(p >= 0 for p in parts)
    assert sum(parts) == pytest.approx(total, abs=0.02)  # the parts are the log's time, rounded
