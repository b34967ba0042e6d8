"""End to end: a node joins a running server over the real control protocol, an operator
from a second account (group admin socket) tags it with a reason, and ``replay diff``
-- run on the live data directory, read-only -- names that account and that reason."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import trio

from tests.support.accounts import NOBODY, NOGROUP
from tests.support.accounts import as_other_account as _as_other_account
from tests.support.ledger import log_head

from .server_process import running_server
from .test_node_commands import _register


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second account")
def test_replay_diff_names_the_operator_and_the_reason(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="tl-admin-"))
    base.chmod(0o711)
    sock = base / "run" / "admin.sock"
    env = {"TAILLEDGER_ADMIN_SOCKET": str(sock), "TAILLEDGER_ADMIN__SOCKET_GROUP": "nogroup"}
    try:
        with running_server(tmp_path / "data", extra_env=env) as server:
            run = server.cli
            run("users", "create", "alice", check=True)
            key = run("preauthkeys", "create", "-u", "alice", check=True).stdout.strip()
            trio.run(_register, server, key, "build-box")
            policy = tmp_path / "policy.hujson"  # nodes tag needs the tag defined in tagOwners
            policy.write_text('{"tagOwners": {"tag:ci": ["alice@"]}}')
            run("policy", "set", str(policy), check=True)
            before = log_head(server.data)
            child_env = {"TAILLEDGER_ADMIN_SOCKET": str(sock), "TAILLEDGER_DATA": str(server.data)}
            code, _out, err = _as_other_account(
                ["nodes", "tag", "build-box", "-t", "tag:ci", "--reason", "INC-9 isolate the box"],
                child_env, NOBODY, NOGROUP,
            )
            assert code == 0, err
            files = sorted(p.name for p in server.data.iterdir())
            out = run("replay", "diff", "--from", str(before), "-o", "json", "--no-cache", check=True).stdout
            diff = json.loads(out)
            [node] = diff["nodes"]
            assert node["node"] == "build-box" and node["changes"] == ["retagged [] -> ['tag:ci']"]
            [cause] = node["events"]
            assert cause["actor"] == "admin:nobody" and cause["reason"] == "INC-9 isolate the box"
            assert cause["type"] == "node.tags_set" and cause["correlation_id"]
            table = run("replay", "diff", "--from", str(before), "--no-cache", check=True).stdout
            assert "admin:nobody (INC-9 isolate the box)" in table
            assert sorted(p.name for p in server.data.iterdir()) == files  # replay wrote nothing
    finally:
        sock.unlink(missing_ok=True)
        if (base / "run").exists():
            (base / "run").rmdir()
        base.rmdir()
