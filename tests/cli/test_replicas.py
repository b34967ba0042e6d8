"""Two ``tailledger serve`` replicas on one PostgreSQL log: a change through either is
seen by both, one of them runs the run-once jobs, and both wait out a crash of the
database without losing an acknowledged change."""

from __future__ import annotations

import http.client
import json
import signal
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pytest

from tests.pgserver import PgServer
from tests.support.waits import wait_until_sync

from .server_process import RunningServer, running_server


def _eventually(check: Callable[[], bool], what: str, *servers: RunningServer) -> None:
    def logs() -> str:
        return "".join(f"\n--- {s.data.name}:\n{s.log_text()[-3000:]}" for s in servers)

    # At most a minute: a guard against hanging, not a timing assertion.
    wait_until_sync(check, what=what, seconds=60, detail=logs)


def _health(server: RunningServer) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body else {}
    except (OSError, http.client.HTTPException, ValueError):  # not listening yet, or cut off
        return 0, {}
    finally:
        conn.close()


def _unavailable(server: RunningServer) -> bool:
    status, body = _health(server)
    return status == 503 and body.get("status") == "database-unavailable"


def _healthy(server: RunningServer) -> bool:
    return _health(server)[0] == 200


def _users(server: RunningServer) -> set[str]:
    result = server.cli("users", "list", "-o", "json")
    return {u["name"] for u in json.loads(result.stdout)} if result.returncode == 0 else set()


@pytest.fixture
def replicas(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    env = {
        "TAILLEDGER_DATABASE__TYPE": "postgres",
        "TAILLEDGER_DATABASE__DSN": pg_dsn,
        # One signing key for the whole deployment: every replica's checkpoints verify.
        "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(tmp_path / "signing.key"),
    }
    with ExitStack() as stack:
        a = stack.enter_context(running_server(tmp_path / "a", extra_env=env))
        _eventually(lambda: _health(a)[0] == 200, "replica a is healthy")
        b = stack.enter_context(running_server(tmp_path / "b", extra_env=env))
        _eventually(lambda: _health(b)[0] == 200, "replica b is healthy")
        yield a, b


def test_a_change_through_either_replica_reaches_both(replicas: tuple[RunningServer, RunningServer]) -> None:
    a, b = replicas
    a.cli("users", "create", "alice", check=True)
    _eventually(lambda: "alice" in _users(b), "b sees a's user")
    b.cli("users", "create", "bob", check=True)
    _eventually(lambda: _users(a) == {"alice", "bob"}, "a sees b's user")
    assert _health(a)[1]["log_seq"] == _health(b)[1]["log_seq"]


def test_the_leader_dies_and_the_other_replica_takes_over(replicas: tuple[RunningServer, RunningServer]) -> None:
    a, b = replicas
    assert "now runs the run-once jobs" in a.log_text()  # a started first: it leads
    assert "now runs the run-once jobs" not in b.log_text()
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    _eventually(lambda: "now runs the run-once jobs" in b.log_text(), "b takes over")
    b.cli("users", "create", "carol", check=True)
    assert "carol" in _users(b)


def test_replicas_wait_out_a_database_crash(
    pg_server: PgServer, replicas: tuple[RunningServer, RunningServer]
) -> None:
    a, b = replicas
    a.cli("users", "create", "before", check=True)
    _eventually(lambda: "before" in _users(b), "b sees the first user")
    pg_server.kill()
    try:
        for server in (a, b):
            _eventually(partial(_unavailable, server), "the replica reports the database unavailable", server)
        refused = a.cli("users", "create", "during")
        assert refused.returncode != 0  # not acknowledged
    finally:
        pg_server.start()
    for server in (a, b):
        _eventually(partial(_healthy, server), "the replica recovers", server)
        assert server.proc.poll() is None
    b.cli("users", "create", "after", check=True)
    _eventually(lambda: {"before", "after"} <= _users(a), "a sees every acknowledged user")
    assert "during" not in _users(b)
    assert a.cli("log", "verify").returncode == 0
