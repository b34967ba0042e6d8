"""``tailledger bench api`` runs end to end on a small tailnet and prints its figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cli.bench.api import write_tailnet
from eventlog import SQLiteEventStore
from projections import fold
from projections.state import TailnetState


def test_the_synthetic_tailnet_is_a_valid_log(tmp_path: Path) -> None:
    write_tailnet(tmp_path / "ledger.db", 30, users=3)
    store = SQLiteEventStore(tmp_path / "ledger.db", read_only=True)
    try:
        state, _ = fold(TailnetState(), store.read(0, limit=10_000))
        assert store.verify().first_bad is None
    finally:
        store.close()
    assert len(state.users) == 3 and len(state.nodes) == 30
    assert len({n.ipv4 for n in state.nodes.values()}) == 30


def test_bench_api_prints_figures() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "bench", "api", "--nodes", "50", "--requests", "5", "--seconds", "0.5",
         "--streams", "20", "--keepalive", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "/api/v2/tailnet/-/devices" in result.stdout and "requests/s" in result.stdout
    # Before the streams (50 nodes, 20 of them simulated clients), then with 20 map
    # streams of the load generator open and watched.
    assert "20 simulated clients registered" in result.stdout and "with no map stream (50 nodes):" in result.stdout
    assert "20 map streams connected" in result.stdout and "with 20 map streams open:" in result.stdout
    assert "of 20 clients waited over 1.5 s" in result.stdout
