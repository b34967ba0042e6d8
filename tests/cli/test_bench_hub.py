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


def test_bench_hub_prints_the_curve(capsys: pytest.CaptureFixture[str]) -> None:
    """Several sizes and scenarios end with one table: per change, the CPU, the streams
    it affected, the CPU per affected stream and the growth from the previous size."""
    assert main(["bench", "hub", "--scenario", "flat,corp", "--nodes", "20,40"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("scenario ") :].splitlines()
    assert table[0].split() == [
        "scenario", "nodes", "change", "CPU", "s", "affected", "ms/affected", "nodes", "x", "CPU", "x",
        "affected", "x", "ms/aff", "x",
    ]
    rows = {(r[0], int(r[1]), r[2]): r[3:] for r in (line.split() for line in table[1:])}
    assert set(rows) == {(s, n, c) for s in ("flat", "corp") for n in (20, 40) for c in ("join", "tag", "delete", "policy")}
    for (name, n, change), cols in rows.items():
        cpu, affected, per = float(cols[0]), int(cols[1]), float(cols[2])
        assert affected > 0 and abs(per - 1000 * cpu / affected) <= 0.5 / affected + 0.001  # (rounded)
        if n == 20:
            assert len(cols) == 3  # no size before it: no growth
            continue
        first = rows[(name, 20, change)]
        assert float(cols[3]) == 2.0  # nodes x
        assert cols[5] == f"{affected / int(first[1]):.2f}"  # affected x


def test_bench_hub_refuses_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--nodes", "10,x"], ["--nodes", "0"], ["--scenario", "mesh"]):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "hub", *argv])
        assert exc.value.code == 2
    assert "--nodes" in capsys.readouterr().err
