"""``nodes tag`` against a real server: each tag must be defined in the policy's
tagOwners (the answer names the rule; an admin need not own the tag), and a node
registered with a tags-only key keeps a user only if ``--user`` names one."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import trio

from tests.support.ledger import log_head, recorded

from .server_process import RunningServer, running_server
from .test_node_commands import _register

POLICY = """{
  "tagOwners": {
    "tag:web": ["bob@"],
    "tag:ci": [],
  },
}"""


def _events(server: RunningServer, type_: str) -> list[dict[str, object]]:
    return [msgspec.to_builtins(e.event) for e in recorded(server.data) if e.type == type_]




async def test_tags_must_be_defined_in_tag_owners_and_the_rule_is_named(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        run = server.cli
        run("users", "create", "alice", check=True)
        key = run("preauthkeys", "create", "-u", "alice", check=True).stdout.strip()
        await _register(server, key, "box")

        before = log_head(server.data)
        refused = await trio.to_thread.run_sync(lambda: run("nodes", "tag", "box", "--tags", "tag:web"))
        assert refused.returncode == 1
        assert "tag 'tag:web' is not defined in a policy (none is set)" in refused.stderr
        assert log_head(server.data) == before

        policy = tmp_path / "policy.hujson"
        policy.write_text(POLICY)
        run("policy", "set", str(policy), check=True)
        before = log_head(server.data)
        refused = await trio.to_thread.run_sync(lambda: run("nodes", "tag", "box", "--tags", "tag:web,tag:nope"))
        assert refused.returncode == 1
        assert "tag 'tag:nope' is not defined in the policy's tagOwners" in refused.stderr
        assert log_head(server.data) == before

        # The operator (not bob) may set tag:web: an admin needs no ownership.
        out = await trio.to_thread.run_sync(lambda: run("nodes", "tag", "box", "--tags", "tag:web,tag:ci", check=True))
        assert 'tag:web: allowed by tagOwners["tag:web"] (policy line 3): owned by bob@' in out.stdout
        assert 'tag:ci: allowed by tagOwners["tag:ci"] (policy line 4): owned by nobody' in out.stdout
        shown = json.loads(run("nodes", "show", "box", "-o", "json", check=True).stdout)
        assert shown["tags"] == ["tag:ci", "tag:web"]
        as_json = json.loads(run("nodes", "tag", "box", "--tags", "tag:ci", "-o", "json", check=True).stdout)
        assert set(as_json["allowed_by"]) == {"tag:ci"}


async def test_clearing_the_tags_of_a_tags_only_node_needs_a_user(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        run = server.cli
        run("users", "create", "alice", check=True)
        policy = tmp_path / "policy.hujson"
        policy.write_text(POLICY)
        run("policy", "set", str(policy), check=True)
        key = run("preauthkeys", "create", "--tags", "tag:web", check=True).stdout.strip()
        await _register(server, key, "robot")
        node = json.loads(run("nodes", "show", "robot", "-o", "json", check=True).stdout)
        assert node["tags"] == ["tag:web"]

        before = log_head(server.data)
        refused = await trio.to_thread.run_sync(lambda: run("nodes", "tag", "robot", "--tags", ""))
        assert refused.returncode == 1
        assert "registered with a tags-only key and belongs to no user" in refused.stderr
        assert "--user" in refused.stderr
        misplaced = await trio.to_thread.run_sync(lambda: run("nodes", "tag", "robot", "--tags", "tag:ci", "--user", "alice"))
        assert misplaced.returncode == 1 and "only applies when clearing" in misplaced.stderr
        assert log_head(server.data) == before

        cleared = await trio.to_thread.run_sync(
            lambda: run("nodes", "tag", "robot", "--tags", "", "--user", "alice", "-o", "json", check=True)
        )
        node = json.loads(cleared.stdout)
        assert node["tags"] == [] and node["user"] == "alice"
        [event] = _events(server, "node.tags_set")
        assert not event["tags"] and event["user_id"] == 1

    # The new owner survives a restart (the event folds the same way).
    with running_server(tmp_path / "data") as server:
        node = json.loads(server.cli("nodes", "show", "robot", "-o", "json", check=True).stdout)
        assert node["user"] == "alice"
