"""Actors that name a person: reasons on admin commands, a group admin socket."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.accounts import NOBODY, NOGROUP, as_other_account
from tests.support.ledger import log_head

from .server_process import RunningServer, running_server


def _events(server: RunningServer, after: int = 0) -> list[dict[str, object]]:
    out = server.cli("log", "show", "-o", "json", "--after", str(after), "--limit", "1000", check=True).stdout
    events: list[dict[str, object]] = json.loads(out)
    return events




@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("srv") / "data") as srv:
        yield srv


def test_reason_is_stored_with_each_event_and_shown(server: RunningServer) -> None:
    before = log_head(server.data)
    server.cli("users", "create", "rita", "--reason", "onboarding, ticket OPS-12", check=True)
    server.cli("preauthkeys", "create", "-u", "rita", "--reason", "laptop setup", check=True)
    server.cli("users", "create", "sam", check=True)
    events = _events(server, before)
    assert [(e["type"], e["reason"]) for e in events] == [
        ("user.created", "onboarding, ticket OPS-12"),
        ("preauthkey.created", "laptop setup"),
        ("user.created", ""),
    ]
    assert len({e["correlation_id"] for e in events}) == 3
    table = server.cli("log", "show", "--after", str(before), check=True).stdout
    assert 'reason="onboarding, ticket OPS-12"' in table


def test_a_reason_that_cannot_be_stored_is_refused_and_appends_nothing(server: RunningServer) -> None:
    before = log_head(server.data)
    result = server.cli("users", "create", "tom", "--reason", "x" * 2000)
    assert result.returncode == 1
    assert "--reason" in result.stderr and "longer than 1000" in result.stderr
    assert log_head(server.data) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second account")
def test_a_group_member_is_recorded_under_their_own_account(tmp_path: Path) -> None:
    # The socket's directories must be reachable by the other account (tmp_path is not).
    base = Path(tempfile.mkdtemp(prefix="tl-admin-"))
    base.chmod(0o711)
    sock = base / "run" / "admin.sock"
    env = {"TAILLEDGER_ADMIN_SOCKET": str(sock), "TAILLEDGER_ADMIN__SOCKET_GROUP": "nogroup"}
    try:
        with running_server(tmp_path / "data", extra_env=env) as server:
            assert (sock.stat().st_mode & 0o777, sock.stat().st_gid) == (0o660, NOGROUP)
            assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
            server.cli("users", "create", "ops", check=True)
            before = log_head(server.data)
            child_env = {"TAILLEDGER_ADMIN_SOCKET": str(sock), "TAILLEDGER_DATA": str(server.data)}
            code, _out, err = as_other_account(
                ["users", "create", "vera", "--reason", "new hire"], child_env, NOBODY, NOGROUP
            )
            assert code == 0, err
            # Not in the group: the socket refuses, nothing is appended.
            code, _out, err = as_other_account(["users", "create", "eve"], child_env, NOBODY, 4242)
            assert code == 1 and "permission denied" in err
            events = _events(server, before)
            assert [(e["actor"], e["reason"]) for e in events] == [("admin:nobody", "new hire")]
    finally:
        sock.unlink(missing_ok=True)
        (base / "run").rmdir()
        base.rmdir()


def test_a_group_socket_inside_the_private_data_directory_is_refused(tmp_path: Path) -> None:
    from cli.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data directory is private"):
        load_config(None, {"TAILLEDGER_DATA": str(tmp_path), "TAILLEDGER_ADMIN__SOCKET_GROUP": "nogroup"})
    with pytest.raises(ConfigError, match="no Unix group"):
        load_config(None, {"TAILLEDGER_DATA": str(tmp_path), "TAILLEDGER_ADMIN_SOCKET": "/run/x.sock",
                           "TAILLEDGER_ADMIN__SOCKET_GROUP": "no-such-group-here"})
