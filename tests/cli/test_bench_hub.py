"""``tailledger bench hub``: one change of each kind, timed across every stream of a
small corp tailnet built in process (figures printed, no timing asserted)."""

from __future__ import annotations

import re

import pytest

from cli.main import main


def test_bench_hub_prints_each_change(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "hub", "--scenario", "corp", "--nodes", "60"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^corp 60: built in .* classes \d+, peers avg", out, re.MULTILINE)
    messaged = {
        m[1]: int(m[2]) for m in re.finditer(r"^\s+(\w+)\s+CPU\s+[\d.]+ s\s+streams messaged\s+(\d+)", out, re.MULTILINE)
    }
    assert set(messaged) == {"join", "tag", "delete", "policy"}
    # The newcomer's peers hear of it; the policy change reaches (nearly) every stream.
    assert 0 < messaged["join"] <= 61
    assert messaged["policy"] > messaged["join"]
