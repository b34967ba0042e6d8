"""An indexed, copy-on-write view of the tailnet for alias resolution.

Role in the pipeline: compile-time input. :class:`Tailnet` wraps the users
and nodes with the indexes alias resolution needs (nodes by user, by tag,
tagged vs. member) and precomputes each node's addresses and served routes
once, because every later stage asks for them per pair of nodes.

Incrementality: :meth:`Tailnet.with_node` and :meth:`Tailnet.without_node`
return a new view sharing everything that did not change; the cost is a
shallow copy of the few top-level dicts the node touches (style rule 10:
state is immutable, indexes rebuilt in one place).

Alias semantics (what an alias *resolves to*):

* ``*`` -- the whole Tailscale address space: 100.64.0.0/10 minus the
  ChromeOS VM range 100.115.92.0/23, plus fd7a:115c:a1e0::/48.
* a user / ``user:*@domain`` / group -- every address of the untagged nodes
  of those users.
* a tag / ``autogroup:tagged`` / ``autogroup:member`` -- addresses of the
  matching nodes (tagged nodes are never members).
* a host alias or literal CIDR -- exactly that prefix, never expanded to
  the matching node's other address family.
* ``autogroup:internet`` -- the public internet (everything but private,
  link-local, CGNAT and Tailscale ranges).
* ``autogroup:danger-all`` -- every address.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping
from typing import Final

from .document import Alias, AliasKind
from .ipset import ALL_V4, ALL_V6, CGNAT, TAILSCALE_ULA, IPSet, parse_prefix
from .model import PolicyNode, PolicyUser, TailnetSettings

__all__ = ["INTERNET", "WILDCARD", "NodeInfo", "Tailnet"]

#: What ``*`` resolves to (tsaddr.CGNATRange minus ChromeOSVMRange, plus the ULA).
WILDCARD: Final = IPSet.of([CGNAT, TAILSCALE_ULA]) - IPSet.of([parse_prefix("100.115.92.0/23")])

#: ``autogroup:internet``: 0.0.0.0/0 and 2000::/3 minus private, CGNAT,
#: link-local and Tailscale space (headscale's util.TheInternet).
INTERNET: Final = IPSet.of([ALL_V4, parse_prefix("2000::/3")]) - IPSet.of(
    parse_prefix(p)
    for p in (
        "fc00::/7",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fd7a:115c:a1e0::/48",
        "100.64.0.0/10",
        "fe80::/10",
        "169.254.0.0/16",
    )
)

#: ``autogroup:danger-all``.
EVERYTHING: Final = IPSet.of([ALL_V4, ALL_V6])


#: Tag sets by the tags they were made from, so that nodes carrying the same tags (all
#: untagged nodes, every server of one tag) share one frozenset (issue 19: a frozenset is
#: 216 bytes). Bounded: the policy's tagOwners limit the sets, and past the bound a new
#: set is simply not kept.
_TAG_SETS: dict[tuple[str, ...], frozenset[str]] = {(): frozenset()}
_TAG_SETS_MAX: Final = 4096


def _tag_set(tags: tuple[str, ...]) -> frozenset[str]:
    """``frozenset(tags)``, shared with every node carrying the same tags."""
    hit = _TAG_SETS.get(tags)
    if hit is None:
        hit = frozenset(tags)
        if len(_TAG_SETS) < _TAG_SETS_MAX:
            _TAG_SETS[tags] = hit
    return hit


class NodeInfo:
    """A node plus derived data computed once.

    Attributes:
        node: the input record.
        addrs: addresses on the shared integer line (v4 first).
        subnet_routes: served non-exit routes.
        exit_routes: served exit routes.
        owner: user id for untagged nodes, None for tagged ones.
    """

    __slots__ = ("addrs", "exit_routes", "node", "owner", "subnet_routes", "tags")

    def __init__(self, node: PolicyNode) -> None:
        self.node = node
        self.addrs = node.addrs()
        self.subnet_routes = node.subnet_routes()
        self.exit_routes = node.exit_routes()
        self.owner = node.owner
        self.tags = _tag_set(node.tags)

    @property
    def id(self) -> int:
        """The node id."""
        return self.node.id

    @property
    def is_exit(self) -> bool:
        """True when the node serves an approved exit route."""
        return bool(self.exit_routes)


class Tailnet:
    """Users and nodes with resolution indexes. Treat as immutable."""

    __slots__ = (
        "_addr_index",
        "_by_tag",
        "_by_user",
        "_members",
        "_route_strings",
        "_routers",
        "_sorted_ids",
        "_tagged",
        "nodes",
        "settings",
        "users",
        "users_by_login",
    )

    def __init__(
        self,
        users: Iterable[PolicyUser],
        nodes: Iterable[PolicyNode],
        settings: TailnetSettings | None = None,
    ) -> None:
        self.settings = settings or TailnetSettings()
        self.users: dict[int, PolicyUser] = {u.id: u for u in users}
        self.users_by_login: dict[str, list[int]] = {}
        for user in self.users.values():
            for key in {user.login, f"{user.name}@" if user.name else ""} - {""}:
                self.users_by_login.setdefault(key, []).append(user.id)
        self.nodes: dict[int, NodeInfo] = {}
        self._by_user: dict[int, frozenset[int]] = {}
        self._by_tag: dict[str, frozenset[int]] = {}
        self._reset_derived()
        for node in nodes:
            self._index(NodeInfo(node))

    def _reset_derived(self) -> None:
        """Drop lazily built indexes; they are rebuilt on first use."""
        self._route_strings: tuple[str, ...] | None = None
        self._addr_index: tuple[list[int], list[int]] | None = None
        self._routers: tuple[NodeInfo, ...] | None = None
        self._members: frozenset[int] | None = None
        self._tagged: frozenset[int] | None = None
        self._sorted_ids: list[int] | None = None

    # -- copy-on-write updates ----------------------------------------------

    def _clone(self) -> Tailnet:
        clone = object.__new__(Tailnet)
        clone.settings = self.settings
        clone.users = self.users
        clone.users_by_login = self.users_by_login
        clone.nodes = dict(self.nodes)
        clone._by_user = dict(self._by_user)
        clone._by_tag = dict(self._by_tag)
        clone._reset_derived()
        return clone

    def _index(self, info: NodeInfo) -> None:
        self.nodes[info.id] = info
        if info.owner is not None:
            self._by_user[info.owner] = self._by_user.get(info.owner, frozenset()) | {info.id}
        for tag in info.tags:
            self._by_tag[tag] = self._by_tag.get(tag, frozenset()) | {info.id}

    def _unindex(self, info: NodeInfo) -> None:
        del self.nodes[info.id]
        if info.owner is not None:
            self._by_user[info.owner] = self._by_user.get(info.owner, frozenset()) - {info.id}
        for tag in info.tags:
            self._by_tag[tag] = self._by_tag.get(tag, frozenset()) - {info.id}

    def with_node(self, node: PolicyNode) -> Tailnet:
        """A new view with ``node`` added (or replaced, by id)."""
        clone = self._clone()
        old = clone.nodes.get(node.id)
        if old is not None:
            clone._unindex(old)
        info = NodeInfo(node)
        clone._index(info)
        clone._carry_addr_index(self, old, info)
        clone._carry_routers(self, node.id, info)
        clone._carry_kinds(self, node.id, info)
        return clone

    def _carry_kinds(self, parent: Tailnet, node_id: int, new: NodeInfo | None) -> None:
        """Take the parent's member and tagged sets over, edited for one node (each is
        a scan of every node otherwise, and a join resolves ``autogroup:member``)."""
        gone = frozenset((node_id,))
        if parent._members is not None:
            self._members = parent._members - gone
            if new is not None and new.owner is not None:
                self._members |= gone
        if parent._tagged is not None:
            self._tagged = parent._tagged - gone
            if new is not None and new.owner is None:
                self._tagged |= gone

    def _carry_routers(self, parent: Tailnet, node_id: int, new: NodeInfo | None) -> None:
        """Take the parent's router list over, edited for one node (else every
        registration would scan the tailnet for the few routers)."""
        if parent._routers is None:
            return
        routers = [r for r in parent._routers if r.id != node_id]
        if new is not None and (new.subnet_routes or new.exit_routes):
            routers.append(new)
            routers.sort(key=lambda r: r.id)
        self._routers = tuple(routers)

    def _carry_addr_index(self, parent: Tailnet, old: NodeInfo | None, new: NodeInfo | None) -> None:
        """Take the parent's address index over, edited for one node (a registration
        would otherwise re-sort every address of the tailnet)."""
        if parent._addr_index is None:
            return
        keys, ids = list(parent._addr_index[0]), list(parent._addr_index[1])
        if old is not None:
            for addr in old.addrs:
                at = bisect_left(keys, addr)
                while at < len(keys) and keys[at] == addr and ids[at] != old.id:
                    at += 1
                if at < len(keys) and keys[at] == addr:
                    del keys[at], ids[at]
        if new is not None:
            for addr in new.addrs:
                at = bisect_left(keys, addr)
                while at < len(keys) and keys[at] == addr and ids[at] < new.id:
                    at += 1
                keys.insert(at, addr)
                ids.insert(at, new.id)
        self._addr_index = (keys, ids)

    def without_node(self, node_id: int) -> Tailnet:
        """A new view without the node ``node_id`` (this one if absent)."""
        old = self.nodes.get(node_id)
        if old is None:
            return self
        clone = self._clone()
        clone._unindex(old)
        clone._carry_addr_index(self, old, None)
        clone._carry_routers(self, node_id, None)
        clone._carry_kinds(self, node_id, None)
        return clone

    # -- lookups --------------------------------------------------------------

    def node_ids_of_user(self, user_id: int) -> frozenset[int]:
        """Untagged nodes owned by ``user_id``."""
        return self._by_user.get(user_id, frozenset())

    def node_ids_with_tag(self, tag: str) -> frozenset[int]:
        """Nodes carrying ``tag``."""
        return self._by_tag.get(tag, frozenset())

    def users_for_token(self, token: str) -> list[int]:
        """Users a policy user token (``odin@example.com``, ``odin@``) names."""
        return self.users_by_login.get(token, [])

    def users_in_domain(self, domain: str) -> list[int]:
        """Users whose login is ``*@domain`` (case-sensitive, like the hosted plane)."""
        return [u.id for u in self.users.values() if u.domain == domain]

    def domains(self) -> frozenset[str]:
        """Domains associated with the tailnet (``user:*@d`` / ``localpart:*@d``).

        Configured ones, else the owner's login domain: as on the hosted plane,
        inviting a user from another domain does not associate that domain with
        the tailnet. A tailnet without an owner (users recorded before roles)
        associates every user's domain.
        """
        if self.settings.domains:
            return frozenset(self.settings.domains)
        users = self.users.values()
        owners = [u for u in users if u.role == "owner"]
        return frozenset(u.domain for u in (owners or users) if u.domain)

    def iter_nodes(self) -> Iterator[NodeInfo]:
        """Nodes in id order."""
        if self._sorted_ids is None:
            self._sorted_ids = sorted(self.nodes)
        nodes = self.nodes
        for node_id in self._sorted_ids:
            yield nodes[node_id]

    def approved_subnet_routes(self) -> IPSet:
        """Every served subnet route in the tailnet, as one set."""
        return IPSet.of(r for n in self.routers() for r in n.subnet_routes)

    def approved_subnet_route_strings(self) -> tuple[str, ...]:
        """Every served subnet route in the tailnet, deduplicated, unmerged.

        ``*`` sources list these individually after the CGNAT ranges: the
        hosted control plane keeps ``10.33.0.0/16`` even when ``10.0.0.0/8``
        is also present.
        """
        if self._route_strings is None:
            seen: dict[str, None] = {}
            for info in self.routers():
                for route in info.subnet_routes:
                    seen.setdefault(str(route), None)
            self._route_strings = tuple(seen)
        return self._route_strings

    # -- resolution -----------------------------------------------------------

    def user_ids_for_alias(self, alias: Alias, groups: Mapping[str, tuple[str, ...]]) -> set[int]:
        """User ids a user-shaped alias (user, user domain, group) names."""
        if alias.kind is AliasKind.USER:
            return set(self.users_for_token(alias.text))
        if alias.kind is AliasKind.USER_DOMAIN:
            return set(self.users_in_domain(alias.text))
        if alias.kind is AliasKind.GROUP:
            out: set[int] = set()
            for member in groups.get(alias.text, ()):
                if member.startswith("user:*@"):
                    out.update(self.users_in_domain(member[len("user:*@") :]))
                else:
                    out.update(self.users_for_token(member.removeprefix("user:")))
            return out
        if alias.kind is AliasKind.AUTOGROUP and alias.text in (
            "autogroup:admin",
            "autogroup:owner",
        ):
            role = alias.text.removeprefix("autogroup:")
            roles = {"owner"} if role == "owner" else {"owner", "admin"}
            return {u.id for u in self.users.values() if u.role in roles}
        return set()

    def node_ids_for_alias(
        self, alias: Alias, groups: Mapping[str, tuple[str, ...]]
    ) -> frozenset[int] | None:
        """Nodes an identity alias selects, or None for address aliases.

        Address aliases (``*``, hosts, CIDRs, internet, danger-all) select
        by IP and return None; callers resolve them with :meth:`addresses`.
        """
        kind = alias.kind
        if kind in (AliasKind.USER, AliasKind.USER_DOMAIN, AliasKind.GROUP):
            ids: set[int] = set()
            for uid in self.user_ids_for_alias(alias, groups):
                ids |= self.node_ids_of_user(uid)
            return frozenset(ids)
        if kind is AliasKind.TAG:
            return self.node_ids_with_tag(alias.text)
        if kind is AliasKind.AUTOGROUP:
            if alias.text in ("autogroup:member", "autogroup:members"):
                return self.member_ids()
            if alias.text == "autogroup:tagged":
                return self.tagged_ids()
            if alias.text in ("autogroup:admin", "autogroup:owner"):
                ids = set()
                for uid in self.user_ids_for_alias(alias, groups):
                    ids |= self.node_ids_of_user(uid)
                return frozenset(ids)
            if alias.text in ("autogroup:internet", "autogroup:danger-all"):
                return None
            return frozenset()
        return None

    def addresses(
        self,
        alias: Alias,
        groups: Mapping[str, tuple[str, ...]],
        hosts: Mapping[str, str],
    ) -> IPSet:
        """Resolve one alias to addresses (``autogroup:self`` resolves empty)."""
        ids = self.node_ids_for_alias(alias, groups)
        if ids is not None:
            return self.addresses_of(ids)
        kind = alias.kind
        if kind is AliasKind.WILDCARD:
            return WILDCARD
        if kind is AliasKind.PREFIX:
            return IPSet.of([parse_prefix(alias.text)])
        if kind is AliasKind.HOST:
            target = hosts.get(alias.text)
            return IPSet.of([parse_prefix(target)]) if target is not None else IPSet()
        if alias.text == "autogroup:internet":
            return INTERNET
        if alias.text == "autogroup:danger-all":
            return EVERYTHING
        return IPSet()

    def addresses_of(self, node_ids: Iterable[int]) -> IPSet:
        """Every address of the given nodes."""
        nodes = self.nodes
        return IPSet.from_addrs(a for i in node_ids if i in nodes for a in nodes[i].addrs)

    def member_ids(self) -> frozenset[int]:
        """Untagged nodes (``autogroup:member``)."""
        if self._members is None:
            self._members = frozenset(i for i, n in self.nodes.items() if n.owner is not None)
        return self._members

    def tagged_ids(self) -> frozenset[int]:
        """Tagged nodes (``autogroup:tagged``)."""
        if self._tagged is None:
            self._tagged = frozenset(i for i, n in self.nodes.items() if n.owner is None)
        return self._tagged

    def routers(self) -> tuple[NodeInfo, ...]:
        """Nodes serving at least one subnet or exit route."""
        if self._routers is None:
            self._routers = tuple(n for n in self.iter_nodes() if n.subnet_routes or n.exit_routes)
        return self._routers

    def _address_index(self) -> tuple[list[int], list[int]]:
        """Every node address in order, and the node holding each."""
        if self._addr_index is None:
            pairs = sorted((a, i) for i, n in self.nodes.items() for a in n.addrs)
            self._addr_index = ([a for a, _ in pairs], [i for _, i in pairs])
        return self._addr_index

    def node_ids_in(self, addresses: IPSet) -> set[int]:
        """Ids of nodes with at least one address in ``addresses``.

        Uses a sorted address index, so the cost is proportional to the
        number of ranges plus the size of the answer.
        """
        keys, ids = self._address_index()
        out: set[int] = set()
        for lo, hi in addresses.ranges:
            start = bisect_left(keys, lo)
            end = bisect_right(keys, hi)
            out.update(ids[start:end])
        return out

    def sole_owner(self, parts: Iterable[IPSet]) -> int | None:
        """The user owning every node with an address in ``parts``, when that is one
        user and none of those nodes is tagged; else None (also when there are none).

        Stops at the second owner it finds: the cost is the nodes of the one owner,
        not the size of the sets.
        """
        keys, ids = self._address_index()
        nodes = self.nodes
        owner: int | None = None
        for part in parts:
            for lo, hi in part.ranges:
                for i in range(bisect_left(keys, lo), bisect_right(keys, hi)):
                    found = nodes[ids[i]].owner
                    if found is None or (owner is not None and found != owner):
                        return None
                    owner = found
        return owner

    def nodes_in(self, addresses: IPSet) -> list[NodeInfo]:
        """Nodes with at least one address in ``addresses`` (id order)."""
        return [self.nodes[i] for i in sorted(self.node_ids_in(addresses))]
