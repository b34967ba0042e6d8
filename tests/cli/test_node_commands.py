"""Node commands on nodes that registered over the real protocol with a running server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from protocol import open_control_client
from tests.protocol.control_harness import SimNode

from .server_process import RunningServer, running_server


async def _register(server: RunningServer, key: str, hostname: str) -> SimNode:
    node = SimNode.new(hostname)
    async with open_control_client("127.0.0.1", server.port, machine_key=node.machine_private) as client:
        resp = await client.register(node.register_request(key))
    assert resp.error == "", resp.error
    return node


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "data") as srv:
        yield srv


async def test_nodes_list_rename_tag_expire_delete(server: RunningServer) -> None:
    run = server.cli
    run("users", "create", "alice", check=True)
    key = run("preauthkeys", "create", "-u", "alice", "--reusable", check=True).stdout.strip()
    await _register(server, key, "web-1")
    await _register(server, key, "Web 1")  # sanitized and de-duplicated: web-1-1
    nodes = json.loads(await trio.to_thread.run_sync(lambda: run("nodes", "list", "-o", "json", check=True).stdout))
    assert [n["name"] for n in nodes] == ["web-1", "web-1-1"]
    assert [n["ipv4"] for n in nodes] == ["100.64.0.1", "100.64.0.2"]
    assert all(n["user"] == "alice" and n["online"] is False for n in nodes)
    table = run("nodes", "list", check=True).stdout
    assert "web-1-1" in table and "100.64.0.2" in table and "Online" in table

    assert json.loads(run("nodes", "rename", "web-1-1", "db", "-o", "json", check=True).stdout)["name"] == "db"
    bad = run("nodes", "rename", "db", "web-1")
    assert bad.returncode == 1 and "already named" in bad.stderr
    bad = run("nodes", "rename", "db", "Not A Label")
    assert bad.returncode == 1 and "invalid node name" in bad.stderr

    policy = server.data.parent / "tags.hujson"
    policy.write_text('{"tagOwners": {"tag:db": ["alice@"], "tag:prod": []}}')
    run("policy", "set", str(policy), check=True)
    tagged = json.loads(run("nodes", "tag", "db", "--tags", "tag:db,tag:prod", "-o", "json", check=True).stdout)
    assert tagged["tags"] == ["tag:db", "tag:prod"]
    assert run("nodes", "tag", "db", "--tags", "db").returncode == 1

    expired = json.loads(run("nodes", "expire", "web-1", "-o", "json", check=True).stdout)
    assert expired["expired"] is True

    run("nodes", "delete", "db", check=True)
    nodes = json.loads(run("nodes", "list", "-o", "json").stdout)
    assert [n["name"] for n in nodes] == ["web-1"]

    log = json.loads(run("log", "show", "--type", "node.", "-o", "json", check=True).stdout)
    types = [e["type"] for e in log]
    assert types.count("node.registered") == 2
    assert {"node.renamed", "node.tags_set", "node.expiry_set", "node.deleted"} <= set(types)
    registered = [e for e in log if e["type"] == "node.registered"]
    assert all(e["actor"].startswith("node:") for e in registered)
    admin_events = [e for e in log if e["type"] in ("node.renamed", "node.deleted")]
    assert all(e["actor"].startswith("admin:") for e in admin_events)


async def test_restart_keeps_state_and_uses_the_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_server(data) as server:
        server.cli("users", "create", "alice", check=True)
        key = server.cli("preauthkeys", "create", "-u", "alice", check=True).stdout.strip()
        await _register(server, key, "box")
        before = server.cli("nodes", "list", "-o", "json", check=True).stdout
    assert (data / "checkpoints.db").exists()
    with running_server(data) as server:
        after = server.cli("nodes", "list", "-o", "json", check=True).stdout
        assert json.loads(after)[0]["name"] == json.loads(before)[0]["name"]
        assert "loaded checkpoint" in server.log_text()
        assert server.cli("log", "verify", check=True).returncode == 0
