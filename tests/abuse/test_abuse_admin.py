"""Admin-side crashes (issue 14, item 6), against a real running server.

Whatever an operator sends over the admin socket, and whatever goes wrong inside an
admin operation, fails that one request or connection with an error answer; the
server goes on serving. A policy file that cannot be loaded at start-up leaves the
last good policy from the log in force, and says so, instead of stopping ``serve``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cli.server_process import RunningServer, running_server
from tests.support.waits import wait_until_sync

from .helpers import assert_serving, raw_request

DEEP = 100_000

GOOD = """{
  // everyone reaches ssh only
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}],
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("abuse") / "data") as srv:
        yield srv


def test_policy_check_of_100000_nested_brackets_is_a_syntax_error_with_position(
    server: RunningServer, tmp_path: Path
) -> None:
    deep = tmp_path / "deep.hujson"
    deep.write_text("[" * DEEP + "]" * DEEP)
    for action in ("check", "set"):
        result = server.cli("policy", action, str(deep))
        assert result.returncode == 1, result.stdout
        assert "1:101: invalid HuJSON: nesting deeper than 100 levels" in result.stderr, result.stderr
        assert_serving(server)
    # Inside an object, on a later line, the position follows.
    deep.write_text('{\n  "grants": ' + "[" * DEEP)
    result = server.cli("policy", "check", str(deep))
    assert result.returncode == 1
    assert "2:112: invalid HuJSON: nesting deeper" in result.stderr, result.stderr
    assert_serving(server)


def test_a_deeply_nested_request_line_gets_an_error_answer(server: RunningServer) -> None:
    line = b'{"op": "users.list", "args": {"x": ' + b"[" * DEEP + b"]" * DEEP + b"}}"
    answer = raw_request(server, line)
    assert answer["ok"] is False
    assert "malformed request" in str(answer["error"])
    assert_serving(server)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        # str.isdigit() accepts a superscript two; int() refuses it.
        ({"op": "nodes.show", "args": {"node": "\u00b2"}}, "not found"),
        ({"op": "users.delete", "args": {"user": "\u00b2"}}, "not found"),
        ({"op": "nodes.list", "args": {"user": "1" * 5000}}, "not found"),
        # Past what a datetime can hold.
        (
            {"op": "preauthkeys.create", "args": {"tags": ["tag:x"], "expiration_seconds": 10**17}},
            "too far in the future",
        ),
    ],
)
def test_requests_that_broke_an_operation_are_refused_and_the_server_stays_up(
    server: RunningServer, request_: dict[str, object], message: str
) -> None:
    answer = raw_request(server, json.dumps(request_).encode())
    assert answer["ok"] is False
    assert message in str(answer["error"]), answer
    assert_serving(server)


def test_garbage_and_oversized_lines_are_answered(server: RunningServer) -> None:
    for line in (b"\xff\xfe", b"[]", b'{"op": 1}', b'{"op": "nope"}', b'{"op": "users.list", "args": []}'):
        assert raw_request(server, line)["ok"] is False
    answer = raw_request(server, b'{"op": "policy.check", "args": {"text": "' + b"a" * (2 << 20) + b'"}}')
    assert answer == {"ok": False, "error": "request too large"}
    assert_serving(server)


def _wait_for(predicate: Callable[[], bool], what: str, server: RunningServer) -> None:
    wait_until_sync(predicate, what=what, seconds=20, detail=lambda: server.log_text()[-3000:])


@pytest.mark.parametrize(
    "bad_text",
    [
        pytest.param("[" * DEEP + "]" * DEEP, id="100000-nested"),
        pytest.param("{'acls': []}", id="json5"),
        pytest.param('{"acls": [{"action": "accept", "src": ["group:nobody"], "dst": ["*:*"]}]}', id="invalid"),
    ],
)
def test_policy_file_mode_bad_file_at_start_up_keeps_the_last_good_policy(tmp_path: Path, bad_text: str) -> None:
    policy = tmp_path / "policy.hujson"
    policy.write_text(GOOD)
    env = {"TAILLEDGER_POLICY__MODE": "file", "TAILLEDGER_POLICY__PATH": str(policy)}
    data = tmp_path / "data"
    with running_server(data, extra_env=env) as server:
        assert server.cli("policy", "get", check=True).stdout.strip() == GOOD.strip()
    policy.write_text(bad_text)
    with running_server(data, extra_env=env) as server:
        # It starts, serves, and keeps the policy the log holds...
        assert_serving(server)
        assert server.cli("policy", "get", check=True).stdout.strip() == GOOD.strip()
        # ...and says so loudly.
        _wait_for(lambda: "POLICY FILE NOT LOADED at start-up" in server.log_text(), "the warning", server)
        warning = next(line for line in server.log_text().splitlines() if "POLICY FILE NOT LOADED" in line)
        assert " WARNING " in warning
        assert "the last good policy from the log stays in force" in warning
        # A good file later is still picked up.
        policy.write_text(GOOD.replace("22", "443"))
        _wait_for(
            lambda: "443" in server.cli("policy", "get").stdout, "the reload of a fixed file", server
        )
