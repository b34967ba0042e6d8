"""The compiled policy: compile once, answer per node, update per node.

Role in the pipeline: the façade the netmap projection uses.
:func:`compile_policy` resolves a validated policy against the tailnet into
a :class:`CompiledPolicy`. Per node it then answers, lazily and memoised:

* :meth:`CompiledPolicy.packet_filter` -- reduced tailcfg FilterRules;
* :meth:`CompiledPolicy.peers` -- visible peers with AllowedIPs,
  PrimaryRoutes and peer CapMap;
* :meth:`CompiledPolicy.netmap` -- all of the above plus the self
  AllowedIPs/PrimaryRoutes, self CapMap, SSH policy and WhoIs caps.

Incrementality. :meth:`CompiledPolicy.with_node` and
:meth:`CompiledPolicy.without_node` return a new compiled policy for the
tailnet with one node added, replaced or removed. Only grants whose aliases
depend on something the node carries (its user, its tags, member/tagged
status, its routes for ``*`` sources) are re-resolved; all other compiled
grants are shared with the previous value. Per-node answers are memoised on
each value, never shared across values, so a stale answer cannot leak.

The policy must already be validated (``check_policy``); this module never
raises :class:`~projections.policy.errors.PolicyError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Final

import msgspec

from .approvals import approve, with_auto_approvals
from .capmap import (
    ATTR_DISABLE_IPV4,
    CapValue,
    node_attr_caps,
    peer_cap_map,
    self_cap_map,
    whois_cap_map,
)
from .compile import (
    CompiledGrant,
    GrantKind,
    can_recompile_sources,
    compile_grant,
    forget_shared_entries,
    grant_shape,
    host_sets,
    policy_grants,
    recompile_sources,
    reuse_grant,
    self_rules,
    via_rules,
)
from .document import ALL_PORTS, Alias, AliasKind, Grant, IPSpec, Policy
from .filter import RuleIndex, reduce_rules
from .ipset import AddressUnion, IPSet, Prefix, format_addr, is_v4, prefix_str
from .model import PolicyNode
from .peers import can_access, routes_for_peer, via_routes_for_peer
from .resolve import Resolver, node_keys
from .routes import elect_primaries, primary_routes_by_node
from .rules import DstEntry, Match, MergedRules, Rule, merge_rules, merge_rules_reusing
from .ssh import SSHTable, compile_ssh_policy
from .tailnet import NodeInfo, Tailnet
from .wire import FilterRule, SSHPolicy

__all__ = ["CompiledPolicy", "NodeNetmap", "PeerView", "compile_policy"]

_encoder: Final = msgspec.json.Encoder()


class PeerView(msgspec.Struct, frozen=True, kw_only=True):
    """One visible peer as the viewer sees it.

    Attributes:
        node_id: the peer.
        allowed_ips: tailcfg.Node.AllowedIPs (addresses, then routes).
        primary_routes: tailcfg.Node.PrimaryRoutes (subnet routes only).
        cap_map: tailcfg.Node.CapMap on the peer view.
    """

    node_id: int
    allowed_ips: tuple[str, ...]
    primary_routes: tuple[str, ...] = ()
    cap_map: dict[str, CapValue] = msgspec.field(default_factory=dict)


class NodeNetmap(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the policy contributes to one node's MapResponse."""

    node_id: int
    packet_filter: tuple[FilterRule, ...]
    peers: tuple[PeerView, ...]
    allowed_ips: tuple[str, ...]
    primary_routes: tuple[str, ...]
    cap_map: dict[str, CapValue]
    ssh_policy: SSHPolicy | None
    whois_cap_map: dict[str, dict[str, list[msgspec.Raw] | None]]


def compile_policy(
    policy: Policy,
    tailnet: Tailnet,
    *,
    control_url: str = "",
    previous_primaries: dict[Prefix, int] | None = None,
    auto_approve: bool = True,
    previous: CompiledPolicy | None = None,
) -> CompiledPolicy:
    """Resolve a validated policy against a tailnet.

    Args:
        policy: a policy that passed :func:`projections.policy.check_policy`.
        tailnet: users and nodes.
        control_url: the server URL, prefix of SSH check callbacks.
        previous_primaries: last route election, for failover stickiness.
        auto_approve: add the routes the policy's autoApprovers approve (what a
            policy means on its own: conformance cases, tests blocks). The server
            passes false: it records every approval as an event, so that an admin
            can revoke an auto-approved route.
        previous: the compile of another policy against a tailnet with the same
            nodes, users and routes, both without ``auto_approve``: its compiled grants of
            equal shape whose aliases resolve alike are taken over, with their
            rules (a policy edit recompiles only what it changed).

    Returns:
        The compiled policy.
    """
    if auto_approve:
        tailnet = with_auto_approvals(policy, tailnet)
    resolver = Resolver(policy, tailnet)
    sources = effective_grants(policy)
    taken: dict[int, CompiledGrant] = {}
    if previous is None or auto_approve or previous.auto_approve:
        previous = None  # (approvals follow the policy: the tailnets may differ)
        grants = [compile_grant(g, resolver) for g in sources]
    else:
        grants = _reusing(previous, sources, resolver, taken)
    forget_shared_entries(resolver)
    compiled = CompiledPolicy(
        resolver, sources, grants, control_url=control_url, previous_primaries=previous_primaries,
        auto_approve=auto_approve, merged=previous._merged if previous is not None else None,
    )
    if previous is not None and not compiled.via_grants and not previous.via_grants:
        mine = [g for g in compiled.grants if g.kind is GrantKind.SELF]
        theirs = [g for g in previous.grants if g.kind is GrantKind.SELF]
        if len(mine) == len(theirs) and all(taken.get(id(a)) is b for a, b in zip(mine, theirs, strict=True)):
            # The same autogroup:self grants, taken over in the same order: each
            # owner's own rules are what the last compile made.
            compiled._extra.update(previous._extra)
    return compiled


def _reusing(
    previous: CompiledPolicy, sources: list[Grant], resolver: Resolver, taken: dict[int, CompiledGrant]
) -> list[CompiledGrant | None]:
    """Compile ``sources``, taking over ``previous``'s compiled grants of equal shape
    whose aliases resolve alike (see :func:`~.compile.reuse_grant`); ``taken`` gets,
    by the id of each grant taken over, the one of ``previous`` it came from."""
    earlier: dict[tuple[object, ...], CompiledGrant | None] = {}
    for grant, slot in zip(previous.sources, previous.grant_slots, strict=True):
        earlier.setdefault(grant_shape(grant), slot)
    out: list[CompiledGrant | None] = []
    for grant in sources:
        shape = grant_shape(grant)
        reused = None
        if shape in earlier:
            slot = earlier[shape]
            if slot is None:
                out.append(None)  # it can never produce rules, whatever the aliases mean
                continue
            reused = reuse_grant(slot, grant, previous.resolver, resolver)
            if reused is not None:
                taken[id(reused)] = slot
        out.append(reused if reused is not None else compile_grant(grant, resolver))
    return out


def effective_grants(policy: Policy) -> list[Grant]:
    """The grants to compile: the policy's, or Tailscale's allow-all default."""
    if policy.allow_all():
        # Tailscale's default: everything may reach everything.
        wildcard = Alias(AliasKind.WILDCARD, "*")
        return [
            Grant(
                src=(wildcard,),
                dst=(wildcard,),
                ip=(IPSpec(protocols=(), ports=(ALL_PORTS,)),),
                app=(),
                via=(),
                path=(),
            )
        ]
    return policy_grants(policy)


class CompiledPolicy:
    """A policy resolved against one tailnet snapshot. Treat as immutable."""

    def __init__(
        self,
        resolver: Resolver,
        sources: list[Grant],
        grants: list[CompiledGrant | None],
        *,
        control_url: str,
        previous_primaries: dict[Prefix, int] | None,
        node_attrs: dict[int, tuple[str, ...]] | None = None,
        primaries: dict[Prefix, int] | None = None,
        auto_approve: bool = True,
        merged: MergedRules | None = None,
    ) -> None:
        """Internal: use :func:`compile_policy` or :meth:`with_node`.

        ``sources`` and ``grants`` are aligned (a None slot is a grant that
        can never produce rules). ``node_attrs`` and ``primaries``, when
        given, are reused instead of recomputed; so are the merged global rules
        of ``merged`` (an earlier compile's) made of the same rules.
        """
        self.resolver = resolver
        self.policy = resolver.policy
        self.tailnet = resolver.tailnet
        self.sources = sources
        self.grant_slots = grants
        self.grants = [g for g in grants if g is not None]
        self.control_url = control_url
        self.previous_primaries = previous_primaries
        self.auto_approve = auto_approve
        self.per_node = any(g.kind is not GrantKind.REGULAR for g in self.grants)
        if node_attrs is not None:
            self.__dict__["node_attrs"] = node_attrs
        if primaries is not None:
            self.__dict__["primaries"] = primaries
        self._filters: dict[int, list[Rule]] = {}
        #: by :meth:`_rules_key` (an owner, or a node when there are via grants)
        self._extra: dict[tuple[str, int | None], list[Rule]] = {}
        self._unreduced: dict[tuple[str, int | None], list[Rule]] = {}
        self._own: dict[tuple[str, int | None], list[Rule] | None] = {}
        self._src_json: dict[int, tuple[tuple[str, ...], bytes]] = {}
        self._matches: dict[tuple[str, int | None], list[Match]] = {}
        self._netmaps: dict[int, NodeNetmap] = {}
        self._peer_sets: dict[int, frozenset[int]] = {}
        self._reaches: dict[int, tuple[IPSet, IPSet, bool]] = {}
        self._plain_views: dict[tuple[int, tuple[str, ...]], PeerView] = {}
        #: merged global rules by their parts: this compile's once global_rules ran,
        #: until then the hint of the compile this one came from.
        self._merged: MergedRules = merged or {}

    # -- shared, computed once -------------------------------------------------

    @cached_property
    def global_rules(self) -> list[Rule]:
        """Rules of regular grants plus the non-self part of self grants."""
        rules: list[Rule] = []
        for grant in self.grants:
            if grant.kind is not GrantKind.VIA:
                rules.extend(grant.rules)
        # A join recompiles a few grants: the merged rules made only of unchanged
        # ones are the earlier compile's, with their matchers and signatures.
        merged, self._merged = merge_rules_reusing(rules, self._merged)
        return merged

    @cached_property
    def global_matches(self) -> list[Match]:
        """Matchers of :attr:`global_rules`."""
        return [r.match() for r in self.global_rules]

    @cached_property
    def primaries(self) -> dict[Prefix, int]:
        """The route election (prefix -> primary node id)."""
        return elect_primaries(self.tailnet, self.previous_primaries)

    @cached_property
    def primaries_by_node(self) -> dict[int, tuple[Prefix, ...]]:
        """Node id -> prefixes it is primary for."""
        return primary_routes_by_node(self.primaries)

    @cached_property
    def node_attrs(self) -> dict[int, tuple[str, ...]]:
        """Node id -> nodeAttrs attributes."""
        return node_attr_caps(self.resolver)

    # -- per node ---------------------------------------------------------------

    def _node(self, node_id: int) -> NodeInfo:
        return self.tailnet.nodes[node_id]

    def _rules_key(self, node: NodeInfo) -> tuple[str, int | None]:
        """What the node's own rules depend on: ``autogroup:self`` rules only on its
        owner (its owner's devices), via rules on the node itself."""
        if self.via_grants:
            return ("node", node.id)
        return ("owner", node.owner)

    def extra_rules(self, node_id: int) -> list[Rule]:
        """The node's own rules: its ``autogroup:self`` and via expansions (shared by
        the devices of one owner when there are no via grants)."""
        if not self.per_node:
            return []
        node = self._node(node_id)
        key = self._rules_key(node)
        cached = self._extra.get(key)
        if cached is None:
            cached = []
            for grant in self.grants:
                if grant.kind is GrantKind.SELF:
                    cached.extend(self_rules(grant, node, self.tailnet, host_sets(self.resolver)))
                elif grant.kind is GrantKind.VIA:
                    cached.extend(via_rules(grant, node))
            self._extra[key] = cached
        return cached

    def unreduced_rules(self, node_id: int) -> list[Rule]:
        """Global rules plus the node's self and via rules, merged."""
        if not self.per_node:
            return self.global_rules
        key = self._rules_key(self._node(node_id))
        cached = self._unreduced.get(key)
        if cached is None:
            cached = merge_rules([*self.global_rules, *self.extra_rules(node_id)])
            self._unreduced[key] = cached
        return cached

    def matches(self, node_id: int) -> list[Match]:
        """Matchers for peer visibility: global ones plus the node's own."""
        if not self.per_node:
            return self.global_matches
        key = self._rules_key(self._node(node_id))
        cached = self._matches.get(key)
        if cached is None:
            cached = self.global_matches + [r.match() for r in self.extra_rules(node_id)]
            self._matches[key] = cached
        return cached

    def filter_rules(self, node_id: int) -> list[Rule]:
        """The node's reduced rules (internal form).

        Reduced as two parts when its own rules merge with no global rule (the
        usual case: ``autogroup:self`` sources are one owner's devices): the global
        rules through their :class:`RuleIndex` (only the rules naming the node or
        naming ranges), then its own rules, merged -- the same rules in the same
        order as reducing :meth:`unreduced_rules`.
        """
        cached = self._filters.get(node_id)
        if cached is None:
            cached = self._filters[node_id] = self._reduced(node_id)
        return cached

    def _reduced(self, node_id: int) -> list[Rule]:
        """:meth:`filter_rules`, computed (not cached)."""
        node = self._node(node_id)
        own = self._own_rules(node)
        if own is None:
            return reduce_rules(node, self.unreduced_rules(node_id))
        return self._global_index.reduce(node) + reduce_rules(node, own)

    @cached_property
    def _global_index(self) -> RuleIndex:
        return RuleIndex(self.global_rules)

    @cached_property
    def _global_keys(self) -> frozenset[tuple[tuple[str, ...], tuple[int, ...]]]:
        """What :func:`merge_rules` merges global rules by (capability rules aside)."""
        return frozenset((r.src, r.protocols) for r in self.global_rules if not r.caps)

    def _own_rules(self, node: NodeInfo) -> list[Rule] | None:
        """The node's own rules merged, when none of them merges with a global rule
        (then :meth:`unreduced_rules` is the global rules followed by these); None
        when one does. Shared like :meth:`extra_rules`."""
        if not self.per_node:
            return []
        key = self._rules_key(node)
        if key in self._own:
            return self._own[key]
        extra = self.extra_rules(node.id)
        keys = self._global_keys
        own = None if any((r.src, r.protocols) in keys for r in extra if not r.caps) else merge_rules(extra)
        self._own[key] = own
        return own

    def packet_filter(self, node_id: int) -> tuple[FilterRule, ...]:
        """``MapResponse.PacketFilter`` for the node."""
        return tuple(r.wire() for r in self.filter_rules(node_id))

    def packet_filter_json(self, node_id: int) -> bytes:
        """The JSON of :meth:`packet_filter`, byte for byte, put together from pieces:
        a rule's ``SrcIPs`` (as long as its sources: a team lists every member
        address) is encoded once per compile and shared by every node whose filter
        keeps part of that rule, not encoded again for each.

        The reduced rules are not kept for the node (unless :meth:`filter_rules` kept
        them): a map stream asks once per compile for a node whose filter changed, and
        an idle node's reduced rules kept with the compile until the next change were
        a list, rules and entry tuples per connected node (issue 19, memory)."""
        rules = self._filters.get(node_id)
        if rules is None:
            rules = self._reduced(node_id)
        return b"[" + b",".join(self._rule_json(r) for r in rules) + b"]"

    def _rule_json(self, rule: Rule) -> bytes:
        if rule.caps or not rule.dst:
            return _encoder.encode(rule.wire())
        # Reduced rules share their rule's SrcIPs tuple: keyed by it (and kept with it).
        hit = self._src_json.get(id(rule.src))
        if hit is None or hit[0] is not rule.src:
            hit = self._src_json[id(rule.src)] = (rule.src, b'{"SrcIPs":' + _encoder.encode(rule.src))
        out = [hit[1], b',"DstPorts":[', b",".join(_entry_json(e) for e in rule.dst), b"]"]
        if rule.protocols:
            out += [b',"IPProto":', _encoder.encode(rule.protocols)]
        out.append(b"}")
        return b"".join(out)

    def visible(self, a: int, b: int) -> bool:
        """Report whether nodes ``a`` and ``b`` see each other (symmetric)."""
        return a != b and b in self.peer_id_set(a)

    def peer_ids(self, node_id: int) -> list[int]:
        """Ids of the peers ``node_id`` sees, in id order."""
        return sorted(self.peer_id_set(node_id))

    def peer_id_set(self, node_id: int) -> frozenset[int]:
        """The peers of ``node_id``: nodes either side may reach.

        B is a peer of A when some matcher has A on the source side and B on
        the destination side, or the other way round (headscale's
        ``CanAccess`` in both directions). Because "some matcher" is an
        existential, the test folds into set unions: the destinations of
        every matcher A is a source of, plus the sources of every matcher A
        is a destination of, form one address set, and B is a peer when one
        of its addresses or served subnet routes falls in it (an exit node
        also when a matcher A sources covers the internet). Via grants add
        their routers (see :meth:`_via_peers`). Cost: one pass over the
        matchers plus the size of the answer.
        """
        cached = self._peer_sets.get(node_id)
        if cached is not None:
            return cached
        node = self._node(node_id)
        reach, exit_reach, internet = self._reach(node_id)
        union = reach | exit_reach
        ids = self.tailnet.node_ids_in(union)
        for router in self.tailnet.routers():
            if any(union.overlaps_prefix(r) for r in router.subnet_routes) or (
                internet and router.is_exit
            ):
                ids.add(router.id)
        ids |= self._via_peers(node)
        ids.discard(node_id)
        result = frozenset(ids)
        self._peer_sets[node_id] = result
        return result

    def _reach(self, node_id: int) -> tuple[IPSet, IPSet, bool]:
        """Fold the node's matchers into address sets (cached).

        Returns:
            ``(reach, exit_reach, internet)``: ``reach`` unions the
            destinations of matchers the node is a source of and the sources
            of matchers it is a destination of (by address or served subnet
            route); ``exit_reach`` adds the sources of internet matchers when
            the node is an exit node; ``internet`` says a matcher the node
            sources covers the internet.
        """
        cached = self._reaches.get(node_id)
        if cached is not None:
            return cached
        node = self._node(node_id)
        core: list[IPSet] = []
        extra: list[IPSet] = []
        internet = False
        for m in self.matches(node_id):
            if _member(node, m.srcs):
                core.extend(m.dests.parts)
                internet = internet or m.internet
            if _member(node, m.dests):
                core.extend(m.srcs.parts)
            elif node.is_exit and m.internet:
                extra.extend(m.srcs.parts)
        result = (AddressUnion(core).merged(), AddressUnion(extra).merged(), internet)
        self._reaches[node_id] = result
        return result

    def reach_changes(self, old: CompiledPolicy) -> IPSet | None:
        """The addresses of the nodes whose peers may differ between ``old`` and this
        compile, another policy's on a tailnet with the same nodes, users, routes and
        node attributes; None when any node's may (via grants, or ``autogroup:self``
        grants whose sources differ). Routers and exit nodes are not covered: a
        caller treats them as changed.

        A node's peers are a fold of the address sets of the matchers it is a source
        or destination of (:meth:`_reach`); ports and protocols play no part. So a
        node in neither side of any matcher that only one compile has folds the same
        sets in both. Cost: the matchers' sizes, not the nodes.
        """
        if self.via_grants or old.via_grants or _self_grant_keys(self) != _self_grant_keys(old):
            return None
        before = {_match_key(m): m for m in old.global_matches}
        after = {_match_key(m): m for m in self.global_matches}
        parts: list[IPSet] = []
        for key in before.keys() ^ after.keys():
            m = before.get(key) or after[key]
            parts.extend(m.srcs.parts)
            parts.extend(m.dests.parts)
        return IPSet.union(parts)

    def forget_fold(self, node_id: int) -> None:
        """Drop the node's cached peer set and fold (:meth:`peer_id_set`,
        :meth:`_reach`), for a caller that asked once about a node it will not ask
        about again in this compile: the map hub, about each visibility class's
        representative when it rebuilds the classes. A fold is an address set about
        as large as the node's peers, so keeping one per class held about 8 KiB per
        node at 5,000 corp nodes until the next compile."""
        self._peer_sets.pop(node_id, None)
        self._reaches.pop(node_id, None)

    @cached_property
    def via_grants(self) -> list[CompiledGrant]:
        """The compiled via grants."""
        return [g for g in self.grants if g.kind is GrantKind.VIA]

    def _via_peers(self, node: NodeInfo) -> set[int]:
        """Nodes connected to ``node`` by via grants, in either direction.

        A via grant connects each of its sources with every router that
        carries one of its via tags and serves a route overlapping its
        destinations (or an exit route, for ``autogroup:internet``) --
        also when the grant has no ``ip`` part. The routers' own via rules
        are checked too, since only they carry them.
        """
        out: set[int] = set()
        for grant in self.via_grants:
            via_tags = set(grant.grant.via)
            node_is_source = _member(node, grant.src_set)
            for router in self.tailnet.routers():
                if router.id == node.id or not (router.tags & via_tags):
                    continue
                serves = grant.via_internet and router.is_exit
                serves = serves or any(
                    d.overlaps(r) for d in grant.dst_prefixes for r in router.subnet_routes
                )
                if not serves:
                    continue
                if node_is_source:
                    out.add(router.id)
                if node.tags & via_tags or _member(router, grant.src_set):
                    # The router's rules may also connect it to ``node``.
                    extra = [r.match() for r in via_rules(grant, router)]
                    if can_access(node, router, extra) or can_access(router, node, extra):
                        out.add(router.id)
            if node.tags & via_tags and (node.subnet_routes or node.is_exit):
                # ``node`` is itself a via router: its sources see it.
                serves = grant.via_internet and node.is_exit
                serves = serves or any(
                    d.overlaps(r) for d in grant.dst_prefixes for r in node.subnet_routes
                )
                if serves:
                    out |= self.tailnet.node_ids_in(grant.src_set.merged())
        return out

    def peers(self, node_id: int) -> tuple[PeerView, ...]:
        """The visible peers with their addresses and routes as seen by the node."""
        viewer = self._node(node_id)
        reach = self._reach(node_id)[0]
        return tuple(self._peer_view(viewer, reach, peer_id) for peer_id in self.peer_ids(node_id))

    def _peer_view(self, viewer: NodeInfo, reach: IPSet | None, peer_id: int) -> PeerView:
        """How ``viewer`` sees ``peer_id``; ``reach`` is the viewer's fold (computed
        here when None and the peer serves routes)."""
        peer = self._node(peer_id)
        routes: list[Prefix] = []
        plain = not (peer.subnet_routes or peer.exit_routes)
        if plain:
            # Without routes, how a peer is seen depends only on the viewer's node
            # attributes (disable-ipv4): one view per peer and kind of viewer.
            key = (peer_id, self.node_attrs.get(viewer.id, ()))
            view = self._plain_views.get(key)
            if view is not None:
                return view
        else:
            if reach is None:
                reach = self._reach(viewer.id)[0]
            via = via_routes_for_peer(viewer, peer, self.via_grants, self.grants, self.tailnet)
            routes = routes_for_peer(viewer, peer, reach, self.primaries_by_node, via)
        attrs = self.node_attrs.get(peer_id, ())
        addresses = _addresses(peer, attrs + self.node_attrs.get(viewer.id, ()))
        view = PeerView(
            node_id=peer_id,
            allowed_ips=tuple(sorted(addresses + [prefix_str(r) for r in routes])),
            primary_routes=tuple(prefix_str(r) for r in routes if r.bits != 0),
            cap_map=peer_cap_map(self.tailnet, peer, attrs),
        )
        if plain:
            self._plain_views[key] = view
        return view

    def visible_one(self, a: int, b: int) -> bool:
        """Whether ``b`` is a peer of ``a``, without building ``a``'s whole peer set.

        The same test as :meth:`peer_id_set` applied to one candidate: cost is one
        fold of ``a``'s matchers -- or of ``b``'s when ``a``'s is not cached (folds
        are cached) -- plus the other node's addresses and routes.
        """
        if a == b or b not in self.tailnet.nodes or a not in self.tailnet.nodes:
            return False
        cached = self._peer_sets.get(a)
        if cached is not None:
            return b in cached
        if self.via_grants:
            return b in self.peer_id_set(a)
        if a not in self._reaches:
            # Visibility is symmetric (see peer_id_set), so fold either side. Right
            # after an incremental compile nothing is folded, and a join asks this
            # once per visibility class about the one newcomer: its fold, made once,
            # answers every class.
            a, b = b, a
        reach, exit_reach, internet = self._reach(a)
        peer = self._node(b)
        for part in (reach, exit_reach):
            if part.contains_any(peer.addrs) or any(part.overlaps_prefix(r) for r in peer.subnet_routes):
                return True
        return internet and peer.is_exit

    def peer_view(self, viewer_id: int, peer_id: int) -> PeerView | None:
        """How ``viewer_id`` sees ``peer_id``, or ``None`` when it is not a peer."""
        if not self.visible_one(viewer_id, peer_id):
            return None
        return self._peer_view(self._node(viewer_id), None, peer_id)

    def known_peer_view(self, viewer_id: int, peer_id: int) -> PeerView:
        """How ``viewer_id`` sees ``peer_id``, for a caller that knows they are peers
        (:meth:`peer_view` without the visibility test)."""
        return self._peer_view(self._node(viewer_id), None, peer_id)

    def self_view(self, node_id: int) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, CapValue]]:
        """The node's own ``(AllowedIPs, PrimaryRoutes, CapMap)`` without its peers."""
        node = self._node(node_id)
        attrs = self.node_attrs.get(node_id, ())
        own_routes = [prefix_str(r) for r in node.node.served_routes()]
        return (
            tuple(_addresses(node, attrs) + own_routes),
            tuple(prefix_str(r) for r in self.primaries_by_node.get(node_id, ())),
            self_cap_map(self.tailnet, attrs),
        )

    def ssh_policy(self, node_id: int) -> SSHPolicy | None:
        """The node's SSH policy (computed from the netmap's cache when present)."""
        cached = self._netmaps.get(node_id)
        if cached is not None:
            return cached.ssh_policy
        return compile_ssh_policy(self.resolver, self._node(node_id), self.control_url)

    def netmap(self, node_id: int) -> NodeNetmap:
        """Everything the policy contributes to the node's MapResponse."""
        cached = self._netmaps.get(node_id)
        if cached is not None:
            return cached
        node = self._node(node_id)
        attrs = self.node_attrs.get(node_id, ())
        peers = self.peers(node_id)
        own_routes = [prefix_str(r) for r in node.node.served_routes()]
        result = NodeNetmap(
            node_id=node_id,
            packet_filter=self.packet_filter(node_id),
            peers=peers,
            allowed_ips=tuple(_addresses(node, attrs) + own_routes),
            primary_routes=tuple(prefix_str(r) for r in self.primaries_by_node.get(node_id, ())),
            cap_map=self_cap_map(self.tailnet, attrs),
            ssh_policy=compile_ssh_policy(self.resolver, node, self.control_url),
            whois_cap_map=whois_cap_map(
                node, (self._node(p.node_id) for p in peers), self.filter_rules(node_id)
            ),
        )
        self._netmaps[node_id] = result
        return result

    def ssh_table(self, previous: SSHTable | None = None, changed: Sequence[NodeInfo] | None = None) -> SSHTable:
        """Every SSH rule resolved once for this snapshot (see :class:`SSHTable`);
        ``previous`` is the table of an earlier snapshot, whose equal tokens are kept;
        ``changed``, the only nodes changed since, before and after (same users)."""
        return SSHTable(self.resolver, self.control_url, previous, changed)

    def filters_changed_since(self, old: CompiledPolicy, changed: set[int]) -> frozenset[int] | None:
        """Nodes whose packet filter may differ from ``old``'s, when this policy came
        from ``old`` by node changes only (:meth:`with_node`/:meth:`without_node` on
        the same policy and users); None when that cannot be bounded cheaply (every
        node's filter must then be recomputed).

        A node's filter is its relevant entries of the merged global rules, in order,
        then of its own ``autogroup:self`` rules. So only these can change:

        * the ``changed`` nodes themselves;
        * destinations (old or new) of merged global rules that differ: a rule is
          the same when its ``SrcIPs``, protocols and very entry objects are (grants
          that were not recompiled share theirs), provided the rules present in both
          keep their order (else None);
        * the devices of the changed nodes' owners (old and new): ``autogroup:self``
          rules depend only on the owner's devices;
        * the devices of a user whose devices alone are the sources of a rule that
          differs: such a rule merges with their ``autogroup:self`` rules.

        Via grants give per-router rules that depend on others' routes: None.
        """
        if old.policy is not self.policy or self.via_grants or old.via_grants:
            return None
        out: set[int] = set(changed)
        for nid in changed:
            for tailnet in (old.tailnet, self.tailnet):
                info = tailnet.nodes.get(nid)
                if info is not None and info.owner is not None:
                    out |= tailnet.node_ids_of_user(info.owner)
        before, after = old.global_rules, self.global_rules
        if before is after:
            return frozenset(out)
        sig_before = [r.signature() for r in before]
        sig_after = [r.signature() for r in after]
        common = set(sig_before) & set(sig_after)
        if [s for s in sig_before if s in common] != [s for s in sig_after if s in common]:
            return None
        for tailnet, rules, sigs in ((old.tailnet, before, sig_before), (self.tailnet, after, sig_after)):
            touched = [r for r, s in zip(rules, sigs, strict=True) if s not in common]
            if not touched:
                continue
            dests: list[IPSet] = []
            for rule in touched:
                # The per-alias parts: equal in content to the entries' sets, and few.
                dests.extend(rule.dst_parts)
                if self.per_node:
                    owner = tailnet.sole_owner(rule.src_set.parts)
                    if owner is not None:
                        out |= tailnet.node_ids_of_user(owner)
            out |= tailnet.node_ids_in(IPSet.union(dests))
            # Routers and exit nodes are destinations by route too.
            out.update(r.id for r in tailnet.routers())
        return frozenset(out)

    # -- incremental updates ----------------------------------------------------

    def with_node(self, node: PolicyNode) -> CompiledPolicy:
        """This policy for the tailnet with ``node`` added or replaced.

        Cost: re-resolving the aliases the node belongs to and recompiling
        the grants that use them; everything else is shared.
        """
        old = self.tailnet.nodes.get(node.id)
        if self.auto_approve:
            node = approve(self.policy, self.tailnet, node)
        tailnet = self.tailnet.with_node(node)
        info = tailnet.nodes[node.id]
        touched = node_keys(info, tailnet)
        if old is not None:
            touched |= node_keys(old, self.tailnet)
        resolver = self.resolver.derive(tailnet, touched, (old, info))
        attrs = dict(self.node_attrs)
        attrs.pop(node.id, None)
        attrs.update(node_attr_caps(resolver, only=(info,)))
        routes_changed = bool(info.subnet_routes) or (old is not None and bool(old.subnet_routes))
        return self._recompiled(resolver, touched, attrs, routes_changed)

    def without_node(self, node_id: int) -> CompiledPolicy:
        """This policy for the tailnet without node ``node_id``."""
        old = self.tailnet.nodes.get(node_id)
        if old is None:
            return self
        touched = node_keys(old, self.tailnet)
        resolver = self.resolver.derive(self.tailnet.without_node(node_id), touched, (old, None))
        attrs = {k: v for k, v in self.node_attrs.items() if k != node_id}
        return self._recompiled(resolver, touched, attrs, bool(old.subnet_routes))

    def _recompiled(
        self,
        resolver: Resolver,
        touched: set[str],
        node_attrs: dict[int, tuple[str, ...]],
        routes_changed: bool,
    ) -> CompiledPolicy:
        grants: list[CompiledGrant | None] = []
        for slot, grant in zip(self.grant_slots, self.sources, strict=True):
            if slot is not None and not (slot.depends & touched):
                grants.append(slot)
            elif slot is not None and can_recompile_sources(slot, touched):
                grants.append(recompile_sources(slot, resolver))
            else:
                grants.append(compile_grant(grant, resolver, previous=slot))
        forget_shared_entries(resolver)
        return CompiledPolicy(
            resolver,
            self.sources,
            grants,
            control_url=self.control_url,
            previous_primaries=self.primaries,
            node_attrs=node_attrs,
            primaries=None if routes_changed else self.primaries,
            auto_approve=self.auto_approve,
            merged=self._merged,
        )


def _entry_json(entry: DstEntry) -> bytes:
    """A ``DstPorts`` element as msgspec encodes :class:`~.wire.NetPortRange`."""
    return b'{"IP":%s,"Ports":{"First":%d,"Last":%d}}' % (_encoder.encode(entry.ip), entry.first, entry.last)


def _match_key(m: Match) -> tuple[frozenset[IPSet], frozenset[IPSet], bool]:
    """A matcher by what it means for visibility: its address sets (by value)."""
    return frozenset(m.srcs.parts), frozenset(m.dests.parts), m.internet


def _self_grant_keys(compiled: CompiledPolicy) -> frozenset[object]:
    """What the ``autogroup:self`` rules' matchers are made of, per self grant: the
    sources, whether it has ports, and its app capabilities (companion rules)."""
    return frozenset(
        (frozenset(g.src_sets), any(spec.ports for spec in g.grant.ip), tuple(sorted(name for name, _ in g.grant.app)))
        for g in compiled.grants
        if g.kind is GrantKind.SELF
    )


def _member(node: NodeInfo, addresses: AddressUnion) -> bool:
    """A node is in a set by address or, for subnet routers, by served route."""
    return addresses.contains_any(node.addrs) or any(
        addresses.overlaps_prefix(r) for r in node.subnet_routes
    )


def _addresses(node: NodeInfo, attrs: tuple[str, ...]) -> list[str]:
    """The node's own /32 and /128 (IPv4 dropped under ``disable-ipv4``)."""
    out: list[str] = []
    for addr in node.addrs:
        if is_v4(addr):
            if ATTR_DISABLE_IPV4 in attrs:
                continue
            out.append(f"{format_addr(addr)}/32")
        else:
            out.append(f"{format_addr(addr)}/128")
    return out
