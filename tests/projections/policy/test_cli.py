"""The ``policy evaluate`` command function and the benchmark entry point."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cli.bench.policy import bench_policy_main
from cli.policy_evaluate import evaluate_main

from .compare import CONFORMANCE_DIR

LAPTOP = {
    "hostname": "laptop",
    "ipv4": "100.64.0.1",
    "ipv6": "fd7a:115c:a1e0::1",
    "user": "odin",
    "tags": [],
    "routable_ips": [],
    "approved_routes": [],
}
WEB = {
    "hostname": "web",
    "ipv4": "100.64.0.2",
    "ipv6": "fd7a:115c:a1e0::2",
    "tags": ["tag:web"],
    "routable_ips": [],
    "approved_routes": [],
}
CASE: dict[str, object] = {
    "id": "inline-1",
    "category": "acl",
    "policy": '{"acls": [{"action": "accept", "src": ["odin@example.com"], "dst": ["tag:web:443"]}],'
    ' "tagOwners": {"tag:web": ["odin@example.com"]}}',
    "users": [{"id": 1, "name": "odin", "email": "odin@example.com"}],
    "nodes": {"laptop": LAPTOP, "web": WEB},
}


def test_evaluate_prints_one_line_per_case(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(CASE))
    rejected = tmp_path / "rejected.json"
    rejected.write_text(
        json.dumps({**CASE, "id": "inline-2", "policy": '{"acls": [{"action": "deny"}]}'})
    )
    out = io.StringIO()
    assert evaluate_main([str(good), str(rejected)], out) == 0
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["id"] == "inline-1"
    assert first["accepted"] is True
    assert first["error"] is None
    web = first["nodes"]["web"]
    assert web["packet_filter"] == [
        {
            "SrcIPs": ["100.64.0.1", "fd7a:115c:a1e0::1"],
            "DstPorts": [
                {"IP": "100.64.0.2", "Ports": {"First": 443, "Last": 443}},
                {"IP": "fd7a:115c:a1e0::2", "Ports": {"First": 443, "Last": 443}},
            ],
        }
    ]
    assert set(web["peers"]) == {"laptop"}
    assert first["nodes"]["laptop"]["packet_filter"] == []
    assert second["accepted"] is False
    assert second["error"] == 'action="deny" is not supported'
    # A rejected policy leaves the default (allow-all) policy in force.
    assert set(second["nodes"]["web"]["peers"]) == {"laptop"}


def test_nodes_are_numbered_by_creation_time() -> None:
    from cli.policy_evaluate import build_tailnet

    nodes = {
        "laptop": {**LAPTOP, "created": "2026-01-02T00:00:00Z"},
        "web": {**WEB, "created": "2026-01-01T00:00:00Z"},
    }
    tailnet = build_tailnet({**CASE, "nodes": nodes})
    assert [n.node.name for n in tailnet.iter_nodes()] == ["web", "laptop"]


def test_creation_times_compare_as_times_not_text() -> None:
    from cli.policy_evaluate import build_tailnet

    # Go drops trailing zeros: ".5Z" is later than ".45Z" though it sorts first as text,
    # and an offset is honoured.
    times = {
        "a": "2026-01-01T00:00:00.5Z",
        "b": "2026-01-01T00:00:00.45Z",
        "c": "2026-01-01T01:00:00.4+02:00",
    }
    nodes = {
        name: {**LAPTOP, "ipv4": f"100.64.0.{i}", "ipv6": f"fd7a:115c:a1e0::{i}", "created": t}
        for i, (name, t) in enumerate(times.items(), start=1)
    }
    tailnet = build_tailnet({**CASE, "nodes": nodes})
    assert [n.node.name for n in tailnet.iter_nodes()] == ["c", "b", "a"]


def test_malformed_creation_time_fails_the_case(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**CASE, "nodes": {"laptop": {**LAPTOP, "created": "yesterday"}}}))
    out = io.StringIO()
    assert evaluate_main([str(bad)], out) == 1
    assert "created" in json.loads(out.getvalue())["error"]


def test_unreadable_case_fails_the_run(tmp_path: Path) -> None:
    out = io.StringIO()
    assert evaluate_main([str(tmp_path / "missing.json")], out) == 1
    assert json.loads(out.getvalue())["id"] is None


@pytest.mark.skipif(not CONFORMANCE_DIR.is_dir(), reason="conformance cases not available")
def test_evaluate_a_real_case() -> None:
    out = io.StringIO()
    path = CONFORMANCE_DIR / "acl" / "acl-a01.json"
    assert evaluate_main([str(path)], out) == 0
    result = json.loads(out.getvalue())
    assert result["id"] == "acl-a01"
    assert result["accepted"] is True
    assert len(result["nodes"]) == 8


def test_bench_runs_on_a_small_tailnet(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_policy_main(["--nodes", "60", "--users", "6", "--tags", "5", "--rules", "20"]) == 0
    text = capsys.readouterr().out
    for label in (
        "full compile",
        "node joins: incremental compile",
        "node joins: full recompile + netmap",
    ):
        assert label in text
