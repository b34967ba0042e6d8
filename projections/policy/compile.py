"""Grants (and ACLs, as grants) compiled against a tailnet.

Role in the pipeline: third stage. Every ACL entry becomes one grant per
destination (headscale's ``aclToGrants``: non-``autogroup:self``
destinations first when the entry mixes kinds). Each grant is resolved once
into a :class:`CompiledGrant`:

* *regular* grants are complete here: their global :class:`Rule` list is
  what every node's packet filter is reduced from;
* *self* grants (``autogroup:self`` destinations) keep their resolved
  sources and expand per node, to the node owner's other devices;
* *via* grants keep sources and destination prefixes and expand per node,
  only on routers carrying one of the ``via`` tags.

Cost model: resolving a grant is linear in the nodes its aliases select
(aliases themselves are resolved once per snapshot, see ``resolve.py``).
Each compiled grant records the identities it depends on (users, tags,
member/tagged, routes), so adding a node recompiles only the grants whose
aliases that node matches, and re-renders only the source side when the
destinations are unaffected -- see :meth:`CompiledPolicy.with_node`.

SrcIPs rendering follows the hosted control plane: each source alias
renders on its own and the lists are concatenated without duplicates.
Identity aliases (users, groups, tags, autogroups) list every node address
individually -- two adjacent node addresses are never folded into a range
-- while ``*`` renders as its CGNAT ranges plus the ULA followed by every
approved subnet route, unmerged (``10.33.0.0/16`` stays next to
``10.0.0.0/8``), and CIDR aliases keep their shape. DstPorts and CapGrant
destinations follow the same per-alias rule.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from .document import ACL, AliasKind, Grant, IPSpec, Policy, PortRange
from .ipset import AddressUnion, IPSet, Prefix, addr_to_int, format_addr, parse_prefix, prefix_str
from .resolve import Resolved, Resolver, host_prefix
from .rules import CapEntry, DstEntry, Rule
from .tailnet import EVERYTHING, INTERNET, NodeInfo, Tailnet

__all__ = [
    "CompiledGrant", "GrantKind", "acl_to_grants", "compile_grant", "forget_shared_entries", "grant_shape", "host_sets", "policy_grants", "reuse_grant",
]

#: Well-known caps whose grant also gives the *destination* a companion cap
#: toward the sources (reversed direction), with a null value.
COMPANION_CAPS: tuple[tuple[str, str], ...] = (
    ("tailscale.com/cap/drive", "tailscale.com/cap/drive-sharer"),
    ("tailscale.com/cap/relay", "tailscale.com/cap/relay-target"),
)


class GrantKind(enum.Enum):
    """What per-node work a compiled grant needs."""

    REGULAR = "regular"
    SELF = "self"
    VIA = "via"


class CompiledGrant:
    """One grant resolved against the tailnet.

    Attributes:
        grant: the source grant.
        kind: regular / self / via.
        rules: global rules (regular part; empty for via grants).
        src_sets: resolved address set per source alias.
        src_strings: the rendered ``SrcIPs`` (empty when no destination but
            ``autogroup:self``: such a grant has no global rules).
        dst_prefixes: destination prefixes (``autogroup:internet`` and
            ``autogroup:self`` excluded), used by via steering (computed on first
            use: only policies with via grants read them).
        via_internet: ``autogroup:internet`` is among the destinations.
        depends: identities whose membership changes require recompiling.
        dst_depends: the part of ``depends`` that comes from destinations.
    """

    __slots__ = (
        "_dst_prefixes",
        "_dst_sets",
        "_entries",
        "depends",
        "dst_depends",
        "grant",
        "kind",
        "rules",
        "src_set",
        "src_sets",
        "src_strings",
        "via_internet",
    )

    def __init__(self, grant: Grant) -> None:
        self.grant = grant
        self.kind = GrantKind.REGULAR
        self.rules: list[Rule] = []
        self.src_sets: list[IPSet] = []
        self.src_set = AddressUnion(())
        self.src_strings: tuple[str, ...] = ()
        #: destination sets whose prefixes :attr:`dst_prefixes` lists, once asked
        self._dst_sets: list[IPSet] = []
        self._dst_prefixes: list[Prefix] | None = None
        #: per ip spec (by index), destination prefix -> its DstPorts entries, for the
        #: next compile of this grant to reuse (see :func:`_rules_for_destinations`)
        self._entries: list[dict[Prefix, tuple[DstEntry, ...]]] = []
        self.via_internet = False
        self.depends: frozenset[str] = frozenset()
        self.dst_depends: frozenset[str] = frozenset()

    @property
    def dst_prefixes(self) -> list[Prefix]:
        """Destination prefixes (see the class docstring)."""
        if self._dst_prefixes is None:
            self._dst_prefixes = [p for s in self._dst_sets for p in s.prefixes()]
        return self._dst_prefixes


def acl_to_grants(acl: ACL) -> list[Grant]:
    """Convert one ACL entry into equivalent single-destination grants.

    Entries mixing ``autogroup:self`` with other destinations emit the
    non-self grants first; all-autogroup entries keep policy order (the
    hosted plane's ordering, as captured by headscale).
    """

    def one(index: int) -> Grant:
        dst = acl.dst[index]
        return Grant(
            src=acl.src,
            dst=(dst.alias,),
            ip=(IPSpec(protocols=acl.protocols, ports=dst.ports),),
            app=(),
            via=(),
            path=(*acl.path, "dst", index),
        )

    indexes = range(len(acl.dst))
    if any(d.alias.kind is not AliasKind.AUTOGROUP for d in acl.dst):
        first = [i for i in indexes if acl.dst[i].alias.text != "autogroup:self"]
        last = [i for i in indexes if acl.dst[i].alias.text == "autogroup:self"]
        return [one(i) for i in first + last]
    return [one(i) for i in indexes]


def policy_grants(policy: Policy) -> list[Grant]:
    """All grants of a policy: ``grants`` first, then converted ``acls``."""
    out = list(policy.grants or ())
    for acl in policy.acls or ():
        out.extend(acl_to_grants(acl))
    return out


_V = TypeVar("_V")


def _memo(resolver: Resolver, key: tuple[object, ...], compute: Callable[[], _V]) -> _V:
    """Compute a value once per snapshot: grants often share their sources."""
    if key in resolver.memo:
        return resolver.memo[key]  # type: ignore[return-value]
    value = compute()
    resolver.memo[key] = value
    return value


def _dedupe(strings: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(strings))


def compile_grant(
    grant: Grant,
    resolver: Resolver,
    *,
    allow_empty_dst: bool = False,
    previous: CompiledGrant | None = None,
) -> CompiledGrant | None:
    """Resolve one grant against the resolver's tailnet.

    ``previous`` is this grant compiled against an earlier snapshot (same policy): the
    destination entries of the addresses both have are taken over instead of made again,
    so a join that changes a group's destinations costs one lookup per member address.

    Returns:
        The compiled grant, or None when it can never produce rules (an
        empty ``src`` or ``dst``).
    """
    if not grant.src or (not grant.dst and not allow_empty_dst):
        return None
    tailnet = resolver.tailnet
    compiled = CompiledGrant(grant)
    if previous is not None and previous.grant is grant:
        compiled.dst_depends, compiled.depends = previous.dst_depends, previous.depends
    else:
        previous = None
        compiled.dst_depends = frozenset(resolver.dependencies(grant.dst))
        compiled.depends = compiled.dst_depends | resolver.dependencies(grant.src)
    sources = [resolver.resolve(a) for a in grant.src]
    compiled.src_sets = [r.addresses for r in sources]
    compiled.src_set = _memo(
        resolver, ("src_set", grant.src), lambda: _src_set(grant, compiled.src_sets, tailnet)
    )
    destinations = [resolver.resolve(a) for a in grant.dst if a.text != "autogroup:self"]
    for dst in destinations:
        if dst.alias.text == "autogroup:internet":
            compiled.via_internet = True
        else:
            compiled._dst_sets.append(dst.addresses)
    if grant.via:
        # Via grants expand per router. An app-only via grant emits no rules
        # at all but still connects its sources with the via routers.
        compiled.kind = GrantKind.VIA
        compiled.src_strings = _memo(
            resolver,
            ("via_src", grant.src),
            lambda: _src_strings(grant, sources, tailnet, keep_extras=False),
        )
        return compiled
    if len(destinations) != len(grant.dst):
        compiled.kind = GrantKind.SELF
    if destinations or allow_empty_dst:
        # Only rules carry the rendered SrcIPs (an ``autogroup:self``-only grant expands
        # per node from ``src_sets``): a join need not render every member again.
        # (:func:`recompile_sources` compiles the sources alone, for the rules.)
        compiled.src_strings = _memo(
            resolver,
            ("src", grant.src),
            lambda: _src_strings(grant, sources, tailnet, keep_extras=True),
        )
        if destinations:
            compiled.rules = _rules_for_destinations(
                compiled, sources, destinations, resolver, previous._entries if previous is not None else []
            )
    return compiled


def reuse_grant(previous: CompiledGrant, grant: Grant, old: Resolver, resolver: Resolver) -> CompiledGrant | None:
    """``previous`` (compiled from an equal grant of another policy, against a
    tailnet with the same nodes, users and routes) as ``grant`` would compile
    against ``resolver``, when each of its aliases resolves as it did under ``old``
    -- the same addresses, listed the same way -- so its rules are the same: None
    when one does not. Only the dependency keys (which follow the policy's group
    definitions) are worked out again; the rules are shared.
    """
    for alias in (*grant.src, *grant.dst):
        if alias.text == "autogroup:self":
            continue
        a, b = old.resolve(alias), resolver.resolve(alias)
        if a.hosts != b.hosts or a.addresses != b.addresses:
            return None
    fresh = CompiledGrant(grant)
    for name in CompiledGrant.__slots__:
        if name != "grant":
            setattr(fresh, name, getattr(previous, name))
    fresh.dst_depends = frozenset(resolver.dependencies(grant.dst))
    fresh.depends = fresh.dst_depends | resolver.dependencies(grant.src)
    return fresh


def grant_shape(grant: Grant) -> tuple[object, ...]:
    """What a compiled grant is made from besides the aliases' meaning (its place in
    the policy aside): two grants of equal shape whose aliases resolve alike compile
    to the same rules."""
    return (grant.src, grant.dst, grant.ip, grant.app, grant.via)


def recompile_sources(previous: CompiledGrant, resolver: Resolver) -> CompiledGrant:
    """Recompile a grant whose destinations are unaffected by a node change.

    Only the source side is re-resolved; the destination entries of the
    previous rules are shared, so the cost is the sources' size, not the
    grant's. Only valid for regular and self grants without ``app`` caps
    (companion caps embed the sources in their destinations).
    """
    grant = previous.grant
    fresh = compile_grant(
        Grant(src=grant.src, dst=(), ip=grant.ip, app=(), via=(), path=grant.path),
        resolver,
        allow_empty_dst=True,
    )
    assert fresh is not None
    fresh.grant = grant
    fresh.kind = previous.kind
    fresh.depends = previous.depends
    fresh.dst_depends = previous.dst_depends
    fresh._dst_sets, fresh._dst_prefixes = previous._dst_sets, previous._dst_prefixes
    fresh._entries = previous._entries
    fresh.via_internet = previous.via_internet
    if fresh.src_strings:
        fresh.rules = [
            Rule(fresh.src_strings, fresh.src_set, r.dst, r.protocols, dst_parts=r.dst_parts)
            for r in previous.rules
        ]
    return fresh


def can_recompile_sources(previous: CompiledGrant, touched: set[str]) -> bool:
    """True when :func:`recompile_sources` applies to this change."""
    return (
        previous.kind is not GrantKind.VIA
        and not previous.grant.app
        and not (previous.dst_depends & touched)
        and bool(previous.rules)
    )


def _src_strings(
    grant: Grant, sources: Sequence[Resolved], tailnet: Tailnet, *, keep_extras: bool
) -> tuple[str, ...]:
    """Render ``SrcIPs``: per-alias strings, concatenated and deduplicated.

    ``*`` renders as its two CGNAT ranges plus the ULA, followed by every
    approved subnet route; ``autogroup:danger-all`` makes the whole list
    ``["*"]``. Via grants drop the other aliases' strings next to ``*``.
    A lone non-wildcard alias gives its own strings tuple, not an equal copy
    (issue 19, memory).
    """
    if not any(r.addresses for r in sources):
        return ()
    if any(r.alias.text == "autogroup:danger-all" for r in sources):
        return ("*",)
    wildcard = any(r.alias.kind is AliasKind.WILDCARD for r in sources)
    out: list[str] = []
    for r in sources:
        if r.alias.kind is AliasKind.WILDCARD:
            out.extend(r.strings())
            out.extend(tailnet.approved_subnet_route_strings())
        elif keep_extras or not wildcard:
            out.extend(r.strings())
    deduped = _dedupe(out)
    if len(sources) == 1 and not wildcard:
        own = sources[0].strings()
        if len(own) == len(deduped):
            return own
    return deduped


def _src_set(grant: Grant, src_sets: Sequence[IPSet], tailnet: Tailnet) -> AddressUnion:
    """The addresses the rendered ``SrcIPs`` denote, as per-alias parts."""
    if not any(src_sets):
        return AddressUnion(())
    if any(a.text == "autogroup:danger-all" for a in grant.src):
        return AddressUnion((EVERYTHING,))
    parts = list(src_sets)
    if any(a.kind is AliasKind.WILDCARD for a in grant.src):
        parts.append(tailnet.approved_subnet_routes())
    return AddressUnion(parts)


#: The memo key of a compile's :class:`_SharedEntries`.
_SHARED_ENTRIES = ("dst_entries",)
#: The memo key of the address set of each single-address destination the
#: grants of a compile made (what :func:`self_rules` takes instead of making its own).
_HOST_SETS = ("host_sets",)


def forget_shared_entries(resolver: Resolver) -> None:
    """Drop the entry table the grants of a compile shared (its entries stay in the
    rules): called once every grant of the compile is made, so that the compiled
    policy does not keep a table item per destination address and port list. The
    set of each single-address destination stays, by address (see :func:`host_sets`)."""
    shared = resolver.memo.pop(_SHARED_ENTRIES, None)
    if isinstance(shared, _SharedEntries):
        resolver.memo[_HOST_SETS] = {
            prefix.lo: single for prefix, (_, single) in shared._by_prefix.items() if prefix.is_single()
        }


def host_sets(resolver: Resolver) -> Mapping[int, IPSet]:
    """The one-address set of each node address the grants compiled against
    ``resolver`` name as a destination, by address: an owner's ``autogroup:self`` rules
    take these sets rather than a copy per address (issue 19, memory). (The texts need
    no table: :func:`format_addr` is memoised.)"""
    table = resolver.memo.get(_HOST_SETS)
    return table if isinstance(table, dict) else {}


class _SharedEntries:
    """The ``DstPorts`` entries one compile makes, by destination prefix and ports.

    A member of a tag or group that several rules name (a tag reached by a few teams on
    the same ports, by other tags on one port) gets one entry tuple for each distinct
    port list, and one text and one address set, shared by every grant naming it, rather
    than a copy per grant (issue 19, memory). Entries are immutable and compare by
    identity, which stays meaningful: shared entries mean the same thing.
    """

    __slots__ = ("_by_ports", "_by_prefix")

    def __init__(self) -> None:
        self._by_prefix: dict[Prefix, tuple[str, IPSet]] = {}
        self._by_ports: dict[tuple[Prefix, tuple[PortRange, ...]], tuple[DstEntry, ...]] = {}

    def entries(self, prefix: Prefix, ports: tuple[PortRange, ...]) -> tuple[DstEntry, ...]:
        """The entries of ``prefix`` on ``ports`` (one per port range, in order)."""
        key = (prefix, ports)
        hit = self._by_ports.get(key)
        if hit is None:
            base = self._by_prefix.get(prefix)
            if base is None:
                text = format_addr(prefix.lo) if prefix.is_single() else prefix_str(prefix)
                base = self._by_prefix[prefix] = (text, IPSet.of([prefix]))
            text, single = base
            hit = self._by_ports[key] = tuple(DstEntry(text, p.first, p.last, single) for p in ports)
        return hit


def _rules_for_destinations(
    compiled: CompiledGrant,
    sources: Sequence[Resolved],
    destinations: Sequence[Resolved],
    resolver: Resolver,
    reuse: list[dict[Prefix, tuple[DstEntry, ...]]],
) -> list[Rule]:
    """The grant's global rules; the entries of every destination prefix are recorded
    in ``compiled._entries``, taken from ``reuse`` (an earlier compile's) when there,
    else from the entries other grants of this compile made for the same prefix and
    ports (see :class:`_SharedEntries`)."""
    grant = compiled.grant
    made = compiled._entries
    tailnet = resolver.tailnet
    shared = _memo(resolver, _SHARED_ENTRIES, _SharedEntries)
    src = compiled.src_strings
    src_set = compiled.src_set
    dst_parts = tuple(
        EVERYTHING if dst.alias.kind is AliasKind.WILDCARD else dst.addresses
        for dst in destinations
    )
    rules: list[Rule] = []
    for at, spec in enumerate(grant.ip):
        entries: list[DstEntry] = []
        earlier = reuse[at] if at < len(reuse) else {}
        mine: dict[Prefix, tuple[DstEntry, ...]] = {}
        made.append(mine)
        for dst in destinations:
            if dst.alias.kind is AliasKind.WILDCARD:
                entries.extend(DstEntry("*", p.first, p.last, EVERYTHING) for p in spec.ports)
                continue
            for prefix in dst.prefixes():
                per_port = earlier.get(prefix)
                if per_port is None:
                    per_port = shared.entries(prefix, spec.ports)
                mine[prefix] = per_port
                entries.extend(per_port)
        if entries and src:
            rules.append(Rule(src, src_set, tuple(entries), spec.protocols, dst_parts=dst_parts))
    if grant.app:
        caps = [CapEntry(tuple(dst.prefixes()), grant.app) for dst in destinations]
        if caps:
            cap_parts = tuple(dst.addresses for dst in destinations)
            rules.append(Rule(src, src_set, caps=tuple(caps), dst_parts=cap_parts))
            dst_strings = [text for dst in destinations for text in dst.strings()]
            if any(d.alias.kind is AliasKind.WILDCARD for d in destinations):
                dst_strings.extend(tailnet.approved_subnet_route_strings())
            src_prefixes = tuple(p for r in sources for p in r.prefixes())
            rules.extend(_companion_rules(_dedupe(dst_strings), src_prefixes, grant.app))
    return rules


def _companion_rules(
    dst_strings: Sequence[str],
    src_prefixes: tuple[Prefix, ...],
    app: tuple[tuple[str, bytes], ...],
) -> list[Rule]:
    """Reversed rules giving destinations the companion cap toward sources."""
    names = {name for name, _ in app}
    out: list[Rule] = []
    src_set = AddressUnion((parse_address_strings(dst_strings),))
    for original, companion in COMPANION_CAPS:
        if original in names:
            cap = CapEntry(src_prefixes, ((companion, None),))
            out.append(Rule(tuple(dst_strings), src_set, caps=(cap,)))
    return out


def parse_address_strings(strings: Iterable[str]) -> IPSet:
    """Parse SrcIPs-style strings (``*``, address, CIDR, ``a-b`` range)."""
    intervals: list[tuple[int, int]] = []
    for text in strings:
        if text == "*":
            return EVERYTHING
        if "-" in text and "/" not in text:
            lo, _, hi = text.partition("-")
            intervals.append((addr_to_int(lo), addr_to_int(hi)))
        else:
            prefix = parse_prefix(text)
            intervals.append((prefix.lo, prefix.hi))
    return IPSet.from_ranges(intervals)


def self_rules(
    compiled: CompiledGrant,
    node: NodeInfo,
    tailnet: Tailnet,
    hosts: Mapping[int, IPSet] | None = None,
) -> list[Rule]:
    """Per-node rules of an ``autogroup:self`` grant (empty for tagged nodes).

    Sources shrink to the node owner's devices that the grant's sources
    include; destinations are every address of the owner's devices, each with the
    set ``hosts`` has for it (see :func:`host_sets`), else a new one.
    """
    if compiled.kind is not GrantKind.SELF or node.owner is None:
        return []
    same_user = [tailnet.nodes[i] for i in sorted(tailnet.node_ids_of_user(node.owner))]
    src_hosts = sorted(
        addr
        for peer in same_user
        if any(ips.contains_any(peer.addrs) for ips in compiled.src_sets)
        for addr in peer.addrs
    )
    if not src_hosts:
        return []
    src_set = AddressUnion((IPSet.from_addrs(src_hosts),))
    src = tuple(format_addr(a) for a in src_hosts)
    dst_hosts = sorted(a for peer in same_user for a in peer.addrs)
    grant = compiled.grant
    rules: list[Rule] = []
    known = hosts if hosts is not None else {}
    bases = [(format_addr(addr), known.get(addr) or IPSet.from_addrs([addr])) for addr in dst_hosts]
    for spec in grant.ip:
        entries = tuple(
            DstEntry(text, p.first, p.last, addresses)
            for text, addresses in bases
            for p in spec.ports
        )
        if entries:
            rules.append(Rule(src, src_set, entries, spec.protocols))
    if grant.app:
        caps = tuple(
            CapEntry(tuple(host_prefix(a) for a in peer.addrs), grant.app) for peer in same_user
        )
        rules.append(Rule(src, src_set, caps=caps))
        dst_strings = tuple(format_addr(a) for a in dst_hosts)
        src_prefixes = tuple(host_prefix(a) for a in src_hosts)
        rules.extend(_companion_rules(dst_strings, src_prefixes, grant.app))
    return rules


def via_rules(compiled: CompiledGrant, node: NodeInfo) -> list[Rule]:
    """Per-node rules of a via grant: only on routers carrying a via tag.

    Destinations are the grant's prefixes that overlap the router's served
    subnet routes (plus the internet for ``autogroup:internet`` on an exit
    router), rendered with their length.
    """
    if compiled.kind is not GrantKind.VIA or not (node.tags & set(compiled.grant.via)):
        return []
    prefixes = [d for d in compiled.dst_prefixes if any(d.overlaps(r) for r in node.subnet_routes)]
    if compiled.via_internet and node.is_exit:
        prefixes.extend(INTERNET.prefixes())
    if not prefixes:
        return []
    rules: list[Rule] = []
    for spec in compiled.grant.ip:
        entries = tuple(
            DstEntry(prefix_str(prefix), p.first, p.last, IPSet.of([prefix]))
            for prefix in prefixes
            for p in spec.ports
        )
        if entries:
            rules.append(Rule(compiled.src_strings, compiled.src_set, entries, spec.protocols))
    return rules
