"""Fixtures of the reliability suite, and its line in the terminal summary.

Every trial of the kill -9 test appends a `TrialRecord`; at the end of the session
`pytest_terminal_summary` prints how many trials ran and how they ended, so CI's output
says it whatever the verbosity (and whether or not ``-s`` was given).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

_RECORDS = pytest.StashKey[list["TrialRecord"]]()


@dataclass
class TrialRecord:
    """One kill -9 trial: where the kill fell and what the log looked like after it."""

    case: int
    trial: int
    kind: str = "workload"  # or "start-up": killed while the server started
    acked: int = 0  # changes acknowledged during the trial
    head: int = 0  # the log's head after the kill
    checkpoint_seq: int | None = None
    ok: bool = False
    failure: str = ""


@pytest.fixture
def trial_records(request: pytest.FixtureRequest) -> list[TrialRecord]:
    """The session's trial records (append one per trial)."""
    return request.config.stash.setdefault(_RECORDS, [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    records = config.stash.get(_RECORDS, [])
    if not records:
        return
    passed = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    cases = len({r.case for r in records})
    startup = sum(r.kind == "start-up" for r in records)
    acked = sum(r.acked for r in records)
    with_checkpoint = sum(r.checkpoint_seq is not None for r in passed)
    terminalreporter.write_sep("=", "reliability: kill -9 at random points of a busy workload")
    outcome = "PASSED" if not failed else "FAILED"
    terminalreporter.write_line(
        f"kill -9: {len(records)} trials in {cases} cases: {len(passed)} passed, {len(failed)} failed "
        f"-> {outcome}"
    )
    terminalreporter.write_line(
        f"  {acked} acknowledged changes checked in the log after the kills "
        f"({'none' if not failed else 'see failures'} lost); "
        f"{len(records) - startup} kills under load, {startup} during start-up"
    )
    terminalreporter.write_line(
        f"  after each passed trial: tailledger log verify OK, every row decodes, "
        f"checkpoint (in {with_checkpoint}) = fresh fold, restarted server = fresh fold"
    )
    for r in failed:
        terminalreporter.write_line(f"  FAILED case {r.case} trial {r.trial} ({r.kind}): {r.failure}")
