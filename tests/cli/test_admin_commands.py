"""The admin CLI against a real running server: tables, JSON, clear refusals, nothing
appended on bad input, and every change recorded with the operator as its actor."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ledger import log_head

from .server_process import RunningServer, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("srv") / "data") as srv:
        yield srv




def test_users_lifecycle_with_tables_and_json(server: RunningServer) -> None:
    out = server.cli("users", "create", "carol", "--email", "carol@example.com", check=True).stdout
    assert "carol" in out and "Display name" in out
    listed = json.loads(server.cli("users", "list", "-o", "json", check=True).stdout)
    assert [u["name"] for u in listed if u["name"] == "carol"] == ["carol"]
    server.cli("users", "rename", "carol", "caroline", check=True)
    names = {u["name"] for u in json.loads(server.cli("users", "list", "-o", "json").stdout)}
    assert "caroline" in names and "carol" not in names
    assert "deleted" in server.cli("users", "delete", "caroline", check=True).stdout


def test_routes_list_shows_a_table(server: RunningServer) -> None:
    out = server.cli("routes", "list", check=True).stdout
    assert out.split()[:6] == ["ID", "Node", "Advertised", "Approved", "Primary", "Exit"]
    assert json.loads(server.cli("routes", "list", "-o", "json", check=True).stdout) == []


def test_roles_are_set_on_create_and_changed_with_set_role(server: RunningServer) -> None:
    made = json.loads(server.cli("users", "create", "rolly", "--role", "admin", "-o", "json", check=True).stdout)
    assert made["role"] == "admin"
    changed = json.loads(server.cli("users", "set-role", "rolly", "member", "-o", "json", check=True).stdout)
    assert changed["role"] == "member"
    assert "Role" in server.cli("users", "list", check=True).stdout
    shown = server.cli("log", "show", "--type", "user.role_set", "-o", "json", check=True).stdout
    assert '"role": "member"' in shown or '"role":"member"' in shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("users", "create", "dup"), "already exists"),
        (("users", "create", "bad name!"), "invalid user name"),
        (("users", "rename", "ghost", "x"), "not found"),
        (("routes", "approve", "404", "10.0.0.0/24"), "not found"),
        (("routes", "reject", "404", "10.0.0.0/24"), "not found"),
        (("users", "delete", "ghost"), "not found"),
        (("users", "set-role", "ghost", "admin"), "not found"),
        (("users", "set-role", "dup", "member"), "already has the role"),
        (("preauthkeys", "create", "-u", "ghost"), "not found"),
        (("preauthkeys", "create", "-u", "dup", "-e", "soon"), "malformed duration"),
        (("preauthkeys", "create", "-u", "dup", "--tags", "web"), "invalid tag"),
        (("preauthkeys", "create"), "needs a user, or tags"),
        (("preauthkeys", "expire", "nope"), "not found"),
        (("nodes", "delete", "nonexistent"), "not found"),
        (("nodes", "rename", "404", "x"), "not found"),
    ],
)
def test_bad_input_is_refused_clearly_and_appends_nothing(
    server: RunningServer, args: tuple[str, ...], message: str
) -> None:
    if server.cli("users", "list", "-o", "json").stdout.count('"dup"') == 0:
        server.cli("users", "create", "dup", check=True)
    before = log_head(server.data)
    result = server.cli(*args)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.startswith("tailledger: ")
    assert log_head(server.data) == before


def test_preauth_keys_create_list_expire(server: RunningServer) -> None:
    server.cli("users", "create", "keyowner", check=True)
    key = server.cli("preauthkeys", "create", "-u", "keyowner", "--reusable", "--tags", "tag:ci", "-e", "2h", check=True).stdout.strip()
    assert key.startswith("tlkey-auth-")
    keys = json.loads(server.cli("preauthkeys", "list", "-u", "keyowner", "-o", "json").stdout)
    assert len(keys) == 1 and keys[0]["reusable"] and keys[0]["tags"] == ["tag:ci"]
    assert not keys[0]["expired"] and keys[0]["prefix"] in key
    assert "key" not in keys[0]  # the secret is shown once, never listed
    server.cli("preauthkeys", "expire", key, check=True)
    keys = json.loads(server.cli("preauthkeys", "list", "-u", "keyowner", "-o", "json").stdout)
    assert keys[0]["expired"]
    again = server.cli("preauthkeys", "expire", keys[0]["prefix"])
    assert again.returncode == 1 and "already expired" in again.stderr


def test_changes_are_recorded_with_the_operator_as_actor(server: RunningServer) -> None:
    server.cli("users", "create", "audited", check=True)
    events = json.loads(server.cli("log", "show", "--type", "user.created", "--limit", "1000", "-o", "json").stdout)
    mine = [e for e in events if e["event"]["name"] == "audited"]
    assert len(mine) == 1
    assert mine[0]["actor"].startswith("admin:")
    assert server.cli("log", "verify", check=True).stdout.startswith("OK")


def test_commands_without_a_server_explain_what_to_do(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {"TAILLEDGER_DATA": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "cli", "users", "list"], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "no tailledger server is running" in result.stderr


def test_log_verify_catches_an_edited_row(server: RunningServer, tmp_path: Path) -> None:
    import shutil
    import sqlite3
    import subprocess
    import sys

    server.cli("users", "create", "victim", check=True)
    copy = tmp_path / "copy"
    copy.mkdir()
    # Copy the live database (and its WAL) and forge one event in the copy.
    src = sqlite3.connect(server.data / "ledger.db")
    dst = sqlite3.connect(copy / "ledger.db")
    src.backup(dst)
    src.close()
    dst.execute("DROP TRIGGER events_no_update")
    seq = dst.execute("SELECT seq FROM events WHERE type = 'user.created' ORDER BY seq LIMIT 1").fetchone()[0]
    dst.execute("UPDATE events SET actor_id = 'nobody' WHERE seq = ?", (seq,))
    dst.commit()
    dst.close()
    env = {"TAILLEDGER_DATA": str(copy), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "cli", "log", "verify"], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert f"BROKEN at event {seq}" in result.stdout
    assert shutil.which("true")


def test_log_tail_follows_new_events(server: RunningServer) -> None:
    import subprocess
    import sys

    # Start after the current head explicitly: a tail that starts "at the head" would
    # race with the append below (a loaded machine starts it late, and it waits forever).
    head = log_head(server.data)
    tail = subprocess.Popen(
        [sys.executable, "-m", "cli", "log", "tail", "--after", str(head), "--type", "user.", "-o", "json"],
        env=server.env, stdout=subprocess.PIPE, text=True,
    )
    try:
        server.cli("users", "create", "followed", check=True)
        assert tail.stdout is not None
        line = tail.stdout.readline()
        event = json.loads(line)
        assert event["type"] == "user.created" and event["event"]["name"] == "followed"
    finally:
        tail.terminate()
        tail.wait(10)
        if tail.stdout is not None:
            tail.stdout.close()
