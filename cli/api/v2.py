"""``/api/v2``: a subset of Tailscale's API, for the tools written against it (the
Terraform provider, the Kubernetes operator, Tailscale's API clients).

The tailnet is always ``-``. Devices are nodes (``id`` is the node id, ``nodeId`` the
same with an ``n`` in front), auth keys are pre-auth keys. Each operation declares the
OAuth scope it needs (Tailscale's names); API keys are not limited by scopes, only by
their role. Every change is an admin operation, as from the CLI.

The OAuth token endpoint (``POST /api/v2/oauth/token``, client credentials grant,
form-encoded, RFC 6749 errors) hands out one-hour bearer tokens limited to the client's
scopes (or a subset asked for with ``scope``). Tokens live in the server's memory: a
restart ends them, and clients ask for a new one, as they do when one expires.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from quart import Response, request

from projections import commands as c
from projections.state import ApiKey, Node, PreAuthKey, User

from ..config import DNSConfig as DNSSettings
from ..dnsapply import effective_dns_settings
from .core import TOKEN_LIFETIME, ApiError, ApiService, Ctx, NodeList, Route
from .schema import (
    V2Authorized,
    V2Device,
    V2DeviceRoutes,
    V2Devices,
    V2DnsPreferences,
    V2Empty,
    V2Key,
    V2KeyCapabilities,
    V2KeyCreate,
    V2KeyDevices,
    V2KeyRequest,
    V2Keys,
    V2Name,
    V2Nameservers,
    V2NameserversRequest,
    V2Preview,
    V2Routes,
    V2SearchPaths,
    V2Tags,
    V2Token,
    V2User,
    V2Users,
    V2Validation,
)

__all__ = ["add_v2_routes"]

R = TypeVar("R")
B = TypeVar("B")


def _tailnet(ctx: Ctx) -> None:
    if ctx.params.get("tailnet") != "-":
        raise ApiError(404, "unknown tailnet: this server has one, named '-'")


def _domain(ctx: Ctx) -> str:
    return ctx.service.config.dns.base_domain


def _login(user: User | None) -> str:
    return user.login_name if user is not None else ""


def v2_device(ctx: Ctx, node: Node) -> V2Device:
    user = ctx.state.users.get(node.user_id)
    domain = _domain(ctx)
    return V2Device(
        id=str(node.id),
        node_id=f"n{node.id}",
        name=f"{node.given_name}.{domain}" if domain else node.given_name,
        hostname=node.hostname,
        user=_login(user) if not node.tags else "tagged-devices",
        addresses=[ip for ip in (node.ipv4, node.ipv6) if ip],
        tags=list(node.tags),
        authorized=True,
        is_external=False,
        key_expiry_disabled=node.expiry is None,
        created=node.created_at,
        expires=node.expiry,
        last_seen=ctx.last_seen(node.id),
        connected_to_control=ctx.is_online(node.id),
        os=node.os,
        machine_key=f"mkey:{node.machine_key}",
        node_key=f"nodekey:{node.node_key}",
        client_version="",
        update_available=False,
        blocks_incoming_connections=False,
        is_ephemeral=node.ephemeral,
        advertised_routes=list(node.advertised_routes),
        enabled_routes=sorted(set(node.approved_routes) & set(node.advertised_routes)),
    )


def v2_key(ctx: Ctx, key: PreAuthKey, full: str | None = None) -> V2Key:
    now = ctx.service.now()
    return V2Key(
        id=str(key.id),
        key_type="auth",
        description="",
        created=key.created_at,
        expires=key.expires_at,
        revoked=key.expires_at if key.revoked else None,
        invalid=key.usable_at(now) is not None,
        capabilities=V2KeyCapabilities(
            devices=V2KeyDevices(
                create=V2KeyCreate(
                    reusable=key.reusable, ephemeral=key.ephemeral, preauthorized=True, tags=list(key.tags)
                )
            )
        ),
        user_id=str(key.user_id) if key.user_id is not None else None,
        key=full,
    )


def v2_client(ctx: Ctx, client: ApiKey, full: str | None = None) -> V2Key:
    """An OAuth client as a key of ``keyType`` client (its id is the client id)."""
    return V2Key(
        id=client.prefix,
        key_type="client",
        description=client.description,
        created=client.created_at,
        expires=client.expires_at,
        revoked=None,
        invalid=client.usable_at(ctx.service.now()) is not None,
        capabilities=V2KeyCapabilities(),
        user_id=str(client.user_id) if client.user_id is not None else None,
        key=full,
        scopes=list(client.scopes),
    )


# -- devices -----------------------------------------------------------------------------------


async def list_devices(ctx: Ctx) -> NodeList:
    _tailnet(ctx)
    return await ctx.node_list(lambda nodes: V2Devices(devices=[v2_device(ctx, n) for n in nodes]))


async def get_device(ctx: Ctx) -> V2Device:
    return v2_device(ctx, ctx.node(ctx.params["deviceId"]))


async def delete_device(ctx: Ctx) -> V2Empty:
    await ctx.node_op("deviceId", "nodes.delete")
    return V2Empty()


async def authorize_device(ctx: Ctx) -> V2Empty:
    body = ctx.body(V2Authorized)
    ctx.node(ctx.params["deviceId"])
    if not body.authorized:
        raise ApiError(400, "devices are authorized when they register; expire or delete the device instead")
    return V2Empty()  # already authorized: nothing to record


async def expire_device(ctx: Ctx) -> V2Empty:
    await ctx.node_op("deviceId", "nodes.expire")
    return V2Empty()


async def rename_device(ctx: Ctx) -> V2Empty:
    body = ctx.body(V2Name)
    node = ctx.node(ctx.params["deviceId"])
    domain = _domain(ctx)
    name = body.name.removesuffix(".").removesuffix(f".{domain}") if domain else body.name
    if not name:
        name = c.sanitize_hostname(node.hostname)  # "" resets to the OS host name
    if name != node.given_name:
        await ctx.op("nodes.rename", {"node": str(node.id), "new_name": name})
    return V2Empty()


async def tag_device(ctx: Ctx) -> V2Empty:
    body = ctx.body(V2Tags)
    node = ctx.node(ctx.params["deviceId"])
    ctx.require_admin()
    if tuple(sorted(set(body.tags))) != node.tags:
        await ctx.op("nodes.tag", {"node": str(node.id), "tags": body.tags})
    return V2Empty()


async def device_routes(ctx: Ctx) -> V2DeviceRoutes:
    node = ctx.node(ctx.params["deviceId"])
    return _routes(node)


def _routes(node: Node) -> V2DeviceRoutes:
    return V2DeviceRoutes(
        advertised_routes=list(node.advertised_routes),
        enabled_routes=sorted(set(node.approved_routes) & set(node.advertised_routes)),
    )


async def set_device_routes(ctx: Ctx) -> V2DeviceRoutes:
    body = ctx.body(V2Routes)
    node = await ctx.node_op("deviceId", "nodes.approve_routes", {"routes": body.routes}, admin=True)
    return _routes(ctx.state.nodes[node.id])


# -- keys ----------------------------------------------------------------------------------------


def _visible_key(ctx: Ctx, ref: str) -> PreAuthKey | ApiKey:
    """The auth key (a numeric id) or OAuth client (its client id) ``ref`` names, if
    the principal may see it and holds the scope that reads it (404, 403 otherwise)."""
    key: PreAuthKey | ApiKey | None = None
    if ref.isascii() and ref.isdigit() and len(ref) <= 18:
        key = ctx.state.preauth_keys.get(int(ref))
    else:
        key = next((k for k in ctx.state.api_keys.values() if k.kind == "oauth_client" and k.prefix == ref), None)
    if key is None or not ctx.principal.sees_user(key.user_id):
        raise ApiError(404, f"key {ref!r} not found")
    ctx.require_scope("auth_keys:read" if isinstance(key, PreAuthKey) else "oauth_keys:read")
    return key


async def list_keys(ctx: Ctx) -> V2Keys:
    """The auth keys; with ``?all=true`` the OAuth clients too (as Tailscale's API
    lists every key type then), each kind only for a caller with its read scope
    (``auth_keys:read``, ``oauth_keys:read``)."""
    _tailnet(ctx)
    every = ctx.query("all")
    if every not in (None, "true", "false"):
        raise ApiError(400, f"all={every!r}: use true or false")
    keys: list[V2Key] = []
    if ctx.has_scope("auth_keys:read"):
        auth = sorted(ctx.state.preauth_keys.values(), key=lambda k: k.id)
        keys += [v2_key(ctx, k) for k in auth if ctx.principal.sees_user(k.user_id)]
    if every == "true" and ctx.has_scope("oauth_keys:read"):
        clients = sorted((k for k in ctx.state.api_keys.values() if k.kind == "oauth_client"), key=lambda k: k.id)
        keys += [v2_client(ctx, k) for k in clients if ctx.principal.sees_user(k.user_id)]
    return V2Keys(keys=keys)


async def get_key(ctx: Ctx) -> V2Key:
    _tailnet(ctx)
    key = _visible_key(ctx, ctx.params["keyId"])
    return v2_key(ctx, key) if isinstance(key, PreAuthKey) else v2_client(ctx, key)


async def create_key(ctx: Ctx) -> V2Key:
    _tailnet(ctx)
    body = ctx.body(V2KeyRequest)
    if body.key_type == "client":
        return await _create_client(ctx, body)
    if body.key_type != "auth":
        raise ApiError(400, f"unknown keyType {body.key_type!r}: use auth or client")
    ctx.require_scope("auth_keys")
    if body.scopes:
        raise ApiError(400, "scopes are for OAuth clients (keyType client)")
    create = body.capabilities.devices.create
    p = ctx.principal
    if create.tags and not p.is_admin:
        raise ApiError(403, "tagged keys need an admin credential")
    if p.user_id is None and not create.tags:
        raise ApiError(400, "a key made by a tailnet-wide credential needs tags (capabilities.devices.create.tags)")
    seconds = body.expiry_seconds if body.expiry_seconds else 90 * 86400
    view = await ctx.op(
        "preauthkeys.create",
        {
            "user": str(p.user_id) if p.user_id is not None and not create.tags else None,
            "reusable": create.reusable,
            "ephemeral": create.ephemeral,
            "tags": create.tags,
            "expiration_seconds": seconds,
        },
    )
    return v2_key(ctx, ctx.state.preauth_keys[view["id"]], view["key"])


async def _create_client(ctx: Ctx, body: V2KeyRequest) -> V2Key:
    """An OAuth client, as Tailscale's API makes them: for a token with the
    ``oauth_keys`` scope, or an admin API key. Its scopes may not exceed the caller's,
    so that a narrower credential cannot mint a wider one; it acts for the caller's
    user with the caller's role."""
    p = ctx.principal
    if p.scopes is None and not p.is_admin:
        raise ApiError(403, "making an OAuth client needs an admin key or a token with the scope 'oauth_keys'")
    ctx.require_scope("oauth_keys")
    if not body.scopes:
        raise ApiError(400, f"an OAuth client needs scopes, some of: {', '.join(c.OAUTH_SCOPES)}")
    for scope in body.scopes:
        if scope not in c.OAUTH_SCOPES:
            raise ApiError(400, f"unknown scope {scope!r}: use some of {', '.join(c.OAUTH_SCOPES)}")
        if p.scopes is not None and not c.scope_grants(p.scopes, scope):
            raise ApiError(403, f"a new client's scopes may not exceed this token's, which lacks {scope!r}")
    if body.capabilities.devices.create.tags:
        raise ApiError(400, "capabilities are for auth keys (keyType auth); an OAuth client has scopes")
    view = await ctx.op(
        "oauth_clients.create",
        {
            "user": str(p.user_id) if p.user_id is not None else None,
            "role": p.role,
            "expiration_seconds": body.expiry_seconds,
            "description": body.description,
            "scopes": sorted(set(body.scopes)),
        },
    )
    return v2_client(ctx, ctx.state.api_keys[int(view["id"])], str(view["key"]))


async def delete_key(ctx: Ctx) -> V2Empty:
    """Revoke an auth key (scope ``auth_keys``) or delete an OAuth client (scope
    ``oauth_keys``, or an admin API key, as for making one): Tailscale's API deletes
    every key type at this path."""
    _tailnet(ctx)
    key = _visible_key(ctx, ctx.params["keyId"])
    if isinstance(key, PreAuthKey):
        ctx.require_scope("auth_keys")
        if not key.revoked:
            await ctx.op("preauthkeys.expire", {"key": str(key.id)})
        return V2Empty()
    if ctx.principal.scopes is None and not ctx.principal.is_admin:
        raise ApiError(403, "deleting an OAuth client needs an admin key or a token with the scope 'oauth_keys'")
    ctx.require_scope("oauth_keys")
    await ctx.op("oauth_clients.delete", {"key": str(key.id)})
    return V2Empty()


# -- the policy file -----------------------------------------------------------------------------


def _etag(text: str | None) -> str:
    return '"' + (hashlib.sha256(text.encode()).hexdigest() if text is not None else "ts-default") + '"'


def _policy_body(ctx: Ctx) -> str:
    try:
        text = ctx.raw_body.decode()
    except UnicodeDecodeError:
        raise ApiError(400, "the policy file is not UTF-8") from None
    if not text.strip():
        raise ApiError(400, "the policy file is empty")
    return text


def _policy_answer(ctx: Ctx, text: str | None) -> Response:
    from projections.policystate import ALLOW_ALL_POLICY

    shown = text if text is not None else ALLOW_ALL_POLICY
    accept = request.headers.get("Accept", "")
    if "application/hujson" in accept:
        response = Response(shown, content_type="application/hujson")
    else:
        from projections.policy.hujson import load_legacy_hujson

        try:
            value = load_legacy_hujson(shown)
        except ValueError:
            value = {}
        response = Response(json.dumps(value), content_type="application/json")
    response.headers["ETag"] = _etag(text)
    return response


async def get_policy_file(ctx: Ctx) -> Response:
    _tailnet(ctx)
    return _policy_answer(ctx, ctx.state.policy_text)


async def set_policy_file(ctx: Ctx) -> Response:
    _tailnet(ctx)
    text = _policy_body(ctx)
    ctx.require_admin()
    wanted = request.headers.get("If-Match")
    if wanted is not None and wanted.strip() not in (_etag(ctx.state.policy_text), "*"):
        raise ApiError(412, "the policy file changed since it was read (ETag mismatch); read it again")
    await ctx.op("policy.set", {"text": text})
    return _policy_answer(ctx, ctx.state.policy_text)


async def validate_policy_file(ctx: Ctx) -> V2Validation:
    _tailnet(ctx)
    text = _policy_body(ctx)
    try:
        await ctx.op("policy.check", {"text": text})
    except ApiError as exc:
        if exc.status != 400:
            raise
        return V2Validation(message=exc.detail)
    return V2Validation()


async def preview_policy_file(ctx: Ctx) -> V2Preview:
    _tailnet(ctx)
    kind, target = ctx.query("type"), ctx.query("previewFor")
    if kind not in ("user", "ipport") or not target:
        raise ApiError(400, "give type=user or type=ipport, and previewFor")
    text = _policy_body(ctx)
    ctx.require_admin()
    impact = await ctx.op("policy.impact", {"text": text})  # also checks the policy
    from projections.policy import PolicyError

    from .preview import preview_matches

    try:
        matches = preview_matches(ctx.state, text, kind, target)
    except (PolicyError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None
    return V2Preview(type=kind, preview_for=target, matches=matches, impact=impact)


# -- DNS -----------------------------------------------------------------------------------------


def _dns_handlers(
    view: Callable[[DNSSettings], R], request_type: type[B], change: Callable[[B], dict[str, object]]
) -> tuple[Callable[[Ctx], Awaitable[R]], Callable[[Ctx], Awaitable[R]]]:
    """The GET and POST handlers of one view of the tailnet's DNS settings: GET answers
    ``view`` of the effective settings; POST (an admin's) records ``change`` of the
    request body (``dns.set``), then answers like GET."""

    async def get(ctx: Ctx) -> R:
        _tailnet(ctx)
        return view(effective_dns_settings(ctx.service.config, ctx.state))

    async def set_(ctx: Ctx) -> R:
        _tailnet(ctx)
        body = ctx.body(request_type)
        ctx.require_admin()
        await ctx.op("dns.set", change(body))
        return await get(ctx)

    return get, set_


get_nameservers, set_nameservers = _dns_handlers(
    lambda dns: V2Nameservers(dns=list(dns.nameservers), magic_dns=dns.magic_dns),
    V2NameserversRequest,
    lambda body: {"nameservers": body.dns},
)
get_search_paths, set_search_paths = _dns_handlers(
    lambda dns: V2SearchPaths(search_paths=list(dns.search_domains)),
    V2SearchPaths,
    lambda body: {"search_paths": body.search_paths},
)
get_dns_preferences, set_dns_preferences = _dns_handlers(
    lambda dns: V2DnsPreferences(magic_dns=dns.magic_dns),
    V2DnsPreferences,
    lambda body: {"magic_dns": body.magic_dns},
)


# -- users -----------------------------------------------------------------------------------------


async def list_users(ctx: Ctx) -> V2Users:
    _tailnet(ctx)
    role = ctx.query("role")
    counts: dict[int, int] = {}
    online: set[int] = set()
    for node in ctx.state.nodes.values():
        counts[node.user_id] = counts.get(node.user_id, 0) + 1
        if ctx.is_online(node.id):
            online.add(node.user_id)
    users = [
        V2User(
            id=str(u.id),
            display_name=u.display_name,
            login_name=u.login_name,
            profile_pic_url=u.profile_pic_url,
            tailnet_id="-",
            created=u.created_at,
            type="member",
            role=u.role,
            status="active",
            device_count=counts.get(u.id, 0),
            last_seen=None,
            currently_connected=u.id in online,
        )
        for u in sorted(ctx.state.users.values(), key=lambda u: u.id)
        if ctx.principal.sees_user(u.id) and (role is None or u.role == role)
    ]
    return V2Users(users=users)


# -- OAuth -----------------------------------------------------------------------------------------


def _oauth_error(status: int, error: str, description: str) -> Response:
    body = json.dumps({"error": error, "error_description": description})
    return Response(body, status=status, content_type="application/json")


async def oauth_token(ctx: Ctx) -> Response:
    """Client credentials grant (RFC 6749 4.4), form-encoded; credentials in the form
    or as HTTP Basic."""
    form = await request.form
    client_id, secret = form.get("client_id"), form.get("client_secret")
    if request.authorization is not None and request.authorization.type == "basic":
        client_id = client_id or request.authorization.username
        secret = secret or request.authorization.password
    grant = form.get("grant_type", "client_credentials")
    if grant != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", "only client_credentials is supported")
    if not client_id or not secret:
        return _oauth_error(401, "invalid_client", "give client_id and client_secret")
    try:
        token, entry = ctx.service.issue_token(client_id, secret, form.get("scope"))
    except ApiError as exc:
        code = "invalid_scope" if exc.status == 400 else "invalid_client"
        return _oauth_error(exc.status, code, exc.detail)
    answer = V2Token(
        access_token=token, token_type="Bearer", expires_in=int(TOKEN_LIFETIME.total_seconds()),
        scope=" ".join(entry.scopes),
    )
    response = Response(msgspec.json.encode(answer), content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def add_v2_routes(service: ApiService) -> None:
    """Register the v2 routes."""

    def r(method: str, path: str, handler: Any, op: str, summary: str, response: Any, scope: str | None,
          body: Any = None, tags: tuple[str, ...] = (), query: tuple[str, ...] = (), **kw: Any) -> None:
        service.add(Route(method=method, path=f"/api/v2{path}", handler=handler, operation_id=op,
                          summary=summary, response=response, body=body, scope=scope, tags=tags, api="v2",
                          query=query, **kw))

    dev = ("Devices",)
    r("GET", "/tailnet/{tailnet}/devices", list_devices, "listDevices", "List devices", V2Devices,
      "devices:core:read", tags=dev, query=("fields",))
    r("GET", "/device/{deviceId}", get_device, "getDevice", "Get a device", V2Device, "devices:core:read",
      tags=dev, query=("fields",))
    r("DELETE", "/device/{deviceId}", delete_device, "deleteDevice", "Delete a device", V2Empty, "devices:core",
      tags=dev)
    r("POST", "/device/{deviceId}/authorized", authorize_device, "authorizeDevice", "Authorize a device", V2Empty,
      "devices:core", V2Authorized, dev)
    r("POST", "/device/{deviceId}/expire", expire_device, "expireDeviceKey", "Expire a device's key", V2Empty,
      "devices:core", tags=dev)
    r("POST", "/device/{deviceId}/name", rename_device, "setDeviceName", "Set a device's name", V2Empty,
      "devices:core", V2Name, dev)
    r("POST", "/device/{deviceId}/tags", tag_device, "setDeviceTags", "Set a device's tags", V2Empty,
      "devices:core", V2Tags, dev)
    r("GET", "/device/{deviceId}/routes", device_routes, "listDeviceRoutes", "A device's routes", V2DeviceRoutes,
      "devices:routes:read", tags=dev)
    r("POST", "/device/{deviceId}/routes", set_device_routes, "setDeviceRoutes", "Set a device's enabled routes",
      V2DeviceRoutes, "devices:routes", V2Routes, dev)
    keys = ("Keys",)
    r("GET", "/tailnet/{tailnet}/keys", list_keys, "listTailnetKeys",
      "List auth keys; with all=true the OAuth clients too (keyType client, scope oauth_keys:read)", V2Keys,
      "auth_keys:read", tags=keys, query=("all",), also_scopes=("oauth_keys:read",))
    r("POST", "/tailnet/{tailnet}/keys", create_key, "createKey",
      "Create an auth key, or with keyType client an OAuth client (scope oauth_keys); shown once", V2Key,
      "auth_keys", V2KeyRequest, keys, also_scopes=("oauth_keys",))
    r("GET", "/tailnet/{tailnet}/keys/{keyId}", get_key, "getKey",
      "Get an auth key, or an OAuth client by its client id (scope oauth_keys:read)", V2Key, "auth_keys:read",
      tags=keys, also_scopes=("oauth_keys:read",))
    r("DELETE", "/tailnet/{tailnet}/keys/{keyId}", delete_key, "deleteKey",
      "Revoke an auth key, or delete an OAuth client by its client id (scope oauth_keys)", V2Empty,
      "auth_keys", tags=keys, also_scopes=("oauth_keys",))
    pol = ("Policy file",)
    r("GET", "/tailnet/{tailnet}/acl", get_policy_file, "getPolicyFile",
      "The policy file (HuJSON with Accept: application/hujson, else JSON), with its ETag", None,
      "policy_file:read", tags=pol, content_type="application/hujson")
    r("POST", "/tailnet/{tailnet}/acl", set_policy_file, "setPolicyFile",
      "Set the policy file (If-Match: the ETag it was based on)", None, "policy_file", tags=pol,
      content_type="application/hujson")
    r("POST", "/tailnet/{tailnet}/acl/validate", validate_policy_file, "validatePolicyFile",
      "Check a policy file and run its tests, without setting it", V2Validation, "policy_file:read", tags=pol)
    r("POST", "/tailnet/{tailnet}/acl/preview", preview_policy_file, "previewPolicyFile",
      "What a policy file would change (tailledger policy impact)", V2Preview, "policy_file:read", tags=pol,
      query=("type", "previewFor"))
    dns = ("DNS",)
    r("GET", "/tailnet/{tailnet}/dns/nameservers", get_nameservers, "listDNSNameservers", "The DNS name servers",
      V2Nameservers, "dns:read", tags=dns)
    r("POST", "/tailnet/{tailnet}/dns/nameservers", set_nameservers, "setDNSNameservers",
      "Set the DNS name servers", V2Nameservers, "dns", V2NameserversRequest, dns)
    r("GET", "/tailnet/{tailnet}/dns/searchpaths", get_search_paths, "listDNSSearchPaths", "The DNS search paths",
      V2SearchPaths, "dns:read", tags=dns)
    r("POST", "/tailnet/{tailnet}/dns/searchpaths", set_search_paths, "setDNSSearchPaths",
      "Set the DNS search paths", V2SearchPaths, "dns", V2SearchPaths, dns)
    r("GET", "/tailnet/{tailnet}/dns/preferences", get_dns_preferences, "getDNSPreferences",
      "The DNS preferences (MagicDNS)", V2DnsPreferences, "dns:read", tags=dns)
    r("POST", "/tailnet/{tailnet}/dns/preferences", set_dns_preferences, "setDNSPreferences",
      "Set the DNS preferences (MagicDNS)", V2DnsPreferences, "dns", V2DnsPreferences, dns)
    r("GET", "/tailnet/{tailnet}/users", list_users, "listUsers2", "List users", V2Users, "users:read",
      tags=("Users",), query=("type", "role"))
    service.add(Route(method="POST", path="/api/v2/oauth/token", handler=oauth_token, operation_id="oauthToken",
                      summary="OAuth client credentials grant: a one-hour access token", response=V2Token,
                      auth=False, api="v2", tags=("OAuth",)))
