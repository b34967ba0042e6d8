"""What ``python -m pytest`` runs: everything but the benchmarks, which the README's
test command (and CI, ``.ci/run``) runs afterwards in their smoke mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collect(*args: str) -> tuple[set[str], str]:
    """The test ids a run with ``args`` would run under ``CI=true``, and its output."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT, env={**os.environ, "CI": "true"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode in (0, 5), done.stdout + done.stderr  # 5: nothing selected
    return {line for line in done.stdout.splitlines() if "::" in line}, done.stdout


def test_the_ci_entry_point_runs_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    [command] = re.findall(r"^    (bash tests/install-deps\.sh && .*)$", readme, re.MULTILINE)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == command
    assert command.endswith("python -m pytest && python -m pytest -m slow --bench-smoke")


def test_the_default_run_leaves_out_the_benchmarks_but_not_the_end_to_end_tests() -> None:
    files = ("tests/protocol/test_transport_bench.py", "tests/e2e/test_tailnet.py", "tests/cli/test_loadgen.py")
    default, out = _collect(*files)
    benchmarks, _ = _collect("-m", "slow", *files)
    every, _ = _collect("-m", "", *files)
    assert any("test_transport_bench.py" in t for t in benchmarks)
    assert any("test_loadgen.py" in t for t in benchmarks)
    assert not any("tests/e2e/" in t for t in benchmarks)
    assert default == every - benchmarks, out
    assert any("tests/e2e/test_tailnet.py" in t for t in default)
    assert any("test_loadgen.py" in t for t in default)  # its quick tests stay
