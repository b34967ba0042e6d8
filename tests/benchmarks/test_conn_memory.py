"""``tailledger bench conn-memory`` runs its server and client processes from anywhere
and prints its per-connection figures (a benchmark: slow, figures not judged)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cli.spawn import child_env, tailledger_argv


@pytest.mark.slow
def test_conn_memory_prints_what_one_idle_connection_costs(tmp_path: Path, bench_smoke: bool) -> None:
    nodes = 20 if bench_smoke else 200
    result = subprocess.run(
        tailledger_argv("bench", "conn-memory", "--nodes", str(nodes), "--warmup", "5", "--settle", "0.5",
                        "--top", "3"),
        env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"== transport: {nodes} idle connections (plain TCP)" in out, out
    assert "failed to connect" not in out, out
    assert "stand-in handler (transport mode)" in out  # its own frames are named as such
    row = re.search(rf"^\s+transport\s+{nodes}\s+False\s+(\S+)\s+(\S+)$", out, re.MULTILINE)
    assert row is not None, out
    assert float(row.group(2)) > 0  # traced KiB per connection
