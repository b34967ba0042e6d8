"""Print the conformance pass counts per category at the end of the session."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Add a per-category conformance table when the conformance tests ran."""
    from . import test_conformance

    if not test_conformance._outcome.cache_info().currsize:
        return
    terminalreporter.section("policy conformance")
    for category, (full, verdicts, total) in sorted(test_conformance.category_summary().items()):
        terminalreporter.write_line(
            f"{category:<11} {full:>4}/{total:<4} fully right   {verdicts:>4}/{total:<4} verdicts right"
        )
