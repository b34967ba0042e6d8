"""``tailledger bench conn-memory`` runs its server and client processes from anywhere
and prints its per-connection figures (a benchmark: slow, figures not judged)."""

from __future__ import annotations

import re
import socket
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


@pytest.mark.slow
def test_conn_memory_full_mode_serves_no_metrics_listener(tmp_path: Path) -> None:
    # The default metrics address held by someone else (another server on this host,
    # or a second run) must not matter: the measured server opens no metrics listener.
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 9090))
        holder.listen()
    except OSError:
        pass  # taken already: the same situation
    try:
        result = subprocess.run(
            tailledger_argv("bench", "conn-memory", "--mode", "full", "--nodes", "10", "--warmup", "2",
                            "--settle", "0.3", "--top", "1"),
            env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
    finally:
        holder.close()
    assert result.returncode == 0, result.stderr
    assert "== full: 10 idle connections" in result.stdout, result.stdout
    assert "metrics" not in (result.stdout + result.stderr).lower()
