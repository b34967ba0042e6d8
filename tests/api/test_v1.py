"""``/api/v1`` (Headscale's REST API) against a real server with httpx: every operation,
its permissions, its events and actors, and its refusals (which append nothing)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.ledger import recorded
from tests.support.waits import wait_until_sync

from .conftest import ApiServer, check_against_openapi


def _prefix(key: str) -> str:
    return key.split("-")[2]


def test_users_through_the_api_are_events_with_the_key_as_actor(api: ApiServer) -> None:
    before = api.head()
    with api.client(api.admin_key) as http:
        made = http.post("/api/v1/user", json={"name": "carol", "email": "carol@example.com"})
        assert made.status_code == 200, made.text
        user = made.json()["user"]
        assert (user["name"], user["email"], user["role"]) == ("carol", "carol@example.com", "member")
        renamed = http.post(f"/api/v1/user/{user['id']}/rename/caroline").json()["user"]
        assert renamed["name"] == "caroline"
        listed = http.get("/api/v1/user", params={"name": "caroline"}).json()["users"]
        assert [u["id"] for u in listed] == [user["id"]]
        assert http.delete(f"/api/v1/user/{user['id']}").json() == {}
        assert "caroline" not in {u["name"] for u in http.get("/api/v1/user").json()["users"]}
    actor = f"api:{_prefix(api.admin_key)}"
    assert api.events(before) == [("user.created", actor), ("user.renamed", actor), ("user.deleted", actor)]


def test_nodes_keys_and_policy(api: ApiServer) -> None:
    with api.client(api.admin_key) as http:
        policy = '{"tagOwners": {"tag:web": ["alice@"]}, "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
        set_policy = http.put("/api/v1/policy", json={"policy": policy})
        assert set_policy.status_code == 200, set_policy.text
        got = http.get("/api/v1/policy").json()
        assert got["policy"] == policy and got["updatedAt"] == set_policy.json()["updatedAt"] is not None
        made = http.post("/api/v1/preauthkey", json={"user": "1", "reusable": True})
        assert made.status_code == 200, made.text
        alice_key = made.json()["preAuthKey"]["key"]
        bob_key = http.post("/api/v1/preauthkey", json={"user": "2"}).json()["preAuthKey"]["key"]
    api.register("alice-laptop", alice_key)
    api.register("bob-laptop", bob_key)
    with api.client(api.admin_key) as http:
        nodes = http.get("/api/v1/node").json()["nodes"]
        by_name = {n["givenName"]: n for n in nodes}
        alice_node, bob_node = by_name["alice-laptop"], by_name["bob-laptop"]
        assert alice_node["user"]["name"] == "alice" and alice_node["registerMethod"] == "REGISTER_METHOD_AUTH_KEY"
        assert alice_node["ipAddresses"] and alice_node["machineKey"].startswith("mkey:")
        assert [n["id"] for n in http.get("/api/v1/node", params={"user": "bob"}).json()["nodes"]] == [bob_node["id"]]
        nid = alice_node["id"]
        assert http.get(f"/api/v1/node/{nid}").json()["node"]["id"] == nid
        assert http.post(f"/api/v1/node/{nid}/rename/web-1").json()["node"]["givenName"] == "web-1"
        tagged = http.post(f"/api/v1/node/{nid}/tags", json={"tags": ["tag:web"]})
        assert tagged.status_code == 200, tagged.text
        assert tagged.json()["node"]["tags"] == ["tag:web"]
        routes = http.post(f"/api/v1/node/{nid}/approve_routes", json={"routes": ["10.1.0.0/16"]})
        assert routes.json()["node"]["approvedRoutes"] == ["10.1.0.0/16"]
        expired = http.post(f"/api/v1/node/{nid}/expire").json()["node"]
        assert expired["expiry"] is not None
        keys = http.get("/api/v1/preauthkey", params={"user": "alice"}).json()["preAuthKeys"]
        assert [k["reusable"] for k in keys] == [True] and keys[0]["used"]
        assert "…" in keys[0]["key"]  # the secret is never shown again
        assert http.post("/api/v1/preauthkey/expire", json={"id": keys[0]["id"]}).json() == {}
        assert http.delete(f"/api/v1/node/{nid}").json() == {}
        assert nid not in {n["id"] for n in http.get("/api/v1/node").json()["nodes"]}


def test_member_keys_see_and_change_only_their_own(api: ApiServer) -> None:
    with api.client(api.admin_key) as http:
        key = http.post("/api/v1/preauthkey", json={"user": "1"}).json()["preAuthKey"]["key"]
    api.register("alice-desk", key)
    with api.client(api.admin_key) as http:
        nodes = {n["givenName"]: n["id"] for n in http.get("/api/v1/node").json()["nodes"]}
    before = api.head()
    with api.client(api.member_key) as http:
        mine = http.get("/api/v1/node").json()["nodes"]
        assert {n["user"]["name"] for n in mine} == {"bob"}
        assert http.get(f"/api/v1/node/{nodes['alice-desk']}").status_code == 404
        assert http.post(f"/api/v1/node/{nodes['alice-desk']}/expire").status_code == 404
        assert http.delete(f"/api/v1/node/{nodes['alice-desk']}").status_code == 404
        assert http.post(f"/api/v1/node/{nodes['bob-laptop']}/tags", json={"tags": ["tag:web"]}).status_code == 403
        assert http.put("/api/v1/policy", json={"policy": "{}"}).status_code == 403
        assert http.post("/api/v1/user", json={"name": "eve"}).status_code == 403
        assert http.post("/api/v1/preauthkey", json={"user": "1"}).status_code == 404
        assert http.post("/api/v1/apikey", json={"role": "admin"}).status_code == 403
        assert {k["user"]["name"] for k in http.get("/api/v1/preauthkey").json()["preAuthKeys"]} == {"bob"}
        assert {k["role"] for k in http.get("/api/v1/apikey").json()["apiKeys"]} == {"member"}
        assert api.head() == before
        # Its own: allowed, and recorded with the key and its owner.
        renamed = http.post(f"/api/v1/node/{nodes['bob-laptop']}/rename/bobs")
        assert renamed.status_code == 200, renamed.text
        own_key = http.post("/api/v1/preauthkey", json={})
        assert own_key.json()["preAuthKey"]["user"]["name"] == "bob"
    actor = f"api:{_prefix(api.member_key)}/2"
    assert api.events(before) == [("node.renamed", actor), ("preauthkey.created", actor)]


def test_a_users_role_caps_their_keys_and_a_deleted_user_s_keys_stop(api: ApiServer) -> None:
    srv = api.srv
    srv.cli("users", "create", "dana", "--role", "admin", check=True)
    key = srv.cli("apikeys", "create", "--user", "dana", check=True).stdout.strip()
    with api.client(key) as http:
        assert len(http.get("/api/v1/user").json()["users"]) > 1  # an admin sees everyone
        srv.cli("users", "set-role", "dana", "member", check=True)
        assert [u["name"] for u in http.get("/api/v1/user").json()["users"]] == ["dana"]
        assert http.post("/api/v1/user", json={"name": "eve"}).status_code == 403
        srv.cli("users", "delete", "dana", check=True)
        gone = http.get("/api/v1/user")
        assert gone.status_code == 401 and "no longer exists" in gone.json()["detail"]


def test_the_log_is_the_same_whichever_door(api: ApiServer) -> None:
    """The same changes through the CLI's socket and through the API append the same
    events; only the actor differs."""
    import msgspec


    def payloads(after: int) -> list[dict[str, object]]:
        return [msgspec.to_builtins(r.event) for r in recorded(api.srv.data, after)]

    before = api.head()
    api.srv.cli("users", "create", "door1", "--email", "d@example.com", check=True)
    api.srv.cli("users", "rename", "door1", "door1b", check=True)
    api.srv.cli("users", "delete", "door1b", check=True)
    by_cli = payloads(before)
    before = api.head()
    with api.client(api.admin_key) as http:
        uid = http.post("/api/v1/user", json={"name": "door1", "email": "d@example.com"}).json()["user"]["id"]
        http.post(f"/api/v1/user/{uid}/rename/door1b").raise_for_status()
        http.delete(f"/api/v1/user/{uid}").raise_for_status()
    by_api = payloads(before)
    for a, b in zip(by_cli, by_api, strict=True):
        a.pop("user_id")
        b.pop("user_id")  # a new user, a new id
    assert by_cli == by_api


def test_api_keys_create_expire_delete(api: ApiServer) -> None:
    with api.client(api.admin_key) as http:
        made = http.post("/api/v1/apikey", json={"expiration": "2099-01-01T00:00:00Z"})
        assert made.status_code == 200, made.text
        new_key = made.json()["apiKey"]
    with api.client(new_key) as http:
        assert http.get("/api/v1/user").status_code == 200
        listed = {k["prefix"]: k for k in http.get("/api/v1/apikey").json()["apiKeys"]}
        assert listed[_prefix(new_key)]["expiration"].startswith("2099-01-01")
        assert http.post("/api/v1/apikey/expire", json={"prefix": _prefix(new_key)}).json() == {}
        # Expired, it authenticates nothing, even its own deletion.
        refused = http.delete(f"/api/v1/apikey/{_prefix(new_key)}")
        assert refused.status_code == 401
        assert "expired" in refused.json()["detail"]
    with api.client(api.admin_key) as http:
        assert http.delete(f"/api/v1/apikey/{_prefix(new_key)}").json() == {}
        assert _prefix(new_key) not in {k["prefix"] for k in http.get("/api/v1/apikey").json()["apiKeys"]}


def test_register_a_pending_authurl(api: ApiServer) -> None:
    _node, first = api.register("waiting")
    assert first.auth_url, first
    auth_id = first.auth_url.rstrip("/").rsplit("/", 1)[-1]
    before = api.head()
    with api.client(api.admin_key) as http:
        assert http.post("/api/v1/node/register", params={"user": "bob", "key": "nope"}).status_code == 404
        assert api.head() == before
        done = http.post("/api/v1/node/register", params={"user": "bob", "key": auth_id})
        assert done.status_code == 200, done.text
        node = done.json()["node"]
        assert (node["user"]["name"], node["registerMethod"]) == ("bob", "REGISTER_METHOD_CLI")


# -- refusals --------------------------------------------------------------------------------

#: (method, path, body) of every authenticated v1 operation, on ids that exist (1) where
#: the operation needs one.
V1_OPERATIONS: list[tuple[str, str, Any]] = [
    ("GET", "/api/v1/user", None),
    ("POST", "/api/v1/user", {"name": "zed"}),
    ("POST", "/api/v1/user/2/rename/zed", None),
    ("DELETE", "/api/v1/user/2", None),
    ("GET", "/api/v1/node", None),
    ("POST", "/api/v1/node/register", None),
    ("GET", "/api/v1/node/1", None),
    ("DELETE", "/api/v1/node/1", None),
    ("POST", "/api/v1/node/1/rename/zed", None),
    ("POST", "/api/v1/node/1/expire", None),
    ("POST", "/api/v1/node/1/tags", {"tags": []}),
    ("POST", "/api/v1/node/1/approve_routes", {"routes": []}),
    ("GET", "/api/v1/preauthkey", None),
    ("POST", "/api/v1/preauthkey", {"user": "1"}),
    ("POST", "/api/v1/preauthkey/expire", {"id": "1"}),
    ("GET", "/api/v1/apikey", None),
    ("POST", "/api/v1/apikey", {}),
    ("POST", "/api/v1/apikey/expire", {"prefix": "x"}),
    ("DELETE", "/api/v1/apikey/x", None),
    ("GET", "/api/v1/policy", None),
    ("PUT", "/api/v1/policy", {"policy": "{}"}),
]


@pytest.fixture(scope="module")
def expired_key(api: ApiServer) -> str:
    key = api.srv.cli("apikeys", "create", check=True).stdout.strip()
    api.srv.cli("apikeys", "expire", _prefix(key), check=True)
    return key


@pytest.mark.parametrize(("method", "path", "body"), V1_OPERATIONS, ids=[f"{m} {p}" for m, p, _ in V1_OPERATIONS])
@pytest.mark.parametrize("credential", ["none", "unknown", "expired", "garbage"])
def test_no_valid_key_is_401_and_appends_nothing(
    api: ApiServer, expired_key: str, method: str, path: str, body: Any, credential: str
) -> None:
    key = {
        "none": None,
        "unknown": "tlkey-api-000000000000-" + "0" * 48,
        "expired": expired_key,
        "garbage": "not a key",
    }[credential]
    before = api.head()
    with api.client(key) as http:
        response = http.request(method, path, json=body)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 401 and problem["title"] == "Unauthorized" and problem["detail"]
    assert api.head() == before


_WITH_BODY = [(m, p) for m, p, b in V1_OPERATIONS if b is not None]


@pytest.mark.parametrize(("method", "path"), _WITH_BODY, ids=[f"{m} {p}" for m, p in _WITH_BODY])
@pytest.mark.parametrize("payload", [b"{not json", b'{"tags": 5, "routes": 5, "name": 5, "policy": 5, "user": 5, '
                                     b'"id": 5, "prefix": 5, "expiration": 5}'])
def test_malformed_json_is_400_and_appends_nothing(api: ApiServer, method: str, path: str, payload: bytes) -> None:
    before = api.head()
    with api.client(api.admin_key) as http:
        response = http.request(method, path, content=payload, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["status"] == 400
    assert api.head() == before


UNKNOWN_IDS: list[tuple[str, str, Any]] = [
    ("POST", "/api/v1/user/999/rename/zed", None),
    ("DELETE", "/api/v1/user/999", None),
    ("GET", "/api/v1/node/999", None),
    ("DELETE", "/api/v1/node/999", None),
    ("POST", "/api/v1/node/999/rename/zed", None),
    ("POST", "/api/v1/node/999/expire", None),
    ("POST", "/api/v1/node/999/tags", {"tags": []}),
    ("POST", "/api/v1/node/999/approve_routes", {"routes": []}),
    ("POST", "/api/v1/node/register", None),
    ("POST", "/api/v1/preauthkey", {"user": "999"}),
    ("POST", "/api/v1/preauthkey/expire", {"id": "999"}),
    ("POST", "/api/v1/apikey/expire", {"prefix": "nope"}),
    ("DELETE", "/api/v1/apikey/nope", None),
    ("GET", "/api/v1/node", None),
]


@pytest.mark.parametrize(("method", "path", "body"), UNKNOWN_IDS, ids=[f"{m} {p}" for m, p, _ in UNKNOWN_IDS])
def test_unknown_ids_are_404_and_append_nothing(api: ApiServer, method: str, path: str, body: Any) -> None:
    params = {"user": "999"} if path.endswith(("/node", "/register")) else None
    if path.endswith("/register"):
        params = {"user": "bob", "key": "no-such-registration"}
    before = api.head()
    with api.client(api.admin_key) as http:
        response = http.request(method, path, json=body, params=params)
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert api.head() == before


def test_refused_commands_keep_their_message_and_status(api: ApiServer) -> None:
    before = api.head()
    with api.client(api.admin_key) as http:
        dup = http.post("/api/v1/user", json={"name": "alice"})
        assert dup.status_code == 409 and "already exists" in dup.json()["detail"]
        bad = http.put("/api/v1/policy", json={"policy": '{"acls": [{"action": "maybe"}]}'})
        assert bad.status_code == 400 and bad.json()["detail"]
        missing = http.post("/api/v1/user", json={})
        assert missing.status_code == 400 and "name" in missing.json()["detail"]
    assert api.head() == before


def test_version_and_metrics(api: ApiServer) -> None:
    with api.client() as http:
        version = http.get("/version").json()
    assert version["version"] and "v1" in version["api"]
    text = api.metrics()
    assert 'tailledger_api_requests_total{method="GET",route="/api/v1/user",status="200"}' in text
    assert 'route="/api/v1/node/{nodeId}",status="404"' in text


def test_openapi_document_covers_every_route_and_every_response_validates(api: ApiServer) -> None:
    """Runs last in this module: it checks every response the tests above received."""
    assert check_against_openapi(api, V1_OPERATIONS) > 50


def _causes(api: ApiServer, after: int) -> list[tuple[str, str, str]]:
    """(type, correlation id, reason) of the events after ``after``."""

    return [(r.type, r.correlation_id, r.reason) for r in recorded(api.srv.data, after)]


def test_each_request_is_one_cause_with_its_reason(api: ApiServer) -> None:
    """The events of one request share a correlation id and carry the reason of its
    X-Tailledger-Reason header; another request gets another id; a reason that cannot
    be stored is 400 and appends nothing."""
    before = api.head()
    with api.client(api.admin_key) as http:
        made = http.post("/api/v1/user", json={"name": "dora"}, headers={"X-Tailledger-Reason": "OPS-7: new hire"})
        assert made.status_code == 200, made.text
        uid = made.json()["user"]["id"]
        assert http.post(f"/api/v1/user/{uid}/rename/dorothy").status_code == 200
        head = api.head()
        bad = http.delete(f"/api/v1/user/{uid}", headers={"X-Tailledger-Reason": "x" * 1001})
        assert bad.status_code == 400 and "X-Tailledger-Reason" in bad.json()["detail"]
        assert api.head() == head
        assert http.delete(f"/api/v1/user/{uid}", headers={"X-Tailledger-Reason": "left"}).status_code == 200
    events = _causes(api, before)
    assert [(t, r) for t, _, r in events] == [
        ("user.created", "OPS-7: new hire"), ("user.renamed", ""), ("user.deleted", "left"),
    ]
    assert len({corr for _, corr, _ in events}) == 3 and all(corr for _, corr, _ in events)


def test_a_policy_set_and_the_approvals_it_triggers_share_the_requests_cause(api: ApiServer) -> None:
    """One request that causes several appends: a policy set through the API and the
    route approvals its autoApprovers trigger share the request's correlation id and
    reason; another request gets another id."""
    import msgspec
    import trio

    from projections.tailcfg import Hostinfo, NetInfo
    from protocol import open_control_client
    from tests.protocol.control_harness import SimNode

    key = api.srv.cli("preauthkeys", "create", "-u", "alice", check=True).stdout.strip()
    gw = SimNode.new("cause-gw")

    async def register_and_advertise() -> None:
        with trio.fail_after(30):
            async with open_control_client(
                "127.0.0.1", api.srv.port, machine_key=gw.machine_private,
                ssl_context=api.ssl_context(), server_hostname="localhost",
            ) as client:
                assert not (await client.register(gw.register_request(key))).error
                hi = Hostinfo(hostname=gw.hostname, os="linux", net_info=NetInfo(preferred_derp=999),
                              routable_ips=["10.9.1.0/24", "10.9.2.0/24"])
                request = msgspec.structs.replace(gw.map_request(stream=False, omit_peers=True), hostinfo=hi)
                assert (await client.post_json("/machine/map", request)).status == 200

    trio.run(register_and_advertise)
    policy = ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],'
              ' "autoApprovers": {"routes": {"10.9.0.0/16": ["alice@"]}}}')
    before = api.head()
    with api.client(api.admin_key) as http:
        answer = http.put("/api/v1/policy", json={"policy": policy}, headers={"X-Tailledger-Reason": "NET-9 gw"})
        assert answer.status_code == 200, answer.text

        wait_until_sync(
            lambda: "node.routes_approved" in [t for t, _, _ in _causes(api, before)], what="the auto-approval"
        )
        assert http.put("/api/v1/policy", json={"policy": policy + " "}).status_code == 200
    events = _causes(api, before)
    [(_, policy_id, policy_reason)] = [e for e in events[:1] if e[0] == "policy.set"]
    approvals = [e for e in events if e[0] == "node.routes_approved"]
    assert approvals and all((corr, reason) == (policy_id, "NET-9 gw") for _, corr, reason in approvals)
    assert policy_reason == "NET-9 gw"
    [(_, second_id, second_reason)] = [e for e in events[1:] if e[0] == "policy.set"]
    assert second_id != policy_id and second_reason == ""
