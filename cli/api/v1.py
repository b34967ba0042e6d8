"""``/api/v1``: Headscale's REST API (paths and JSON shapes of ``hscontrol/api/v1``).

Reads come from the current projection; every write is an admin operation
(:class:`projections.admin.AdminOps`) run as the request's principal.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Final

from projections import commands as c
from projections.state import ApiKey, Node, PreAuthKey, User

from .core import ApiError, ApiService, Ctx, NodeList, Route
from .schema import (
    V1ApiKey,
    V1ApiKeys,
    V1CreateApiKey,
    V1CreateApiKeyRequest,
    V1CreatePreAuthKeyRequest,
    V1CreateUserRequest,
    V1Empty,
    V1ExpireApiKeyRequest,
    V1ExpirePreAuthKeyRequest,
    V1Node,
    V1NodeEnvelope,
    V1Nodes,
    V1Policy,
    V1PolicyRequest,
    V1PreAuthKey,
    V1PreAuthKeyEnvelope,
    V1PreAuthKeys,
    V1Routes,
    V1Tags,
    V1User,
    V1UserEnvelope,
    V1Users,
)

__all__ = ["add_v1_routes", "v1_node", "v1_user"]

_REGISTER_METHOD: Final = {
    "preauthkey": "REGISTER_METHOD_AUTH_KEY",
    "cli": "REGISTER_METHOD_CLI",
    "oidc": "REGISTER_METHOD_OIDC",
}


def v1_user(user: User) -> V1User:
    return V1User(
        id=str(user.id),
        name=user.name,
        created_at=user.created_at,
        display_name=user.display_name,
        email=user.email,
        provider_id=user.provider_id,
        provider=user.provider,
        profile_pic_url=user.profile_pic_url,
        role=user.role,
    )


def _user_or_none(ctx: Ctx, user_id: int | None) -> V1User | None:
    user = ctx.state.users.get(user_id) if user_id is not None else None
    return v1_user(user) if user is not None else None


def v1_preauth_key(ctx: Ctx, key: PreAuthKey, full: str | None = None) -> V1PreAuthKey:
    return V1PreAuthKey(
        user=_user_or_none(ctx, key.user_id),
        id=str(key.id),
        key=full or f"{c.PREAUTH_KEY_PREFIX}{key.prefix}-…",
        reusable=key.reusable,
        ephemeral=key.ephemeral,
        used=bool(key.used_by),
        expiration=key.expires_at,
        created_at=key.created_at,
        acl_tags=list(key.tags),
    )


def v1_node(ctx: Ctx, node: Node) -> V1Node:
    served = sorted(set(node.advertised_routes) & set(node.approved_routes))
    key = ctx.state.preauth_keys.get(node.preauthkey_id) if node.preauthkey_id is not None else None
    return V1Node(
        id=str(node.id),
        machine_key=f"mkey:{node.machine_key}",
        node_key=f"nodekey:{node.node_key}",
        disco_key="",
        ip_addresses=[ip for ip in (node.ipv4, node.ipv6) if ip],
        name=node.hostname,
        user=_user_or_none(ctx, node.user_id),
        last_seen=ctx.last_seen(node.id),
        expiry=node.expiry,
        pre_auth_key=v1_preauth_key(ctx, key) if key is not None else None,
        created_at=node.created_at,
        register_method=_REGISTER_METHOD.get(node.auth, "REGISTER_METHOD_UNSPECIFIED"),
        given_name=node.given_name,
        online=ctx.is_online(node.id),
        approved_routes=list(node.approved_routes),
        available_routes=list(node.advertised_routes),
        subnet_routes=served,
        tags=list(node.tags),
    )


def v1_api_key(ctx: Ctx, key: ApiKey) -> V1ApiKey:
    return V1ApiKey(
        id=str(key.id),
        prefix=key.prefix,
        expiration=key.expires_at,
        created_at=key.created_at,
        last_seen=None,
        role=key.role,
        user=_user_or_none(ctx, key.user_id),
    )


def _node_envelope(ctx: Ctx, node_id: int) -> V1NodeEnvelope:
    return V1NodeEnvelope(node=v1_node(ctx, ctx.state.nodes[node_id]))


def _user(ctx: Ctx, ref: str) -> User:
    """A user by id (or name) the principal may see."""
    return ctx.visible(c.find_user, ref, lambda user: user.id, "user")


def _seconds_until(ctx: Ctx, when: datetime | None) -> int | None:
    if when is None:
        return None
    seconds = math.ceil((when - ctx.service.now()).total_seconds())
    if seconds <= 0:
        raise ApiError(400, "the expiration must be in the future")
    return seconds


# -- users ---------------------------------------------------------------------------------


async def list_users(ctx: Ctx) -> V1Users:
    ident, name, email = ctx.query("id"), ctx.query("name"), ctx.query("email")
    users = [
        u
        for u in sorted(ctx.state.users.values(), key=lambda u: u.id)
        if ctx.principal.sees_user(u.id)
        and (ident is None or str(u.id) == ident)
        and (name is None or u.name == name)
        and (email is None or u.email == email)
    ]
    return V1Users(users=[v1_user(u) for u in users])


async def create_user(ctx: Ctx) -> V1UserEnvelope:
    body = ctx.body(V1CreateUserRequest)
    ctx.require_admin()
    view = await ctx.op(
        "users.create", {"name": body.name, "display_name": body.display_name, "email": body.email, "role": body.role}
    )
    return V1UserEnvelope(user=v1_user(ctx.state.users[view["id"]]))


async def rename_user(ctx: Ctx) -> V1UserEnvelope:
    ctx.require_admin()
    user = _user(ctx, ctx.params["oldId"])
    await ctx.op("users.rename", {"user": str(user.id), "new_name": ctx.params["newName"]})
    return V1UserEnvelope(user=v1_user(ctx.state.users[user.id]))


async def delete_user(ctx: Ctx) -> V1Empty:
    ctx.require_admin()
    user = _user(ctx, ctx.params["id"])
    await ctx.op("users.delete", {"user": str(user.id)})
    return V1Empty()


# -- nodes ---------------------------------------------------------------------------------


async def list_nodes(ctx: Ctx) -> NodeList:
    ref = ctx.query("user")
    uid = _user(ctx, ref).id if ref is not None else None
    return await ctx.node_list(
        lambda nodes: V1Nodes(nodes=[v1_node(ctx, n) for n in nodes if uid is None or n.user_id == uid]), uid
    )


async def get_node(ctx: Ctx) -> V1NodeEnvelope:
    return V1NodeEnvelope(node=v1_node(ctx, ctx.node(ctx.params["nodeId"])))


async def rename_node(ctx: Ctx) -> V1NodeEnvelope:
    node = await ctx.node_op("nodeId", "nodes.rename", {"new_name": ctx.params["newName"]})
    return _node_envelope(ctx, node.id)


async def expire_node(ctx: Ctx) -> V1NodeEnvelope:
    node = await ctx.node_op("nodeId", "nodes.expire")
    return _node_envelope(ctx, node.id)


async def delete_node(ctx: Ctx) -> V1Empty:
    await ctx.node_op("nodeId", "nodes.delete")
    return V1Empty()


async def set_tags(ctx: Ctx) -> V1NodeEnvelope:
    body = ctx.body(V1Tags)
    node = await ctx.node_op("nodeId", "nodes.tag", {"tags": body.tags}, admin=True)
    return _node_envelope(ctx, node.id)


async def approve_routes(ctx: Ctx) -> V1NodeEnvelope:
    body = ctx.body(V1Routes)
    node = await ctx.node_op("nodeId", "nodes.approve_routes", {"routes": body.routes}, admin=True)
    return _node_envelope(ctx, node.id)


async def register_node(ctx: Ctx) -> V1NodeEnvelope:
    """Approve a pending interactive registration (its AuthURL's id) for a user."""
    user_ref, key = ctx.query("user"), ctx.query("key")
    if user_ref is None or key is None:
        raise ApiError(400, "give the user and the key (the registration id of the AuthURL)")
    user = _user(ctx, user_ref)
    result = await ctx.op("nodes.register", {"key": key, "user": str(user.id)})
    return _node_envelope(ctx, int(result["registered"]))


# -- pre-auth keys -------------------------------------------------------------------------


async def list_preauth_keys(ctx: Ctx) -> V1PreAuthKeys:
    ref = ctx.query("user")
    uid = _user(ctx, ref).id if ref is not None else None
    keys = [
        k
        for k in sorted(ctx.state.preauth_keys.values(), key=lambda k: k.id)
        if ctx.principal.sees_user(k.user_id) and (uid is None or k.user_id == uid)
    ]
    return V1PreAuthKeys(pre_auth_keys=[v1_preauth_key(ctx, k) for k in keys])


async def create_preauth_key(ctx: Ctx) -> V1PreAuthKeyEnvelope:
    body = ctx.body(V1CreatePreAuthKeyRequest)
    user = _user(ctx, body.user) if body.user else None
    if not ctx.principal.is_admin:
        if body.acl_tags:
            raise ApiError(403, "tagged keys need an admin key")
        if user is None:
            user = ctx.state.users.get(ctx.principal.user_id or 0)
    view = await ctx.op(
        "preauthkeys.create",
        {
            "user": str(user.id) if user is not None else None,
            "reusable": body.reusable,
            "ephemeral": body.ephemeral,
            "tags": body.acl_tags,
            "expiration_seconds": _seconds_until(ctx, body.expiration) if body.expiration else 3600,
        },
    )
    key = ctx.state.preauth_keys[view["id"]]
    return V1PreAuthKeyEnvelope(pre_auth_key=v1_preauth_key(ctx, key, view["key"]))


async def expire_preauth_key(ctx: Ctx) -> V1Empty:
    body = ctx.body(V1ExpirePreAuthKeyRequest)
    ref = body.id or body.key
    if not ref:
        raise ApiError(400, "give the key's id (or the key)")
    key = ctx.visible(c.find_preauth_key, ref, lambda key: key.user_id, "pre-auth key")
    await ctx.op("preauthkeys.expire", {"key": str(key.id)})
    return V1Empty()


# -- API keys ------------------------------------------------------------------------------


def _visible_api_key(ctx: Ctx, ref: str) -> ApiKey:
    return ctx.visible(c.find_api_key, ref, lambda key: key.user_id, "API key")


async def list_api_keys(ctx: Ctx) -> V1ApiKeys:
    keys = [
        k
        for k in sorted(ctx.state.api_keys.values(), key=lambda k: k.id)
        if k.kind == "apikey" and ctx.principal.sees_user(k.user_id)
    ]
    return V1ApiKeys(api_keys=[v1_api_key(ctx, k) for k in keys])


async def create_api_key(ctx: Ctx) -> V1CreateApiKey:
    body = ctx.body(V1CreateApiKeyRequest)
    p = ctx.principal
    role = body.role or p.role
    if role == "admin" and not p.is_admin:
        raise ApiError(403, "a member key can only make member keys")
    user = _user(ctx, body.user) if body.user else None
    if user is None and p.user_id is not None:
        user = ctx.state.users.get(p.user_id)
    seconds = _seconds_until(ctx, body.expiration) if body.expiration else 90 * 86400
    view = await ctx.op(
        "apikeys.create",
        {"user": str(user.id) if user else None, "role": role, "expiration_seconds": seconds},
    )
    return V1CreateApiKey(api_key=view["key"])


async def expire_api_key(ctx: Ctx) -> V1Empty:
    body = ctx.body(V1ExpireApiKeyRequest)
    ref = body.prefix or body.id
    if not ref:
        raise ApiError(400, "give the key's prefix or id")
    key = _visible_api_key(ctx, ref)
    await ctx.op("apikeys.expire", {"key": str(key.id)})
    return V1Empty()


async def delete_api_key(ctx: Ctx) -> V1Empty:
    key = _visible_api_key(ctx, ctx.params["prefix"])
    await ctx.op("apikeys.delete", {"key": str(key.id)})
    return V1Empty()


# -- policy ----------------------------------------------------------------------------------


async def get_policy(ctx: Ctx) -> V1Policy:
    state = ctx.state
    if state.policy_text is None:
        raise ApiError(404, "no policy has been set (the tailnet runs the allow-all default)")
    return V1Policy(policy=state.policy_text, updated_at=state.policy_set_at)


async def set_policy(ctx: Ctx) -> V1Policy:
    body = ctx.body(V1PolicyRequest)
    ctx.require_admin()
    await ctx.op("policy.set", {"text": body.policy})
    return V1Policy(policy=ctx.state.policy_text or body.policy, updated_at=ctx.state.policy_set_at)


def add_v1_routes(service: ApiService) -> None:
    def r(method: str, path: str, handler: object, op: str, summary: str, response: object, body: object = None,
          tags: tuple[str, ...] = (), query: tuple[str, ...] = ()) -> None:
        service.add(Route(method=method, path=f"/api/v1{path}", handler=handler,  # type: ignore[arg-type]
                          operation_id=op, summary=summary, response=response, body=body, tags=tags, query=query))

    r("GET", "/user", list_users, "listUsers", "List users", V1Users, tags=("Users",), query=("id", "name", "email"))
    r("POST", "/user", create_user, "createUser", "Create a user", V1UserEnvelope, V1CreateUserRequest, ("Users",))
    r("POST", "/user/{oldId}/rename/{newName}", rename_user, "renameUser", "Rename a user", V1UserEnvelope,
      tags=("Users",))
    r("DELETE", "/user/{id}", delete_user, "deleteUser", "Delete a user who owns no nodes", V1Empty, tags=("Users",))
    r("GET", "/node", list_nodes, "listNodes", "List nodes", V1Nodes, tags=("Nodes",), query=("user",))
    r("POST", "/node/register", register_node, "registerNode", "Approve a pending registration (AuthURL) for a user",
      V1NodeEnvelope, tags=("Nodes",), query=("user", "key"))
    r("GET", "/node/{nodeId}", get_node, "getNode", "Get a node", V1NodeEnvelope, tags=("Nodes",))
    r("DELETE", "/node/{nodeId}", delete_node, "deleteNode", "Delete a node", V1Empty, tags=("Nodes",))
    r("POST", "/node/{nodeId}/rename/{newName}", rename_node, "renameNode", "Rename a node", V1NodeEnvelope,
      tags=("Nodes",))
    r("POST", "/node/{nodeId}/expire", expire_node, "expireNode", "Expire a node's key now", V1NodeEnvelope,
      tags=("Nodes",))
    r("POST", "/node/{nodeId}/tags", set_tags, "setTags", "Replace a node's tags", V1NodeEnvelope, V1Tags, ("Nodes",))
    r("POST", "/node/{nodeId}/approve_routes", approve_routes, "setApprovedRoutes", "Set a node's approved routes",
      V1NodeEnvelope, V1Routes, ("Nodes",))
    r("GET", "/preauthkey", list_preauth_keys, "listPreAuthKeys", "List pre-auth keys", V1PreAuthKeys,
      tags=("PreAuthKeys",), query=("user",))
    r("POST", "/preauthkey", create_preauth_key, "createPreAuthKey", "Create a pre-auth key (shown once)",
      V1PreAuthKeyEnvelope, V1CreatePreAuthKeyRequest, ("PreAuthKeys",))
    r("POST", "/preauthkey/expire", expire_preauth_key, "expirePreAuthKey", "Expire a pre-auth key", V1Empty,
      V1ExpirePreAuthKeyRequest, ("PreAuthKeys",))
    r("GET", "/apikey", list_api_keys, "listApiKeys", "List API keys", V1ApiKeys, tags=("ApiKeys",))
    r("POST", "/apikey", create_api_key, "createApiKey", "Create an API key (shown once)", V1CreateApiKey,
      V1CreateApiKeyRequest, ("ApiKeys",))
    r("POST", "/apikey/expire", expire_api_key, "expireApiKey", "Expire an API key", V1Empty, V1ExpireApiKeyRequest,
      ("ApiKeys",))
    r("DELETE", "/apikey/{prefix}", delete_api_key, "deleteApiKey", "Delete an API key", V1Empty, tags=("ApiKeys",))
    r("GET", "/policy", get_policy, "getPolicy", "Get the policy in force", V1Policy, tags=("Policy",))
    r("PUT", "/policy", set_policy, "setPolicy", "Set the policy", V1Policy, V1PolicyRequest, ("Policy",))
