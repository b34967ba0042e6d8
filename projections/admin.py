"""Administrative operations: the one table of what an operator can do.

Two doors dispatch through :class:`AdminOps`: the CLI's local admin socket
(``cli/adminsock.py``, which the ``tailledger users|nodes|...`` commands talk to) and
the admin HTTP API (``cli/api``: ``/api/v1`` and the Tailscale-compatible ``/api/v2``).
So both accept the same arguments, refuse the same bad input with the same messages, and
record the same events. The operations defined here are the tailnet's own; a layer
above adds the ones it owns with :meth:`AdminOps.register` (decoding its arguments
with :func:`decode_args` likewise) (the control server:
``nodes.register``, ``nodes.pending``, ``nodes.reject``; the serve command:
``log.checkpoint``). Every mutating operation goes through
:meth:`projections.service.Tailnet.execute`; reads come from the current projection.

An operation takes a JSON object of arguments (validated into a Struct: unknown or
mistyped fields are refused before anything happens) and an actor, and returns plain
JSON-able data.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

import msgspec
import trio

from eventlog import Actor
from eventlog.events import PolicyImpact

from . import commands as c
from .errors import CommandError
from .service import Tailnet
from .state import ApiKey, Node, PreAuthKey, TailnetState, User

__all__ = ["AdminOps", "BadRequest", "Presence", "PresenceView", "decode_args"]

A = TypeVar("A", bound=msgspec.Struct)

JSON = object
Handler = Callable[[dict[str, object], Actor], Awaitable[JSON]]


class BadRequest(CommandError):
    """The arguments do not fit the operation."""


@dataclass(frozen=True)
class Presence:
    """What the control plane knows of a node's connection right now (not in the log)."""

    online: bool
    last_seen: datetime | None = None


PresenceView = Callable[[int], Presence | None]


def decode_args(cls: type[A], raw: dict[str, object]) -> A:
    """An operation's arguments as the Struct ``cls`` (``forbid_unknown_fields``).

    Raises:
        BadRequest: a field is missing, mistyped or unknown (nothing happened).
    """
    try:
        return msgspec.convert(raw, type=cls)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"bad arguments: {exc}") from None


class _UserArgs(msgspec.Struct, forbid_unknown_fields=True):
    user: str


class _CreateUser(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    display_name: str = ""
    email: str = ""
    role: str | None = None  # None: owner for the first user, else member


class _SetDns(msgspec.Struct, forbid_unknown_fields=True):
    """Fields left out keep their value; ``null`` returns one to the configuration's."""

    nameservers: list[str] | msgspec.UnsetType | None = msgspec.UNSET
    search_paths: list[str] | msgspec.UnsetType | None = msgspec.UNSET
    magic_dns: bool | msgspec.UnsetType | None = msgspec.UNSET


class _SetRole(msgspec.Struct, forbid_unknown_fields=True):
    user: str
    role: str


class _RenameUser(msgspec.Struct, forbid_unknown_fields=True):
    user: str
    new_name: str


class _ListArgs(msgspec.Struct, forbid_unknown_fields=True):
    user: str | None = None


class _CreateKey(msgspec.Struct, forbid_unknown_fields=True):
    user: str | None = None
    reusable: bool = False
    ephemeral: bool = False
    tags: list[str] = msgspec.field(default_factory=list)
    expiration_seconds: int | None = 3600


class _KeyArgs(msgspec.Struct, forbid_unknown_fields=True):
    key: str


class _CreateApiKey(msgspec.Struct, forbid_unknown_fields=True):
    user: str | None = None
    role: str = "admin"
    expiration_seconds: int | None = 90 * 86400
    description: str = ""
    scopes: list[str] = msgspec.field(default_factory=list)  # OAuth clients only


class _NodeArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str


class _RenameNode(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    new_name: str


class _TagNode(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    tags: list[str]
    user: str | None = None  # the new owner, when clearing the tags


class _Routes(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    routes: list[str]


class _Empty(msgspec.Struct, forbid_unknown_fields=True):
    pass


class _PolicyText(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    impact: bool = False  # policy.set: compute the impact summary and record it


#: The longest pre-auth key lifetime (100 years): beyond it dates stop being representable.
_MAX_EXPIRATION_SECONDS = 100 * 366 * 86400


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


class AdminOps:
    """The admin operations over one tailnet.

    Args:
        tailnet: the command service.
        presence: who is online (from the control protocol); ``None`` reports unknown.
        token: a source of random hex strings (``secrets.token_hex``), injectable for
            reproducible tests.
    """

    def __init__(
        self,
        tailnet: Tailnet,
        *,
        presence: PresenceView | None = None,
        token: Callable[[int], str] = secrets.token_hex,
    ) -> None:
        self.tailnet = tailnet
        self._presence = presence or (lambda _node_id: None)
        self._token = token
        self.handlers: dict[str, Handler] = {
            "users.create": self.create_user,
            "users.list": self.list_users,
            "users.rename": self.rename_user,
            "users.delete": self.delete_user,
            "users.set_role": self.set_user_role,
            "preauthkeys.create": self.create_preauth_key,
            "preauthkeys.list": self.list_preauth_keys,
            "preauthkeys.expire": self.expire_preauth_key,
            "apikeys.create": self.create_api_key,
            "apikeys.list": self.list_api_keys,
            "apikeys.expire": self.expire_api_key,
            "apikeys.delete": self.delete_api_key,
            "oauth_clients.create": self.create_oauth_client,
            "oauth_clients.list": self.list_oauth_clients,
            "oauth_clients.delete": self.delete_oauth_client,
            "nodes.list": self.list_nodes,
            "nodes.show": self.show_node,
            "nodes.rename": self.rename_node,
            "nodes.delete": self.delete_node,
            "nodes.expire": self.expire_node,
            "nodes.tag": self.tag_node,
            "nodes.approve_routes": self.approve_routes,
            "routes.list": self.list_routes,
            "routes.approve": self.approve_node_routes,
            "routes.reject": self.reject_node_routes,
            "log.head": self.log_head,
            "dns.get": self.get_dns,
            "dns.set": self.set_dns,
            "policy.get": self.get_policy,
            "policy.set": self.set_policy,
            "policy.check": self.check_policy,
            "policy.impact": self.impact_policy,
        }
        #: Where the policy comes from: "database" (``policy set``) or "file".
        self.policy_mode = "database"

    def register(self, op: str, handler: Handler) -> None:
        """Add an operation provided by another component (e.g. ``nodes.register``)."""
        if op in self.handlers:
            raise ValueError(f"operation {op} already registered")
        self.handlers[op] = handler

    async def dispatch(self, op: str, args: dict[str, object], actor: Actor) -> JSON:
        """Run ``op``.

        Raises:
            CommandError: unknown operation, bad arguments, or a refused command.
        """
        handler = self.handlers.get(op)
        if handler is None:
            raise BadRequest(f"unknown operation {op!r}")
        return await handler(args, actor)

    @property
    def state(self) -> TailnetState:
        return self.tailnet.state

    # -- views -----------------------------------------------------------------------

    def user_view(self, user: User) -> dict[str, JSON]:
        return {
            "id": user.id,
            "name": user.name,
            "display_name": user.display_name,
            "email": user.email,
            "provider": user.provider,
            "role": user.role,
            "created": _iso(user.created_at),
        }

    def node_view(self, node: Node) -> dict[str, JSON]:
        now = self.tailnet.clock()
        user = self.state.users.get(node.user_id)
        presence = self._presence(node.id)
        return {
            "id": node.id,
            "name": node.given_name,
            "hostname": node.hostname,
            "user": user.name if user else str(node.user_id),
            "ipv4": node.ipv4,
            "ipv6": node.ipv6,
            "tags": list(node.tags),
            "online": presence.online if presence else None,
            "last_seen": _iso(presence.last_seen) if presence else None,
            "expiry": _iso(node.expiry),
            "expired": node.is_expired(now),
            "ephemeral": node.ephemeral,
            "created": _iso(node.created_at),
            "machine_key": node.machine_key,
            "node_key": node.node_key,
            "advertised_routes": list(node.advertised_routes),
            "approved_routes": list(node.approved_routes),
            "os": node.os,
        }

    def key_view(self, key: PreAuthKey) -> dict[str, JSON]:
        now = self.tailnet.clock()
        user = self.state.users.get(key.user_id) if key.user_id is not None else None
        return {
            "id": key.id,
            "prefix": key.prefix,
            "user": user.name if user else None,
            "reusable": key.reusable,
            "ephemeral": key.ephemeral,
            "tags": list(key.tags),
            "used": bool(key.used_by),
            "expiration": _iso(key.expires_at),
            "expired": key.revoked or (key.expires_at is not None and key.expires_at <= now),
            "created": _iso(key.created_at),
        }

    def api_key_view(self, key: ApiKey) -> dict[str, JSON]:
        now = self.tailnet.clock()
        user = self.state.users.get(key.user_id) if key.user_id is not None else None
        view: dict[str, JSON] = {
            "id": key.id,
            "prefix": key.prefix,
            "user": user.name if user else None,
            "role": key.role,
            "description": key.description,
            "expiration": _iso(key.expires_at),
            "expired": key.usable_at(now) is not None,
            "created": _iso(key.created_at),
        }
        if key.kind == "oauth_client":
            view["scopes"] = list(key.scopes)
        return view

    # -- users -----------------------------------------------------------------------

    async def create_user(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_CreateUser, raw)
        uid, _ = await self.tailnet.execute(
            lambda s: c.decide_create_user(
                s, a.name, display_name=a.display_name, email=a.email, role=a.role
            ),
            actor=actor,
        )
        return self.user_view(self.state.users[uid])

    async def set_user_role(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_SetRole, raw)
        uid, _ = await self.tailnet.execute(lambda s: c.decide_set_role(s, a.user, a.role), actor=actor)
        return self.user_view(self.state.users[uid])

    async def list_users(self, raw: dict[str, object], actor: Actor) -> JSON:
        decode_args(_Empty, raw)
        return [self.user_view(u) for u in sorted(self.state.users.values(), key=lambda u: u.id)]

    async def rename_user(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_RenameUser, raw)
        uid, _ = await self.tailnet.execute(
            lambda s: c.decide_rename_user(s, a.user, a.new_name), actor=actor
        )
        return self.user_view(self.state.users[uid])

    async def delete_user(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_UserArgs, raw)
        uid, _ = await self.tailnet.execute(lambda s: c.decide_delete_user(s, a.user), actor=actor)
        return {"deleted": uid}

    # -- pre-auth keys -----------------------------------------------------------------

    async def create_preauth_key(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_CreateKey, raw)
        now = self.tailnet.clock()
        if a.expiration_seconds is not None and a.expiration_seconds <= 0:
            raise BadRequest("the expiration must be positive (or null for a key that never expires)")
        if a.expiration_seconds is not None and a.expiration_seconds > _MAX_EXPIRATION_SECONDS:
            raise BadRequest("the expiration is too far in the future (at most 100 years; or null for never)")
        expires = now + timedelta(seconds=a.expiration_seconds) if a.expiration_seconds else None
        prefix, secret = self._token(6), self._token(24)
        key, _ = await self.tailnet.execute(
            lambda s: c.decide_create_preauth_key(
                s, user=a.user, reusable=a.reusable, ephemeral=a.ephemeral, tags=tuple(a.tags),
                expires_at=expires, now=now, prefix=prefix, secret=secret,
            ),
            actor=actor,
        )
        view = self.key_view(c.find_preauth_key(self.state, prefix))
        view["key"] = key
        return view

    async def list_preauth_keys(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_ListArgs, raw)
        uid = c.find_user(self.state, a.user).id if a.user else None
        keys = sorted(self.state.preauth_keys.values(), key=lambda k: k.id)
        return [self.key_view(k) for k in keys if uid is None or k.user_id == uid]

    async def expire_preauth_key(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_KeyArgs, raw)
        kid, _ = await self.tailnet.execute(lambda s: c.decide_expire_preauth_key(s, a.key), actor=actor)
        return self.key_view(self.state.preauth_keys[kid])

    # -- API keys and OAuth clients ---------------------------------------------------

    async def _create_credential(self, a: _CreateApiKey, actor: Actor, kind: str) -> JSON:
        now = self.tailnet.clock()
        if a.expiration_seconds is not None and not 0 < a.expiration_seconds <= _MAX_EXPIRATION_SECONDS:
            raise BadRequest("the expiration must be positive and at most 100 years (or null for never)")
        expires = now + timedelta(seconds=a.expiration_seconds) if a.expiration_seconds else None
        prefix, secret = self._token(6), self._token(24)
        full, _ = await self.tailnet.execute(
            lambda s: c.decide_create_api_key(
                s, expires_at=expires, now=now, prefix=prefix, secret=secret, user=a.user,
                role=a.role, kind=kind, scopes=tuple(a.scopes), description=a.description,
            ),
            actor=actor,
        )
        view = self.api_key_view(c.find_api_key(self.state, prefix, kind=kind))
        view["key"] = full
        return view

    async def create_api_key(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_CreateApiKey, raw)
        if a.scopes:
            raise BadRequest("scopes apply to OAuth clients (oauth-clients create)")
        return await self._create_credential(a, actor, "apikey")

    async def create_oauth_client(self, raw: dict[str, object], actor: Actor) -> JSON:
        return await self._create_credential(decode_args(_CreateApiKey, raw), actor, "oauth_client")

    def _credentials(self, raw: dict[str, object], kind: str) -> JSON:
        a = decode_args(_ListArgs, raw)
        uid = c.find_user(self.state, a.user).id if a.user else None
        keys = sorted(self.state.api_keys.values(), key=lambda k: k.id)
        return [
            self.api_key_view(k) for k in keys if k.kind == kind and (uid is None or k.user_id == uid)
        ]

    async def list_api_keys(self, raw: dict[str, object], actor: Actor) -> JSON:
        return self._credentials(raw, "apikey")

    async def list_oauth_clients(self, raw: dict[str, object], actor: Actor) -> JSON:
        return self._credentials(raw, "oauth_client")

    async def expire_api_key(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_KeyArgs, raw)
        kid, _ = await self.tailnet.execute(lambda s: c.decide_expire_api_key(s, a.key), actor=actor)
        return self.api_key_view(self.state.api_keys[kid])

    async def delete_api_key(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_KeyArgs, raw)
        kid, _ = await self.tailnet.execute(lambda s: c.decide_delete_api_key(s, a.key), actor=actor)
        return {"deleted": kid}

    async def delete_oauth_client(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_KeyArgs, raw)
        kid, _ = await self.tailnet.execute(
            lambda s: c.decide_delete_api_key(s, a.key, kind="oauth_client"), actor=actor
        )
        return {"deleted": kid}

    # -- nodes -----------------------------------------------------------------------

    async def list_nodes(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_ListArgs, raw)
        uid = c.find_user(self.state, a.user).id if a.user else None
        nodes = sorted(self.state.nodes.values(), key=lambda n: n.id)
        return [self.node_view(n) for n in nodes if uid is None or n.user_id == uid]

    async def show_node(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_NodeArgs, raw)
        return self.node_view(c.find_node(self.state, a.node))

    async def rename_node(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_RenameNode, raw)
        nid, _ = await self.tailnet.execute(lambda s: c.decide_rename_node(s, a.node, a.new_name), actor=actor)
        return self.node_view(self.state.nodes[nid])

    async def delete_node(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_NodeArgs, raw)
        nid, _ = await self.tailnet.execute(lambda s: c.decide_delete_node(s, a.node), actor=actor)
        return {"deleted": nid}

    async def expire_node(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_NodeArgs, raw)
        now = self.tailnet.clock()
        nid, _ = await self.tailnet.execute(lambda s: c.decide_expire_node(s, a.node, now=now), actor=actor)
        return self.node_view(self.state.nodes[nid])

    async def tag_node(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_TagNode, raw)
        (nid, rules), _ = await self.tailnet.execute(
            lambda s: c.decide_tag_node(s, a.node, tuple(a.tags), user=a.user), actor=actor
        )
        return {**self.node_view(self.state.nodes[nid]), "allowed_by": rules}

    async def approve_routes(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_Routes, raw)
        nid, _ = await self.tailnet.execute(
            lambda s: c.decide_approve_routes(s, a.node, tuple(a.routes)), actor=actor
        )
        return self.node_view(self.state.nodes[nid])

    def route_view(self, node: Node) -> dict[str, JSON]:
        """One node's routes: what it advertises, what is approved (by an admin or by
        the policy, both recorded), the subnets it is primary for, and whether it is an
        exit node (both exit routes advertised and approved)."""
        served = set(node.advertised_routes) & set(node.approved_routes)
        primary = sorted(p for p, nid in self.state.route_primaries.items() if nid == node.id)
        exit_node = set(c.EXIT_ROUTES) <= served
        return {
            "id": node.id,
            "node": node.given_name,
            "advertised": list(node.advertised_routes),
            "approved": list(node.approved_routes),
            "pending": sorted(set(node.advertised_routes) - set(node.approved_routes)),
            "primary": primary,
            "exit_node": exit_node,
        }

    async def list_routes(self, raw: dict[str, object], actor: Actor) -> JSON:
        decode_args(_Empty, raw)
        return [
            self.route_view(n)
            for n in sorted(self.state.nodes.values(), key=lambda n: n.id)
            if n.advertised_routes or n.approved_routes
        ]

    async def approve_node_routes(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_Routes, raw)
        nid, _ = await self.tailnet.execute(
            lambda s: c.decide_approve_node_routes(s, a.node, a.routes), actor=actor
        )
        return self.route_view(self.state.nodes[nid])

    async def reject_node_routes(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_Routes, raw)
        nid, _ = await self.tailnet.execute(
            lambda s: c.decide_reject_node_routes(s, a.node, a.routes), actor=actor
        )
        return self.route_view(self.state.nodes[nid])

    async def log_head(self, raw: dict[str, object], actor: Actor) -> JSON:
        decode_args(_Empty, raw)
        head = await self.tailnet.log.head()
        return {"seq": head.seq, "hash": head.hash}

    # -- DNS ------------------------------------------------------------------------

    def _dns_view(self) -> dict[str, JSON]:
        s = self.state
        return {
            "nameservers": list(s.dns_nameservers) if s.dns_nameservers is not None else None,
            "search_paths": list(s.dns_search_paths) if s.dns_search_paths is not None else None,
            "magic_dns": s.dns_magic_dns,
        }

    async def get_dns(self, raw: dict[str, object], actor: Actor) -> JSON:
        """The DNS settings made through the log (``null``: as configured)."""
        decode_args(_Empty, raw)
        return self._dns_view()

    async def set_dns(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_SetDns, raw)

        def decide(s: TailnetState) -> c.Decision[None]:
            ns = s.dns_nameservers if a.nameservers is msgspec.UNSET else a.nameservers
            sp = s.dns_search_paths if a.search_paths is msgspec.UNSET else a.search_paths
            magic = s.dns_magic_dns if a.magic_dns is msgspec.UNSET else a.magic_dns
            return c.decide_set_dns(
                s,
                nameservers=tuple(ns) if ns is not None else None,
                search_paths=tuple(sp) if sp is not None else None,
                magic_dns=magic,
            )

        await self.tailnet.execute(decide, actor=actor)
        return self._dns_view()

    # -- policy ---------------------------------------------------------------------

    async def get_policy(self, raw: dict[str, object], actor: Actor) -> JSON:
        decode_args(_Empty, raw)
        s = self.state
        return {"text": s.policy_text, "sha256": s.policy_sha256, "source": s.policy_source, "mode": self.policy_mode}

    async def check_policy(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_PolicyText, raw)
        return {"ok": True, "sha256": c.check_policy_text(self.state, a.text)}

    async def impact_policy(self, raw: dict[str, object], actor: Actor) -> JSON:
        """What ``text`` would change against the live tailnet; appends nothing."""
        from .replay import impact

        a = decode_args(_PolicyText, raw)
        state = self.state
        c.check_policy_text(state, a.text)
        data = await trio.to_thread.run_sync(impact, state, a.text, self.tailnet.clock())
        return {"at_seq": state.seq, **data}

    async def set_policy(self, raw: dict[str, object], actor: Actor) -> JSON:
        a = decode_args(_PolicyText, raw)
        if self.policy_mode != "database":
            raise CommandError(
                "the policy is read from a file (policy.mode = file); edit that file instead"
            )
        impact = None
        if a.impact:
            # Pairs and netmaps of every node, before and after: seconds on a large
            # tailnet, so off the event loop. It is computed against the state of now;
            # ``against_seq`` says which, should the decision land on a later one.
            impact = await trio.to_thread.run_sync(_impact, self.state, a.text, self.tailnet.clock())
        sha, recorded = await self.tailnet.execute(
            lambda s: c.decide_set_policy(s, a.text, source="db", impact=impact), actor=actor
        )
        out: dict[str, object] = {"sha256": sha, "changed": bool(recorded), "seq": recorded[-1].seq if recorded else None}
        if impact is not None and recorded:
            out["impact"] = msgspec.to_builtins(impact)
        return out


def _impact(state: TailnetState, text: str, now: datetime) -> PolicyImpact | None:
    """The impact summary of ``text``, or ``None`` when it is invalid (the decision
    that follows refuses it with the reason)."""
    from .replay import impact_summary

    try:
        c.check_policy_text(state, text)
    except CommandError:
        return None
    return impact_summary(state, text, now)
