"""``tailledger apikeys`` and ``oauth-clients`` against a real server: the secret is
printed once, the log holds only its hash, bad input changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.cli.server_process import RunningServer, running_server
from tests.support.ledger import log_head


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("srv") / "data") as srv:
        srv.cli("users", "create", "alice", check=True)
        srv.cli("users", "create", "bob", check=True)
        yield srv





def test_apikeys_create_list_expire_delete(server: RunningServer) -> None:
    key = server.cli("apikeys", "create", "--user", "bob", "--role", "member", "--description", "ci", check=True).stdout.strip()
    assert key.startswith("tlkey-api-")
    prefix = key.split("-")[2]
    secret = key.split("-", 3)[3]
    listed = json.loads(server.cli("apikeys", "list", "-o", "json", check=True).stdout)
    [row] = [k for k in listed if k["prefix"] == prefix]
    assert (row["user"], row["role"], row["expired"], row["description"]) == ("bob", "member", False, "ci")
    assert "key" not in row
    db = b"".join(p.read_bytes() for p in server.data.glob("ledger.db*"))  # with its WAL
    assert prefix.encode() in db and secret.encode() not in db
    server.cli("apikeys", "expire", prefix, check=True)
    listed = json.loads(server.cli("apikeys", "list", "-o", "json", check=True).stdout)
    assert [k["expired"] for k in listed if k["prefix"] == prefix] == [True]
    assert "deleted" in server.cli("apikeys", "delete", prefix, check=True).stdout
    listed = json.loads(server.cli("apikeys", "list", "-o", "json", check=True).stdout)
    assert prefix not in {k["prefix"] for k in listed}


def test_oauth_clients_create_list_delete(server: RunningServer) -> None:
    secret = server.cli("oauth-clients", "create", "--scopes", "devices:core,auth_keys", check=True).stdout.strip()
    assert secret.startswith("tlkey-client-")
    client_id = secret.split("-")[2]
    listed = json.loads(server.cli("oauth-clients", "list", "-o", "json", check=True).stdout)
    [row] = [k for k in listed if k["prefix"] == client_id]
    assert row["scopes"] == ["auth_keys", "devices:core"]
    server.cli("oauth-clients", "delete", client_id, check=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("apikeys", "create", "--role", "member"), "acts for a user"),
        (("apikeys", "create", "--user", "bob"), "an admin key needs an admin or owner"),
        (("apikeys", "create", "--user", "ghost"), "not found"),
        (("apikeys", "create", "-e", "soon"), "malformed duration"),
        (("apikeys", "expire", "nope"), "not found"),
        (("apikeys", "delete", "nope"), "not found"),
        (("oauth-clients", "create", "--scopes", "root"), "unknown scope"),
        (("oauth-clients", "delete", "nope"), "not found"),
    ],
)
def test_bad_input_is_refused_and_appends_nothing(
    server: RunningServer, args: tuple[str, ...], message: str
) -> None:
    before = log_head(server.data)
    result = server.cli(*args)
    assert result.returncode == 1, result.stdout
    assert message in result.stderr
    assert log_head(server.data) == before
