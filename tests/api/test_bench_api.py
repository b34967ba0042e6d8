"""``tailledger bench api`` runs end to end on a small tailnet and prints its figures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cli.bench.api import write_tailnet
from cli.spawn import child_env, tailledger_argv
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


@pytest.mark.slow
def test_bench_api_prints_figures(bench_smoke: bool) -> None:
    nodes, streams = (50, 20) if bench_smoke else (200, 100)
    result = subprocess.run(
        tailledger_argv("bench", "api", "--nodes", str(nodes), "--requests", "5", "--seconds", "0.5",
                        "--streams", str(streams), "--keepalive", "1"),
        env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "/api/v2/tailnet/-/devices" in result.stdout and "requests/s" in result.stdout
    # Before the streams (some of the nodes are simulated clients), then with their map
    # streams of the load generator open and watched.
    assert f"{streams} simulated clients registered" in result.stdout
    assert f"with no map stream ({nodes} nodes):" in result.stdout
    assert f"{streams} map streams connected" in result.stdout and f"with {streams} map streams open:" in result.stdout
    assert f"of {streams} clients waited over 1.5 s" in result.stdout
    # The simulated clients run in worker processes, and each load says whose CPU it took.
    assert f"{streams} simulated clients registered" in result.stdout and "(2 worker processes)" in result.stdout
    cpu = [line for line in result.stdout.splitlines() if line.startswith("CPU over the API load")]
    assert len(cpu) == 2 and all("ms per list request" in line and "simulated clients (2 workers)" in line
                                 for line in cpu)
