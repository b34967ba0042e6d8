"""Alias resolution with a per-snapshot cache that survives node changes.

Role in the pipeline: every stage that turns an alias into addresses goes
through a :class:`Resolver`. A policy names the same few aliases over and
over (``autogroup:member`` in a hundred rules), so each alias is resolved
once per tailnet snapshot.

Incrementality: :meth:`Resolver.derive` builds the resolver for the next
snapshot (one node added, changed or removed). Only the cache entries whose
dependency keys the node touches are dropped -- its user (and the groups
and domain containing the user), its tags, ``member``/``tagged`` -- so a
node joining re-resolves a handful of aliases, not the policy.

Dependency keys (also used per grant by ``compile.py``):

* ``user:<login>`` / ``domain:<domain>`` -- user, group and domain aliases;
* ``tag:<tag>`` -- tags;
* ``member`` / ``tagged`` -- the autogroups (and role autogroups);
* ``routes`` -- ``*`` sources, which list every approved subnet route.

Address aliases (CIDRs, hosts, ``*`` itself, internet) never depend on nodes.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from .document import Alias, AliasKind, Policy
from .ipset import IPSet, Prefix, format_addr, is_v4
from .tailnet import NodeInfo, Tailnet

__all__ = ["Resolved", "Resolver", "alias_dependencies", "host_prefix", "node_keys"]


def host_prefix(addr: int) -> Prefix:
    """The /32 or /128 of one address."""
    v4 = is_v4(addr)
    return Prefix(addr, 32 if v4 else 128, v4)


class Resolved:
    """One alias resolved against the tailnet.

    Attributes:
        alias: the alias.
        addresses: every address it denotes.
        hosts: for identity aliases (users, groups, tags, member/tagged), the
            node addresses in address order; None for address aliases (``*``,
            CIDRs, hosts, internet). The hosted control plane lists node
            addresses one by one -- it never coalesces two adjacent node
            addresses into a range -- while CIDR-like aliases keep their shape.
    """

    __slots__ = ("_prefixes", "_strings", "addresses", "alias", "hosts", "ids")

    def __init__(
        self,
        alias: Alias,
        addresses: IPSet,
        hosts: tuple[int, ...] | None,
        ids: frozenset[int] | None = None,
    ) -> None:
        self.alias = alias
        self.addresses = addresses
        self.hosts = hosts
        #: for identity aliases, the nodes selected (what :meth:`edited` starts from)
        self.ids = ids
        self._strings: tuple[str, ...] | None = None
        self._prefixes: list[Prefix] | None = None

    def edited(self, ids: frozenset[int], old: NodeInfo | None, new: NodeInfo | None) -> Resolved:
        """This identity alias after one node changed from ``old`` to ``new`` (None:
        absent), selecting ``ids`` now: the same result as resolving it afresh, by
        editing the sorted addresses (and the strings and prefixes already made)
        instead of sorting every member's addresses again."""
        assert self.hosts is not None and self.ids is not None
        hosts = list(self.hosts)
        strings = list(self._strings) if self._strings is not None else None
        prefixes = list(self._prefixes) if self._prefixes is not None else None
        addresses = self.addresses
        if old is not None and old.id in self.ids:
            for addr in old.addrs:
                at = bisect_left(hosts, addr)
                if at < len(hosts) and hosts[at] == addr:
                    del hosts[at]
                    if strings is not None:
                        del strings[at]
                    if prefixes is not None:
                        del prefixes[at]
                    if not (at < len(hosts) and hosts[at] == addr):
                        addresses = addresses.without_addr(addr)
        if new is not None and new.id in ids:
            for addr in new.addrs:
                at = bisect_right(hosts, addr)
                hosts.insert(at, addr)
                if strings is not None:
                    strings.insert(at, format_addr(addr))
                if prefixes is not None:
                    prefixes.insert(at, host_prefix(addr))
                addresses = addresses.with_addr(addr)
        out = Resolved(self.alias, addresses, tuple(hosts), ids)
        out._strings = tuple(strings) if strings is not None else None
        out._prefixes = prefixes
        return out

    def strings(self) -> tuple[str, ...]:
        """SrcIPs-style strings: bare addresses, CIDRs or ``first-last`` ranges (a tuple,
        which a grant naming this alias alone takes as its ``SrcIPs``)."""
        if self._strings is None:
            if self.hosts is not None:
                self._strings = tuple([format_addr(a) for a in self.hosts])
            else:
                self._strings = tuple(self.addresses.strings())
        return self._strings

    def prefixes(self) -> list[Prefix]:
        """CIDR blocks (a /32 or /128 per node address for identity aliases)."""
        if self._prefixes is None:
            if self.hosts is not None:
                self._prefixes = [host_prefix(a) for a in self.hosts]
            else:
                self._prefixes = self.addresses.prefixes()
        return self._prefixes


class Resolver:
    """Resolves aliases of one policy against one tailnet snapshot."""

    __slots__ = ("_cache", "_change", "_deps", "_stale", "groups", "hosts", "memo", "policy", "tailnet")

    def __init__(
        self,
        policy: Policy,
        tailnet: Tailnet,
        cache: dict[Alias, Resolved] | None = None,
    ) -> None:
        self.policy = policy
        self.tailnet = tailnet
        self.groups = policy.group_map()
        self.hosts = policy.host_map()
        self._cache: dict[Alias, Resolved] = cache if cache is not None else {}
        #: identity aliases the last node change touched, as resolved just before it
        #: (see :meth:`derive`), and that change (the node before and after)
        self._stale: dict[Alias, Resolved] = {}
        self._change: tuple[NodeInfo | None, NodeInfo | None] | None = None
        #: Per-snapshot memo for derived values keyed by alias tuples (e.g. a
        #: grant's rendered SrcIPs); never carried over by :meth:`derive`.
        self.memo: dict[tuple[object, ...], object] = {}
        #: alias -> its dependency keys (they follow from the policy alone: carried
        #: over by :meth:`derive`, which keeps the policy)
        self._deps: dict[Alias, frozenset[str]] = {}

    def dependencies(self, aliases: Iterable[Alias]) -> set[str]:
        """:func:`alias_dependencies` of ``aliases`` under this policy (memoized per alias)."""
        deps = self._deps
        out: set[str] = set()
        for alias in aliases:
            found = deps.get(alias)
            if found is None:
                found = deps[alias] = frozenset(alias_dependencies((alias,), self.policy))
            out |= found
        return out

    def resolve(self, alias: Alias) -> Resolved:
        """Resolve one alias (``autogroup:self`` resolves empty: it is per node)."""
        hit = self._cache.get(alias)
        if hit is not None:
            return hit
        ids = self.tailnet.node_ids_for_alias(alias, self.groups)
        stale = self._stale.pop(alias, None)
        if ids is not None and stale is not None and self._change is not None:
            result = stale.edited(ids, *self._change)
        elif ids is not None:
            nodes = self.tailnet.nodes
            hosts = tuple(sorted(a for i in ids for a in nodes[i].addrs))
            result = Resolved(alias, IPSet.from_sorted_addrs(hosts), hosts, ids)
        else:
            result = Resolved(alias, self.tailnet.addresses(alias, self.groups, self.hosts), None)
        self._cache[alias] = result
        return result

    def addresses(self, alias: Alias) -> IPSet:
        """Every address ``alias`` denotes."""
        return self.resolve(alias).addresses

    def union(self, aliases: Iterable[Alias]) -> IPSet:
        """Addresses of several aliases together."""
        return IPSet.union(self.addresses(a) for a in aliases)

    def derive(
        self,
        tailnet: Tailnet,
        touched: set[str],
        change: tuple[NodeInfo | None, NodeInfo | None] | None = None,
    ) -> Resolver:
        """The resolver for a new snapshot, keeping entries ``touched`` spares.

        ``change`` is the one node that changed (before, after; None: absent): the
        identity aliases it touched are then re-resolved by editing their previous
        answer (:meth:`Resolved.edited`), not from every member again.
        """
        kept: dict[Alias, Resolved] = {}
        stale: dict[Alias, Resolved] = {}
        deps = self._deps
        for alias, resolved in self._cache.items():
            found = deps.get(alias)
            if found is None:
                found = deps[alias] = frozenset(alias_dependencies((alias,), self.policy))
            if found.isdisjoint(touched):
                kept[alias] = resolved
            elif change is not None and resolved.ids is not None:
                stale[alias] = resolved
        out = Resolver(self.policy, tailnet, kept)
        out._stale, out._change, out._deps = stale, change, deps
        return out


def alias_dependencies(aliases: Iterable[Alias], policy: Policy) -> set[str]:
    """The dependency keys of an alias list (see the module docstring)."""
    groups = policy.group_map()
    out: set[str] = set()
    for alias in aliases:
        kind = alias.kind
        if kind is AliasKind.USER:
            out.add(f"user:{alias.text}")
        elif kind is AliasKind.USER_DOMAIN:
            out.add(f"domain:{alias.text}")
        elif kind is AliasKind.GROUP:
            for member in groups.get(alias.text, ()):
                if member.startswith("user:*@"):
                    out.add(f"domain:{member[len('user:*@') :]}")
                else:
                    out.add(f"user:{member.removeprefix('user:')}")
        elif kind is AliasKind.TAG:
            out.add(f"tag:{alias.text}")
        elif kind is AliasKind.AUTOGROUP:
            if alias.text == "autogroup:tagged":
                out.add("tagged")
            elif alias.text not in ("autogroup:internet", "autogroup:danger-all"):
                out.add("member")
        elif kind is AliasKind.WILDCARD:
            out.add("routes")
    return out


def node_keys(info: NodeInfo, tailnet: Tailnet) -> set[str]:
    """The dependency keys a node touches when it joins, changes or leaves."""
    keys: set[str] = set()
    if info.owner is not None:
        keys.add("member")
        user = tailnet.users.get(info.owner)
        if user is not None:
            keys.add(f"user:{user.login}")
            keys.add(f"domain:{user.domain}")
            if user.name:
                keys.add(f"user:{user.name}@")
    else:
        keys.add("tagged")
        keys.update(f"tag:{t}" for t in info.tags)
    if info.subnet_routes:
        keys.add("routes")
    return keys
