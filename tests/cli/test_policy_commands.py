"""Policy modes against a real server: database (``policy set``) and file (reload on
change and on SIGHUP); invalid policies are refused with their error and change nothing."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.support.waits import wait_until_sync

from .server_process import RunningServer, running_server

GOOD = """{
  // admins reach everything
  "groups": {"group:admins": ["alice@"]},
  "acls": [{"action": "accept", "src": ["group:admins"], "dst": ["*:*"]}],
}"""
BAD_SYNTAX = '{"acls": [\n  {"action": "accept", "src": ["*"] "dst": ["*:*"]}\n]}'
UNDEFINED_GROUP = '{"acls": [{"action": "accept", "src": ["group:nobody"], "dst": ["*:*"]}]}'
FAILING_TEST = """{
  "acls": [{"action": "accept", "src": ["alice@"], "dst": ["*:22"]}],
  "tests": [{"src": "alice@", "accept": ["100.64.0.1:80"]}]
}"""


def _policy_events(server: RunningServer) -> list[dict[str, object]]:
    out = server.cli("log", "show", "--type", "policy.", "-o", "json", check=True).stdout
    events: list[dict[str, object]] = json.loads(out)
    return events


def test_policy_set_get_check_and_refusals(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        server.cli("users", "create", "alice", check=True)
        assert "allow-all" in server.cli("policy", "get", check=True).stdout
        for name, text, message in (
            ("syntax.hujson", BAD_SYNTAX, "2:"),
            ("group.hujson", UNDEFINED_GROUP, "group:nobody"),
            ("tests.hujson", FAILING_TEST, "test(s) failed"),
        ):
            f = tmp_path / name
            f.write_text(text)
            for action in ("check", "set"):
                result = server.cli("policy", action, str(f))
                assert result.returncode == 1, result.stdout
                assert message in result.stderr, result.stderr
        assert _policy_events(server) == []

        good = tmp_path / "good.hujson"
        good.write_text(GOOD)
        assert "policy OK" in server.cli("policy", "check", str(good), check=True).stdout
        assert _policy_events(server) == []
        assert "policy set" in server.cli("policy", "set", str(good), check=True).stdout
        assert "unchanged" in server.cli("policy", "set", str(good), check=True).stdout
        assert server.cli("policy", "get", check=True).stdout.strip() == GOOD.strip()
        [event] = _policy_events(server)
        assert event["event"]["text"] == GOOD  # type: ignore[index]
        assert str(event["actor"]).startswith("admin:")
        # A refused policy leaves the previous one in force.
        bad = tmp_path / "group.hujson"
        assert server.cli("policy", "set", str(bad)).returncode == 1
        assert server.cli("policy", "get", check=True).stdout.strip() == GOOD.strip()


def test_policy_file_mode_reloads_on_change_and_sighup(tmp_path: Path) -> None:
    policy = tmp_path / "policy.hujson"
    policy.write_text(GOOD)
    env = {"TAILLEDGER_POLICY__MODE": "file", "TAILLEDGER_POLICY__PATH": str(policy)}
    with running_server(tmp_path / "data", extra_env=env) as server:
        [first] = _policy_events(server)
        assert first["actor"] == f"system:policy-file:{policy}"
        # policy set is refused in file mode.
        other = tmp_path / "other.hujson"
        other.write_text(GOOD.replace("admins", "ops"))
        refused = server.cli("policy", "set", str(other))
        assert refused.returncode == 1 and "read from a file" in refused.stderr

        # An invalid edit is refused and logged; the old policy stays.
        policy.write_text(UNDEFINED_GROUP)
        wait_until_sync(lambda: "refused" in server.log_text(), what="the refusal", detail=server.log_text)
        assert "group:nobody" in server.log_text()
        assert len(_policy_events(server)) == 1

        # A valid edit is picked up (mtime polling) ...
        second = GOOD.replace("group:admins", "group:ops")
        policy.write_text(second)
        wait_until_sync(lambda: len(_policy_events(server)) == 2, what="the edit picked up", detail=server.log_text)
        assert _policy_events(server)[-1]["event"]["text"] == second  # type: ignore[index]

        # ... and SIGHUP forces a reload at once (same size, same mtime second).
        third = second.replace("group:ops", "group:dev")
        policy.write_text(third)
        server.proc.send_signal(signal.SIGHUP)
        wait_until_sync(lambda: len(_policy_events(server)) == 3, what="the reload on SIGHUP", detail=server.log_text)
        assert _policy_events(server)[-1]["event"]["text"] == third  # type: ignore[index]
