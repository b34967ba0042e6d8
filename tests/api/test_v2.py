"""``/api/v2`` driven by Tailscale's API client from PyPI (``tailscale``), unmodified:
its base URL is fixed (``https://api.tailscale.com/api/v2/``), so it gets an aiohttp
session whose resolver sends that host to the test server and which trusts the test
certificate (it names ``api.tailscale.com``). Refusals are checked with httpx."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from tailscale import Tailscale, TailscaleError, TailscalePermissionError

from protocol import open_control_client
from tests.protocol.control_harness import SimNode

from .conftest import TAILSCALE_API_HOST, ApiServer, check_against_openapi


class _ToTestServer(AbstractResolver):
    """Resolves Tailscale's API host to the test server; nothing else."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host != TAILSCALE_API_HOST:
            raise OSError(f"the test resolver knows only {TAILSCALE_API_HOST}, not {host}")
        return [ResolveResult(hostname=host, host="127.0.0.1", port=self.port, family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        pass


@asynccontextmanager
async def tailscale_client(api: ApiServer, **kw: Any) -> AsyncIterator[Tailscale]:
    connector = aiohttp.TCPConnector(resolver=_ToTestServer(api.srv.port), ssl=api.ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        yield Tailscale(session=session, request_timeout=30, **kw)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


#: The simulated machines of the tailnet fixture, by host name.
SIM: dict[str, SimNode] = {}


@pytest.fixture(scope="module")
def tailnet(api: ApiServer) -> dict[str, str]:
    """Two nodes of alice, one of bob, and the policy that owns tag:web."""
    srv = api.srv
    alice_key = srv.cli("preauthkeys", "create", "-u", "alice", "--reusable", check=True).stdout.strip()
    bob_key = srv.cli("preauthkeys", "create", "-u", "bob", check=True).stdout.strip()
    api.register("web-a", alice_key)
    api.register("web-b", alice_key)
    SIM["bobs-box"], _ = api.register("bobs-box", bob_key)
    with api.client(api.admin_key) as http:
        nodes = {n["givenName"]: n["id"] for n in http.get("/api/v1/node").json()["nodes"]}
    return nodes


def test_devices_through_the_tailscale_client(api: ApiServer, tailnet: dict[str, str]) -> None:
    async def go() -> None:
        async with tailscale_client(api, api_key=api.admin_key) as ts:
            policy = await ts.policy_file()
            await ts.set_policy_file(
                '{"tagOwners": {"tag:web": ["alice@"]}, "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}',
                etag=policy.etag,
            )
            devices = await ts.devices()
            names = {d.hostname: d for d in devices.values()}
            assert {"web-a", "web-b", "bobs-box"} <= set(names)
            web_a = names["web-a"]
            assert web_a.user == "alice" and web_a.addresses and web_a.authorized
            one = await ts.device(web_a.device_id)
            assert one.node_id == f"n{web_a.device_id}"
            await ts.rename_device(web_a.device_id, name="front")
            await ts.set_device_tags(web_a.device_id, tags=["tag:web"])
            routes = await ts.set_device_routes(web_a.device_id, routes=["10.9.0.0/16"])
            assert routes.enabled_routes == []  # approved, but not advertised
            assert (await ts.device_routes(web_a.device_id)).advertised_routes == []
            await ts.authorize_device(web_a.device_id, authorized=True)
            await ts.expire_device_key(names["web-b"].device_id)
            renamed = await ts.device(web_a.device_id)
            assert renamed.name.startswith("front.") and renamed.tags == ["tag:web"]
            assert (await ts.device(names["web-b"].device_id)).expires is not None
            await ts.delete_device(names["web-b"].device_id)
            assert names["web-b"].device_id not in await ts.devices()

    before = api.head()
    _run(go())
    actor = f"api:{api.admin_key.split('-')[2]}"
    assert [t for t, a in api.events(before) if a == actor] == [
        "policy.set", "node.renamed", "node.tags_set", "node.routes_approved", "node.expiry_set", "node.deleted",
    ]


def test_keys_policy_and_users_through_the_tailscale_client(api: ApiServer, tailnet: dict[str, str]) -> None:
    async def go() -> None:
        async with tailscale_client(api, api_key=api.admin_key) as ts:
            made = await ts.create_key(tags=["tag:web"], reusable=True, expiry_seconds=3600)
            assert made.key.startswith("tlkey-auth-") and made.capabilities.devices.create.reusable
            listed = {k.key_id: k for k in await ts.keys()}
            assert made.key_id in listed and listed[made.key_id].key == ""  # shown once
            assert (await ts.key(made.key_id)).capabilities.devices.create.tags == ["tag:web"]
            await ts.delete_key(made.key_id)
            assert (await ts.key(made.key_id)).invalid

            policy = await ts.policy_file()
            assert '"tag:web"' in policy.policy and policy.etag
            with pytest.raises(TailscaleError):  # changed since: the ETag no longer matches
                await ts.set_policy_file('{"acls": []}', etag='"stale"')
            bad = await ts.validate_policy_file('{"acls": [{"action": "maybe"}]}')
            assert bad.message
            good = await ts.validate_policy_file(policy.policy)
            assert good.message is None
            proposed = (
                '{"tagOwners": {"tag:web": ["alice@"]},\n'
                ' "acls": [{"action": "accept", "src": ["bob@"], "dst": ["tag:web:443"]},\n'
                '          {"action": "accept", "src": ["autogroup:admin"], "dst": ["*:22"]}]}'
            )
            preview = await ts.preview_policy_rules(proposed, preview_type="user", preview_for="alice")
            assert preview.preview_type == "user"
            assert [(m.users, m.ports, m.line_number) for m in preview.matches] == [
                (["autogroup:admin"], ["*:22"], 3)
            ]
            web_a = next(d for d in (await ts.devices()).values() if "tag:web" in d.tags)
            by_ip = await ts.preview_policy_rules(
                proposed, preview_type="ipport", preview_for=f"{web_a.addresses[0]}:443"
            )
            assert [m.users for m in by_ip.matches] == [["bob@"]]

            users = {u.login_name: u for u in await ts.users()}
            assert users["alice"].role == "owner" and users["bob"].role == "member"
            assert [u.login_name for u in await ts.users(role="owner")] == ["alice"]

    before = api.head()
    _run(go())
    assert [t for t, _ in api.events(before)] == ["preauthkey.created", "preauthkey.expired"]


def test_a_member_key_sees_only_its_own_devices(api: ApiServer, tailnet: dict[str, str]) -> None:
    async def go() -> None:
        async with tailscale_client(api, api_key=api.member_key) as ts:
            devices = await ts.devices()
            assert {d.hostname for d in devices.values()} == {"bobs-box"}
            with pytest.raises(TailscaleError) as refused:
                await ts.device(tailnet["web-a"])
            assert refused.value.args[0] == 404 or "not found" in str(refused.value)
            assert [u.login_name for u in await ts.users()] == ["bob"]

    _run(go())


def _lists_built(api: ApiServer, route: str) -> int:
    prefix = f'tailledger_api_node_lists_built_total{{route="{route}"}} '
    lines = [line for line in api.metrics().splitlines() if line.startswith(prefix)]
    return int(float(lines[0][len(prefix):])) if lines else 0


def test_node_lists_are_kept_until_the_log_changes_and_per_viewer(api: ApiServer, tailnet: dict[str, str]) -> None:
    devices, nodes = "/api/v2/tailnet/{tailnet}/devices", "/api/v1/node"
    with api.client(api.admin_key) as http:
        first = http.get("/api/v2/tailnet/-/devices").json()
        built = _lists_built(api, devices)
        assert built >= 1
        assert http.get("/api/v2/tailnet/-/devices").json() == first  # kept: not built again
        assert _lists_built(api, devices) == built
        # A change in the log: the next list is built anew and shows it.
        device = first["devices"][0]
        assert http.post(f"/api/v2/device/{device['id']}/name", json={"name": "renamed"}).status_code == 200
        renamed = http.get("/api/v2/tailnet/-/devices").json()
        assert _lists_built(api, devices) == built + 1
        assert [d["name"].split(".")[0] for d in renamed["devices"] if d["id"] == device["id"]] == ["renamed"]
        assert http.post(f"/api/v2/device/{device['id']}/name", json={"name": device["name"].split(".")[0]}
                         ).status_code == 200
        # v1's list is its own, and a user filter is part of what it is kept by.
        v1_built = _lists_built(api, nodes)
        everyone = http.get("/api/v1/node").json()["nodes"]
        bobs = http.get("/api/v1/node", params={"user": "bob"}).json()["nodes"]
        assert {n["givenName"] for n in bobs} == {"bobs-box"} and len(everyone) > len(bobs)
        assert _lists_built(api, nodes) == v1_built + 2
    # A member's list is not the admin's, though nothing changed.
    with api.client(api.member_key) as http:
        mine = http.get("/api/v2/tailnet/-/devices").json()["devices"]
    assert {d["hostname"] for d in mine} == {"bobs-box"}
    assert _lists_built(api, devices) == built + 2


def _client(api: ApiServer, scopes: str) -> tuple[str, str]:
    secret = api.srv.cli("oauth-clients", "create", "--scopes", scopes, check=True).stdout.strip()
    return secret.split("-")[2], secret


def test_oauth_client_credentials_and_scopes(api: ApiServer, tailnet: dict[str, str]) -> None:
    client_id, secret = _client(api, "devices:core")

    async def go() -> None:
        async with tailscale_client(api, oauth_client_id=client_id, oauth_client_secret=secret) as ts:
            devices = await ts.devices()
            assert "bobs-box" in {d.hostname for d in devices.values()}
            await ts.rename_device(tailnet["bobs-box"], name="bobby")
            with pytest.raises(TailscalePermissionError):
                await ts.keys()
            with pytest.raises(TailscalePermissionError):
                await ts.policy_file()

    before = api.head()
    _run(go())
    assert api.events(before) == [("node.renamed", f"oauthclient:{client_id}")]


def _token(api: ApiServer, scopes: str) -> str:
    client_id, secret = _client(api, scopes)
    with httpx.Client(base_url=api.base, verify=api.ssl_context(), timeout=30) as http:
        answer = http.post("/api/v2/oauth/token", data={"client_id": client_id, "client_secret": secret})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


def test_oauth_clients_made_through_the_keys_endpoint(api: ApiServer) -> None:
    """keyType client makes an OAuth client for a token with oauth_keys (or an admin
    key), no wider than the caller; anyone else is refused and nothing is appended."""
    wide = _token(api, "oauth_keys,devices:core")
    narrow = _token(api, "auth_keys")
    client = {"keyType": "client", "description": "ci", "scopes": ["devices:core:read"]}
    refusals = [
        (narrow, client, 403),  # an auth_keys token cannot mint a client
        (api.member_key, client, 403),  # nor a member key
        (wide, {**client, "scopes": ["devices:core", "policy_file"]}, 403),  # wider than the caller
        (wide, {**client, "scopes": ["all"]}, 403),
        (wide, {**client, "scopes": []}, 400),
        (wide, {**client, "scopes": ["nonsense"]}, 400),
        (wide, {"capabilities": {"devices": {"create": {"tags": ["tag:web"]}}}}, 403),  # no auth_keys scope
        (api.admin_key, {**client, "keyType": "other"}, 400),
    ]
    for credential, body, status in refusals:
        before = api.head()
        with api.client(credential) as http:
            response = http.post("/api/v2/tailnet/-/keys", json=body)
        assert response.status_code == status, (body, response.text)
        assert api.head() == before

    before = api.head()
    with api.client(wide) as http:
        made = http.post("/api/v2/tailnet/-/keys", json=client)
    assert made.status_code == 200, made.text
    answer = made.json()
    assert answer["keyType"] == "client" and answer["scopes"] == ["devices:core:read"]
    assert answer["key"].startswith("tlkey-client-") and answer["id"] == answer["key"].split("-")[2]
    with api.client(api.admin_key) as http:
        by_admin = http.post("/api/v2/tailnet/-/keys", json={**client, "scopes": ["all"]})
    assert by_admin.status_code == 200 and by_admin.json()["scopes"] == ["all"]
    assert [t for t, _ in api.events(before)] == ["apikey.created", "apikey.created"]
    # The new client works, within its scopes.
    with httpx.Client(base_url=api.base, verify=api.ssl_context(), timeout=30) as http:
        token = http.post(
            "/api/v2/oauth/token", data={"client_id": answer["id"], "client_secret": answer["key"]}
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        assert http.get("/api/v2/tailnet/-/devices", headers=headers).status_code == 200
        assert http.post("/api/v2/device/1/expire", headers=headers).status_code == 403


def test_oauth_clients_listed_and_deleted_through_the_keys_endpoint(
    api: ApiServer, tailnet: dict[str, str], expired_key: str,
) -> None:
    """As in Tailscale's API: the key list with all=true holds the OAuth clients
    (keyType client), the key path gets and deletes one by its client id; each kind
    needs its own scope (oauth_keys:read to see clients, oauth_keys to delete one)."""
    with api.client(api.admin_key) as http:
        made = http.post("/api/v2/tailnet/-/keys", json={"keyType": "client", "scopes": ["devices:core:read"]})
        assert made.status_code == 200, made.text
        client_id = made.json()["id"]
        assert client_id not in {k["id"] for k in http.get("/api/v2/tailnet/-/keys").json()["keys"]}
    auth_reader, client_reader = _token(api, "auth_keys:read"), _token(api, "oauth_keys:read")
    with api.client(auth_reader) as http:  # all=true, but no scope to read clients
        listed = http.get("/api/v2/tailnet/-/keys", params={"all": "true"}).json()["keys"]
        assert listed and {k["keyType"] for k in listed} == {"auth"}
        assert http.get(f"/api/v2/tailnet/-/keys/{client_id}").status_code == 403
    with api.client(client_reader) as http:  # the clients only
        listed = http.get("/api/v2/tailnet/-/keys", params={"all": "true"}).json()["keys"]
        assert client_id in {k["id"] for k in listed} and {k["keyType"] for k in listed} == {"client"}
        assert http.get("/api/v2/tailnet/-/keys", params={"all": "maybe"}).status_code == 400

    refusals = [
        (None, client_id, 401),
        (expired_key, client_id, 401),
        (_token(api, "auth_keys"), client_id, 403),  # deletes auth keys, not clients
        (client_reader, client_id, 403),  # reads clients, deletes none
        (api.member_key, client_id, 404),  # not the member's to see
        (api.admin_key, "nosuchclient", 404),
        (api.admin_key, "999999", 404),
    ]
    for credential, ref, status in refusals:
        before = api.head()
        with api.client(credential) as http:
            response = http.delete(f"/api/v2/tailnet/-/keys/{ref}")
        assert response.status_code == status, (credential, ref, response.text)
        assert api.head() == before

    async def go() -> None:
        async with tailscale_client(api, api_key=api.admin_key) as ts:
            keys = {k.key_id: k for k in await ts.keys()}  # the client asks with all=true
            assert keys[client_id].key_type == "client" and keys[client_id].scopes == ["devices:core:read"]
            assert (await ts.key(client_id)).key_type == "client"
            await ts.delete_key(client_id)
            assert client_id not in {k.key_id for k in await ts.keys()}
            with pytest.raises(TailscaleError):
                await ts.key(client_id)

    before = api.head()
    _run(go())
    assert [t for t, _ in api.events(before)] == ["apikey.deleted"]
    with httpx.Client(base_url=api.base, verify=api.ssl_context(), timeout=30) as http:  # its tokens are void
        answer = http.post("/api/v2/oauth/token", data={"client_id": client_id, "client_secret": made.json()["key"]})
    assert answer.status_code == 401


def test_oauth_token_endpoint_refusals(api: ApiServer) -> None:
    client_id, secret = _client(api, "devices:core:read")
    with httpx.Client(base_url=api.base, verify=api.ssl_context(), timeout=30) as http:
        wrong = http.post("/api/v2/oauth/token", data={"client_id": client_id, "client_secret": secret + "x"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
        wider = http.post(
            "/api/v2/oauth/token", data={"client_id": client_id, "client_secret": secret, "scope": "devices:core"}
        )
        assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
        ok = http.post("/api/v2/oauth/token", data={"client_id": client_id, "client_secret": secret})
        assert ok.status_code == 200 and ok.json()["expires_in"] == 3600
        token = ok.json()["access_token"]
        # Tokens are for /api/v2 only, and end with their client.
        assert http.get("/api/v1/node", headers={"Authorization": f"Bearer {token}"}).status_code == 401
        devices = http.get("/api/v2/tailnet/-/devices", headers={"Authorization": f"Bearer {token}"})
        assert devices.status_code == 200
    api.srv.cli("oauth-clients", "delete", client_id, check=True)
    with httpx.Client(base_url=api.base, verify=api.ssl_context(), timeout=30) as http:
        gone = http.get("/api/v2/tailnet/-/devices", headers={"Authorization": f"Bearer {token}"})
        assert gone.status_code == 401


def test_dns_settings_go_through_the_log_to_open_streams(api: ApiServer, tailnet: dict[str, str]) -> None:
    """Set through Tailscale's client; recorded with the key as actor; an open map
    stream receives the new configuration without reconnecting."""
    import trio

    node = SIM["bobs-box"]
    before = api.head()

    async def set_through_client() -> None:
        async with tailscale_client(api, api_key=api.admin_key) as ts:
            assert (await ts.dns_nameservers()).dns == []
            assert (await ts.set_dns_nameservers(dns=["9.9.9.9", "2620:fe::fe"])).dns == ["9.9.9.9", "2620:fe::fe"]
            assert (await ts.set_dns_search_paths(search_paths=["corp.example"])).search_paths == ["corp.example"]
            assert (await ts.set_dns_preferences(magic_dns=True)).magic_dns is True
            assert (await ts.dns_search_paths()).search_paths == ["corp.example"]
            assert (await ts.dns_preferences()).magic_dns is True

    async def watch() -> None:
        with trio.fail_after(60):
            async with open_control_client(
                "127.0.0.1", api.srv.port, machine_key=node.machine_private,
                ssl_context=api.ssl_context(), server_hostname="localhost",
            ) as client, client.map_stream(node.map_request()) as stream:
                first = await stream.__anext__()
                assert first.dns_config is None or not first.dns_config.fallback_resolvers
                await trio.to_thread.run_sync(lambda: _run(set_through_client()))
                async for msg in stream:
                    dns = msg.dns_config
                    if dns is not None and dns.fallback_resolvers and "corp.example" in (dns.domains or []):
                        assert [r.addr for r in dns.fallback_resolvers] == ["9.9.9.9", "2620:fe::fe"]
                        return

    trio.run(watch)
    actor = f"api:{api.admin_key.split('-')[2]}"
    assert [(t, a) for t, a in api.events(before) if t == "dns.set"] == [("dns.set", actor)] * 3  # servers, paths, MagicDNS made explicit
    with api.client(api.member_key) as http:
        refused = http.post("/api/v2/tailnet/-/dns/nameservers", json={"dns": ["1.1.1.1"]})
        assert refused.status_code == 403
        bad = http.post("/api/v2/tailnet/-/dns/searchpaths", json={"searchPaths": "x"})
        assert bad.status_code == 400
    with api.client(api.admin_key) as http:
        invalid = http.post("/api/v2/tailnet/-/dns/nameservers", json={"dns": ["dns.example"]})
        assert invalid.status_code == 400 and "IP address" in invalid.json()["message"]


# -- refusals, with httpx ----------------------------------------------------------------------------

V2_OPERATIONS: list[tuple[str, str, Any]] = [
    ("GET", "/api/v2/tailnet/-/devices", None),
    ("GET", "/api/v2/device/1", None),
    ("DELETE", "/api/v2/device/1", None),
    ("POST", "/api/v2/device/1/authorized", {"authorized": True}),
    ("POST", "/api/v2/device/1/expire", None),
    ("POST", "/api/v2/device/1/name", {"name": "x"}),
    ("POST", "/api/v2/device/1/tags", {"tags": []}),
    ("GET", "/api/v2/device/1/routes", None),
    ("POST", "/api/v2/device/1/routes", {"routes": []}),
    ("GET", "/api/v2/tailnet/-/keys", None),
    ("POST", "/api/v2/tailnet/-/keys", {"capabilities": {"devices": {"create": {"tags": ["tag:web"]}}}}),
    ("GET", "/api/v2/tailnet/-/keys/1", None),
    ("DELETE", "/api/v2/tailnet/-/keys/1", None),
    ("GET", "/api/v2/tailnet/-/acl", None),
    ("POST", "/api/v2/tailnet/-/acl", None),
    ("POST", "/api/v2/tailnet/-/acl/validate", None),
    ("POST", "/api/v2/tailnet/-/acl/preview?type=user&previewFor=alice", None),
    ("GET", "/api/v2/tailnet/-/users", None),
    ("GET", "/api/v2/tailnet/-/dns/nameservers", None),
    ("POST", "/api/v2/tailnet/-/dns/nameservers", {"dns": []}),
    ("GET", "/api/v2/tailnet/-/dns/searchpaths", None),
    ("POST", "/api/v2/tailnet/-/dns/searchpaths", {"searchPaths": []}),
    ("GET", "/api/v2/tailnet/-/dns/preferences", None),
    ("POST", "/api/v2/tailnet/-/dns/preferences", {"magicDNS": True}),
]


@pytest.fixture(scope="module")
def narrow_tokens(api: ApiServer) -> dict[str, str]:
    """Tokens with one scope each: dns:read (for every operation but DNS) and
    users:read (for DNS)."""
    tokens = {}
    for scope in ("dns:read", "users:read"):
        client_id, secret = _client(api, scope)
        with httpx.Client(base_url=api.base, verify=api.ssl_context(), timeout=30) as http:
            tokens[scope] = str(
                http.post("/api/v2/oauth/token", data={"client_id": client_id, "client_secret": secret})
                .json()["access_token"]
            )
    return tokens


@pytest.fixture(scope="module")
def expired_key(api: ApiServer) -> str:
    key = api.srv.cli("apikeys", "create", check=True).stdout.strip()
    api.srv.cli("apikeys", "expire", key.split("-")[2], check=True)
    return key


@pytest.mark.parametrize(("method", "path", "body"), V2_OPERATIONS, ids=[f"{m} {p}" for m, p, _ in V2_OPERATIONS])
@pytest.mark.parametrize(("credential", "status"), [("none", 401), ("expired", 401), ("narrow token", 403)])
def test_refused_credentials_append_nothing(
    api: ApiServer, tailnet: dict[str, str], narrow_tokens: dict[str, str], expired_key: str,
    method: str, path: str, body: Any, credential: str, status: int,
) -> None:
    narrow = narrow_tokens["users:read" if "/dns/" in path else "dns:read"]
    key = {"none": None, "expired": expired_key, "narrow token": narrow}[credential]
    before = api.head()
    with api.client(key) as http:
        response = http.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["message"]
    assert api.head() == before


_V2_BODIES = [(m, p) for m, p, b in V2_OPERATIONS if isinstance(b, dict)]


@pytest.mark.parametrize(("method", "path"), _V2_BODIES, ids=[f"{m} {p}" for m, p in _V2_BODIES])
def test_malformed_json_is_400(api: ApiServer, tailnet: dict[str, str], method: str, path: str) -> None:
    before = api.head()
    with api.client(api.admin_key) as http:
        response = http.request(method, path, content=b'{"tags": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert api.head() == before


@pytest.mark.parametrize("path", ["/api/v2/tailnet/-/acl", "/api/v2/tailnet/-/acl/preview?type=user&previewFor=x"])
@pytest.mark.parametrize("text", [b"", b"{not json", b'{"acls": [{"action": "maybe"}]}'])
def test_a_bad_policy_file_is_400_and_appends_nothing(
    api: ApiServer, tailnet: dict[str, str], path: str, text: bytes
) -> None:
    before = api.head()
    with api.client(api.admin_key) as http:
        response = http.post(path, content=text, headers={"Content-Type": "application/hujson"})
    assert response.status_code == 400, response.text
    assert response.json()["message"]
    assert api.head() == before


_V2_UNKNOWN = [
    (m, p.replace("/device/1", "/device/999").replace("/keys/1", "/keys/999").replace("/tailnet/-/", "/tailnet/other/"), b)
    for m, p, b in V2_OPERATIONS
]


@pytest.mark.parametrize(("method", "path", "body"), _V2_UNKNOWN, ids=[f"{m} {p}" for m, p, _ in _V2_UNKNOWN])
def test_unknown_ids_and_tailnets_are_404(api: ApiServer, tailnet: dict[str, str], method: str, path: str,
                                          body: Any) -> None:
    before = api.head()
    with api.client(api.admin_key) as http:
        response = http.request(method, path, json=body)
    assert response.status_code == 404, response.text
    assert api.head() == before


def test_openapi_document_covers_v2_and_every_response_validates(api: ApiServer, tailnet: dict[str, str]) -> None:
    """Runs last in this module: the refusals above, and the answers of every read."""
    with api.client(api.admin_key) as http:
        for method, path, _body in V2_OPERATIONS:
            if method == "GET":
                assert http.get(path).status_code == 200, path
        assert http.post("/api/v2/tailnet/-/acl/validate", content=b'{"acls": []}').status_code == 200
        made = http.post("/api/v2/tailnet/-/keys", json={"capabilities": {"devices": {"create": {"tags": ["tag:web"]}}}})
        assert made.status_code == 200, made.text
    assert check_against_openapi(api, V2_OPERATIONS) > 50
