"""The tailnet state folded from the log: users, keys, nodes, routes and policy.

State is immutable. Collections are persistent hash maps (``immutables.Map``, the HAMT
behind ``contextvars``): a fold step returns a new state sharing almost everything with
the old one in O(log n), so every stream, query and replay can hold a consistent
snapshot without locks or copies. Derived indexes (by node key, machine key, address,
name) are maintained by the fold next to the primary maps and rebuilt in one place
(:func:`rebuild_indexes`) when a checkpoint is loaded.

Invariant: ``seq`` is the sequence number of the last event folded in; every id map is
consistent with its indexes; ``next_*_id`` is greater than every id ever used (ids are
never reused, even after deletion).
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Final

import msgspec
from immutables import Map

from eventlog.events import DnsExtraRecord

__all__ = [
    "ApiKey",
    "Node",
    "PreAuthKey",
    "TailnetState",
    "User",
    "rebuild_indexes",
    "shared_node",
    "shared_str",
    "shared_strs",
    "shared_with",
]


class SshApproval(msgspec.Struct, frozen=True):
    """An admin's approval of SSH check mode for one source node and local user.

    ``approved_at`` is None for approvals recorded before it was: those cover every
    destination until ``until``; newer ones cover a connection while it is within the
    ``checkPeriod`` of the check rule holding it (see ``commands.ssh_check_approved``).
    """

    approved_at: datetime | None
    until: datetime


class User(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    name: str
    display_name: str
    email: str
    provider: str
    provider_id: str
    profile_pic_url: str
    created_at: datetime
    role: str = "member"  # owner, admin or member (eventlog.events.ROLES)
    updated_seq: int = 0  # the last event that changed this user (0: unknown, an older snapshot)

    @property
    def is_admin(self) -> bool:
        """Whether the user may see and change the whole tailnet (owners are admins)."""
        return self.role in ("owner", "admin")

    @property
    def login_name(self) -> str:
        """The name policies match: the e-mail when known, else the bare name."""
        return self.email or self.name


class PreAuthKey(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    prefix: str
    secret_sha256: str
    user_id: int | None
    reusable: bool
    ephemeral: bool
    tags: tuple[str, ...]
    expires_at: datetime | None
    created_at: datetime
    revoked: bool = False
    used_by: tuple[int, ...] = ()

    def usable_at(self, now: datetime) -> str | None:
        """Why this key can't register a new node at ``now``, or ``None`` if it can."""
        if self.revoked:
            return "the pre-auth key has been expired by an admin"
        if self.expires_at is not None and self.expires_at <= now:
            return "the pre-auth key has expired"
        if not self.reusable and self.used_by:
            return "the pre-auth key has already been used"
        return None


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """An admin API key or an OAuth client (``kind``), see ``ApiKeyCreated``."""

    id: int
    prefix: str
    secret_sha256: str
    expires_at: datetime | None
    created_at: datetime
    revoked: bool = False
    kind: str = "apikey"
    user_id: int | None = None
    role: str = "admin"
    scopes: tuple[str, ...] = ()
    description: str = ""

    def usable_at(self, now: datetime) -> str | None:
        """Why this credential authenticates nothing at ``now``, or ``None``."""
        if self.revoked:
            return "the key has been expired"
        if self.expires_at is not None and self.expires_at <= now:
            return "the key has expired"
        return None


# Values that thousands of nodes repeat (an OS name, a client version, a tag, how the
# node was authorized) are decoded as a fresh string per node; kept in the state for
# the node's lifetime, the copies cost ~50-70 bytes each per node. Interned, equal
# values are one object. Interned strings are freed with their last user, and only
# short ones are interned (the repeated kind; a long value is someone's own).
SHARED_STR_MAX: Final = 64


def shared_str(value: str) -> str:
    """``value``, as the one object every equal short string kept in state shares."""
    return sys.intern(value) if len(value) <= SHARED_STR_MAX and type(value) is str else value


def shared_strs(values: tuple[str, ...]) -> tuple[str, ...]:
    """``values`` with each element :func:`shared_str` (the tuple itself is new)."""
    return tuple(map(shared_str, values))


def shared_with(value: str, other: str) -> str:
    """``value``, as the object ``other`` is when they are equal: a node's given name
    is usually its host name, and keeps it once, not as the decoder's two copies."""
    return other if value == other else value


def shared_node(node: Node, key: PreAuthKey | None) -> Node:
    """``node`` sharing what the fold shares (see :func:`shared_str`): its repeated
    short strings, its pre-auth key's (``key``) tags tuple when equal, and one object
    for equal host and given names. For nodes decoded from a checkpoint."""
    return msgspec.structs.replace(
        node,
        given_name=shared_with(node.given_name, node.hostname),
        tags=key.tags if key is not None and key.tags == node.tags else shared_strs(node.tags),
        auth=shared_str(node.auth),
        os=shared_str(node.os),
    )


class Node(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One machine. Keys are lower-case hex of the 32 raw bytes.

    Its fields (numbers, strings, times, tuples of strings) cannot reach back to it, so
    it carries no garbage-collector header (16 bytes per node; issue 19)."""

    id: int
    machine_key: str
    node_key: str
    user_id: int
    hostname: str
    given_name: str
    ipv4: str | None
    ipv6: str | None
    tags: tuple[str, ...]
    ephemeral: bool
    expiry: datetime | None
    created_at: datetime
    auth: str
    preauthkey_id: int | None
    os: str = ""
    advertised_routes: tuple[str, ...] = ()
    approved_routes: tuple[str, ...] = ()
    logged_out: bool = False
    updated_seq: int = 0  # the last event that changed this node (for cheap diffs)

    def is_expired(self, now: datetime) -> bool:
        """Whether the node's key is out of use at ``now``: expired (by time or by an
        admin) or logged out. Such a node sees no peers and no peer sees it."""
        return self.logged_out or (self.expiry is not None and self.expiry <= now)

    @property
    def is_tagged(self) -> bool:
        return bool(self.tags)


class TailnetState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the log says, as of event ``seq``."""

    seq: int = 0
    last_event_at: datetime | None = None
    users: Map[int, User] = msgspec.field(default_factory=Map)
    nodes: Map[int, Node] = msgspec.field(default_factory=Map)
    preauth_keys: Map[int, PreAuthKey] = msgspec.field(default_factory=Map)
    api_keys: Map[int, ApiKey] = msgspec.field(default_factory=Map)
    policy_text: str | None = None
    policy_sha256: str | None = None
    policy_source: str | None = None
    policy_set_at: datetime | None = None  # when the policy in force was recorded
    # DNS settings made through the API (``dns.set``); None: as configured.
    dns_nameservers: tuple[str, ...] | None = None
    dns_search_paths: tuple[str, ...] | None = None
    dns_magic_dns: bool | None = None
    # Extra DNS records (``dns.extra_records_set``); None: none recorded yet.
    dns_extra_records: tuple[DnsExtraRecord, ...] | None = None
    # SSH check mode: "<src node id>/<local user>" -> its last approval.
    ssh_checks: Map[str, SshApproval] = msgspec.field(default_factory=Map)
    next_user_id: int = 1
    next_node_id: int = 1
    next_preauth_key_id: int = 1
    next_api_key_id: int = 1
    # Derived indexes (see rebuild_indexes).
    node_by_node_key: Map[str, int] = msgspec.field(default_factory=Map)
    node_by_machine_key: Map[str, int] = msgspec.field(default_factory=Map)
    node_by_ip: Map[str, int] = msgspec.field(default_factory=Map)
    user_by_name: Map[str, int] = msgspec.field(default_factory=Map)
    # Given name -> how many nodes hold it (one, unless an old log recorded a duplicate).
    node_names: Map[str, int] = msgspec.field(default_factory=Map)
    # The last addresses handed out: sequential allocation continues after them, so a
    # freed address is not handed out again until the range wraps around.
    last_ipv4: str | None = None
    last_ipv6: str | None = None
    # The recorded primary router of each subnet prefix (route.primary_changed events):
    # the route election keeps these while they serve the prefix (see policystate).
    route_primaries: Map[str, int] = msgspec.field(default_factory=Map)

    def user_named(self, name: str) -> User | None:
        uid = self.user_by_name.get(name)
        return None if uid is None else self.users[uid]

    def node_by_key(self, node_key: str) -> Node | None:
        nid = self.node_by_node_key.get(node_key)
        return None if nid is None else self.nodes[nid]

    def node_by_machine(self, machine_key: str) -> Node | None:
        nid = self.node_by_machine_key.get(machine_key)
        return None if nid is None else self.nodes[nid]

    def node_named(self, given_name: str) -> Node | None:
        if given_name not in self.node_names:
            return None
        for node in self.nodes.values():
            if node.given_name == given_name:
                return node
        return None


def rebuild_indexes(state: TailnetState) -> TailnetState:
    """Recompute every derived index from the primary maps."""
    by_key: dict[str, int] = {}
    by_machine: dict[str, int] = {}
    by_ip: dict[str, int] = {}
    for node in state.nodes.values():
        by_key[node.node_key] = node.id
        by_machine[node.machine_key] = node.id
        for ip in (node.ipv4, node.ipv6):
            if ip is not None:
                by_ip[ip] = node.id
    by_name = {user.name: user.id for user in state.users.values()}
    names: dict[str, int] = {}
    for node in state.nodes.values():
        names[node.given_name] = names.get(node.given_name, 0) + 1
    return msgspec.structs.replace(
        state,
        node_by_node_key=Map(by_key),
        node_by_machine_key=Map(by_machine),
        node_by_ip=Map(by_ip),
        user_by_name=Map(by_name),
        node_names=Map(names),
    )
