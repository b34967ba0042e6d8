"""The wire shapes of the admin HTTP API, as msgspec types.

They are the single description of the API: handlers encode responses and decode
requests with them, and the OpenAPI document (:mod:`cli.api.openapi`) is generated from
them. ``/api/v1`` follows Headscale's REST API (``hscontrol/api/v1``: camelCase fields,
ids as strings, ``{"users": [...]}`` envelopes); ``/api/v2`` follows Tailscale's API
(``tailnet/-/devices`` and friends). Request types accept unknown fields, as the real
APIs do, so clients written for a newer version keep working.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

__all__ = [
    "Problem",
    "V1ApiKey",
    "V1ApiKeys",
    "V1CreateApiKey",
    "V1CreateApiKeyRequest",
    "V1CreatePreAuthKeyRequest",
    "V1CreateUserRequest",
    "V1Empty",
    "V1ExpireApiKeyRequest",
    "V1ExpirePreAuthKeyRequest",
    "V1Node",
    "V1NodeEnvelope",
    "V1Nodes",
    "V1Policy",
    "V1PolicyRequest",
    "V1PreAuthKey",
    "V1PreAuthKeyEnvelope",
    "V1PreAuthKeys",
    "V1Routes",
    "V1Tags",
    "V1User",
    "V1UserEnvelope",
    "V1Users",
    "Version",
]


class _Camel(msgspec.Struct, kw_only=True, rename="camel"):
    pass


class Problem(msgspec.Struct, kw_only=True):
    """An error (RFC 7807). ``message`` repeats ``detail`` for Tailscale's API clients,
    which read the message of an error body."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    message: str


class Version(msgspec.Struct, kw_only=True):
    version: str
    api: list[str]


# -- /api/v1 (Headscale) -----------------------------------------------------------------


class V1User(_Camel):
    id: str
    name: str
    created_at: datetime
    display_name: str
    email: str
    provider_id: str
    provider: str
    profile_pic_url: str
    role: str


class V1Users(_Camel):
    users: list[V1User]


class V1UserEnvelope(_Camel):
    user: V1User


class V1CreateUserRequest(_Camel):
    name: str
    display_name: str = ""
    email: str = ""
    picture_url: str = ""
    role: str | None = None


class V1PreAuthKey(_Camel):
    user: V1User | None
    id: str
    key: str
    reusable: bool
    ephemeral: bool
    used: bool
    expiration: datetime | None
    created_at: datetime
    acl_tags: list[str]


class V1PreAuthKeys(_Camel):
    pre_auth_keys: list[V1PreAuthKey]


class V1PreAuthKeyEnvelope(_Camel):
    pre_auth_key: V1PreAuthKey


class V1CreatePreAuthKeyRequest(_Camel):
    user: str | None = None
    reusable: bool = False
    ephemeral: bool = False
    expiration: datetime | None = None
    acl_tags: list[str] = msgspec.field(default_factory=list)


class V1ExpirePreAuthKeyRequest(_Camel):
    id: str | None = None
    key: str | None = None
    user: str | None = None


class V1Node(_Camel):
    id: str
    machine_key: str
    node_key: str
    disco_key: str
    ip_addresses: list[str]
    name: str
    user: V1User | None
    last_seen: datetime | None
    expiry: datetime | None
    pre_auth_key: V1PreAuthKey | None
    created_at: datetime
    register_method: str
    given_name: str
    online: bool
    approved_routes: list[str]
    available_routes: list[str]
    subnet_routes: list[str]
    tags: list[str]


class V1Nodes(_Camel):
    nodes: list[V1Node]


class V1NodeEnvelope(_Camel):
    node: V1Node


class V1Tags(_Camel):
    tags: list[str] = msgspec.field(default_factory=list)


class V1Routes(_Camel):
    routes: list[str] = msgspec.field(default_factory=list)


class V1ApiKey(_Camel):
    id: str
    prefix: str
    expiration: datetime | None
    created_at: datetime
    last_seen: datetime | None
    role: str
    user: V1User | None


class V1ApiKeys(_Camel):
    api_keys: list[V1ApiKey]


class V1CreateApiKeyRequest(_Camel):
    expiration: datetime | None = None
    role: str | None = None
    user: str | None = None


class V1CreateApiKey(_Camel):
    api_key: str


class V1ExpireApiKeyRequest(_Camel):
    prefix: str | None = None
    id: str | None = None


class V1Policy(_Camel):
    policy: str
    updated_at: datetime | None


class V1PolicyRequest(_Camel):
    policy: str


class V1Empty(_Camel):
    pass


# -- /api/v2 (Tailscale) ---------------------------------------------------------------------


class V2Device(_Camel):
    """A device as Tailscale's API describes it (``GET /device/{id}``)."""

    id: str
    node_id: str
    name: str
    hostname: str
    user: str
    addresses: list[str]
    tags: list[str]
    authorized: bool
    is_external: bool
    key_expiry_disabled: bool
    created: datetime
    expires: datetime | None
    last_seen: datetime | None
    connected_to_control: bool
    os: str
    machine_key: str
    node_key: str
    client_version: str
    update_available: bool
    blocks_incoming_connections: bool
    is_ephemeral: bool
    advertised_routes: list[str]
    enabled_routes: list[str]


class V2Devices(_Camel):
    devices: list[V2Device]


class V2Authorized(_Camel):
    authorized: bool


class V2Name(_Camel):
    name: str = ""


class V2Tags(_Camel):
    tags: list[str]


class V2Routes(_Camel):
    routes: list[str]


class V2DeviceRoutes(_Camel):
    advertised_routes: list[str]
    enabled_routes: list[str]


class V2Empty(_Camel):
    pass


class V2KeyCreate(_Camel):
    reusable: bool = False
    ephemeral: bool = False
    preauthorized: bool = False
    tags: list[str] = msgspec.field(default_factory=list)


class V2KeyDevices(_Camel):
    create: V2KeyCreate = msgspec.field(default_factory=V2KeyCreate)


class V2KeyCapabilities(_Camel):
    devices: V2KeyDevices = msgspec.field(default_factory=V2KeyDevices)


class V2Key(_Camel, omit_defaults=True):
    """An auth key (a pre-auth key), or an OAuth client (``keyType: client``, with its
    ``scopes``); ``key`` only in the answer that created it."""

    id: str
    key_type: str
    description: str
    created: datetime
    expires: datetime | None
    revoked: datetime | None
    invalid: bool
    capabilities: V2KeyCapabilities
    user_id: str | None
    key: str | None = None
    scopes: list[str] | None = None


class V2Keys(_Camel):
    keys: list[V2Key]


class V2KeyRequest(_Camel):
    key_type: str = "auth"
    description: str = ""
    expiry_seconds: int | None = None
    capabilities: V2KeyCapabilities = msgspec.field(default_factory=V2KeyCapabilities)
    scopes: list[str] = msgspec.field(default_factory=list)  # keyType "client" only


class V2User(_Camel):
    id: str
    display_name: str
    login_name: str
    profile_pic_url: str
    tailnet_id: str
    created: datetime
    type: str
    role: str
    status: str
    device_count: int
    last_seen: datetime | None
    currently_connected: bool


class V2Users(_Camel):
    users: list[V2User]


class V2Validation(_Camel):
    """``acl/validate``: empty when the policy is valid and its tests pass."""

    message: str | None = None
    data: list[dict[str, Any]] | None = None


class V2Preview(_Camel):
    """``acl/preview``: the rules matching a user or ``ip:port`` (``matches``), and what
    putting the policy in force would change (``impact``, as ``tailledger policy impact``)."""

    type: str
    preview_for: str
    matches: list[dict[str, Any]]
    impact: dict[str, Any]


class V2Token(msgspec.Struct, kw_only=True):
    access_token: str
    token_type: str
    expires_in: int
    scope: str


class V2Nameservers(_Camel):
    dns: list[str]
    magic_dns: bool = msgspec.field(name="magicDNS")


class V2NameserversRequest(_Camel):
    dns: list[str]


class V2SearchPaths(_Camel):
    search_paths: list[str]


class V2DnsPreferences(_Camel):
    magic_dns: bool = msgspec.field(name="magicDNS")
