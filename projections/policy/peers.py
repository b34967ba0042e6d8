"""Peer visibility and the routes a viewer sees through each peer.

Role in the pipeline: per-node stage, after compilation. Two questions,
answered the way headscale answers them (and its captures of the hosted
control plane confirm):

*Can A reach B?* (:func:`can_access`) A node has two source identities: its
own addresses and its served subnet routes (a subnet router speaks for its
subnet). A matcher lets A reach B when A matches the sources and the
destinations contain one of B's addresses, overlap one of B's subnet routes,
or -- when B is an exit node -- cover the internet. Two nodes are peers when
either can reach the other (visibility is symmetric).

*Which of B's routes does A get?* (:func:`routes_for_peer`) B's primary
subnet routes and approved exit routes, kept only when A's matchers let A
use them (:func:`can_access_route`), adjusted by ``via`` grants that steer
a prefix to routers with a given tag, plus the co-router rule: a router that
serves a prefix always learns which peer is primary for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .compile import CompiledGrant, GrantKind
from .ipset import AddressUnion, IPSet, Prefix
from .rules import Match
from .tailnet import NodeInfo, Tailnet

__all__ = [
    "ViaResult",
    "can_access",
    "can_access_route",
    "route_reach",
    "routes_for_peer",
    "via_routes_for_peer",
]


def can_access(src: NodeInfo, dst: NodeInfo, matches: Iterable[Match]) -> bool:
    """Report whether ``src`` may open connections to ``dst`` (headscale's CanAccess)."""
    for m in matches:
        if not (
            m.srcs.contains_any(src.addrs)
            or any(m.srcs.overlaps_prefix(r) for r in src.subnet_routes)
        ):
            continue
        if m.dests.contains_any(dst.addrs):
            return True
        if any(m.dests.overlaps_prefix(r) for r in dst.subnet_routes):
            return True
        if dst.is_exit and m.internet:
            return True
    return False


def can_access_route(viewer: NodeInfo, route: Prefix, matches: Iterable[Match]) -> bool:
    """Report whether ``route`` belongs in ``viewer``'s view of a peer.

    True when the viewer may send into the route, when the route's subnet
    may send to the viewer (return traffic), or when the viewer is a subnet
    router whose own subnets talk to the route in either direction
    (headscale's ``CanAccessRoute``). :func:`route_reach` folds the same
    test into one address set, which is what the engine uses.
    """
    return route_reach(viewer, matches).overlaps_prefix(route)


def route_reach(viewer: NodeInfo, matches: Iterable[Match]) -> IPSet:
    """Addresses a route must overlap to be usable by ``viewer``.

    The union of the destinations of every matcher the viewer is a source
    of and the sources of every matcher it is a destination of, where
    "is" means by address or by one of its served subnet routes.
    """
    parts: list[IPSet] = []
    for m in matches:
        if _member(viewer, m.srcs):
            parts.extend(m.dests.parts)
        if _member(viewer, m.dests):
            parts.extend(m.srcs.parts)
    return AddressUnion(parts).merged()


def _member(node: NodeInfo, addresses: AddressUnion) -> bool:
    return addresses.contains_any(node.addrs) or any(
        addresses.overlaps_prefix(r) for r in node.subnet_routes
    )


class ViaResult:
    """How via grants change the routes a viewer gets through one peer.

    Attributes:
        include: prefixes the viewer must route through this peer.
        exclude: prefixes the viewer must *not* route through this peer.
        use_primary: included prefixes that fall back to HA election
            because a regular grant also covers them.
    """

    __slots__ = ("exclude", "include", "use_primary")

    def __init__(self) -> None:
        self.include: list[Prefix] = []
        self.exclude: list[Prefix] = []
        self.use_primary: list[Prefix] = []


def via_routes_for_peer(
    viewer: NodeInfo,
    peer: NodeInfo,
    via_grants: Sequence[CompiledGrant],
    grants: Sequence[CompiledGrant],
    tailnet: Tailnet,
) -> ViaResult:
    """Compute via-grant steering for one (viewer, peer) pair.

    Follows headscale's ``ViaRoutesForPeer``: a via grant the viewer is a
    source of, whose destinations overlap routes the peer serves, includes
    those routes when the peer has a via tag and excludes them otherwise.
    Among several via-tagged routers for one prefix only the lowest id keeps
    it; a regular grant covering the prefix defers to HA election.
    """
    result = ViaResult()
    if viewer.id == peer.id or not any(_src_match(g, viewer) for g in via_grants):
        return result
    matching = [g for g in grants if _src_match(g, viewer)]
    for grant in matching:
        if grant.kind is not GrantKind.VIA:
            continue
        matched = [r for d in grant.dst_prefixes for r in peer.subnet_routes if d.overlaps(r)]
        if grant.via_internet and peer.is_exit:
            matched.extend(peer.exit_routes)
        if not matched:
            continue
        if peer.tags & set(grant.grant.via):
            result.include.extend(matched)
        else:
            result.exclude.extend(matched)
    if not result.include and not result.exclude:
        return result
    for grant in matching:
        if grant.kind is not GrantKind.VIA:
            continue
        for dst in grant.dst_prefixes:
            for included in list(result.include):
                if not dst.overlaps(included):
                    continue
                winner = min(
                    (
                        n.id
                        for tag in grant.grant.via
                        for n in (tailnet.nodes[i] for i in tailnet.node_ids_with_tag(tag))
                        if included in n.subnet_routes
                    ),
                    default=None,
                )
                if winner is not None and peer.id != winner:
                    result.include = [p for p in result.include if p != included]
                    if included not in result.exclude:
                        result.exclude.append(included)
    for grant in matching:
        if grant.kind is GrantKind.VIA:
            continue
        for dst in grant.dst_prefixes:
            for included in result.include:
                if dst.overlaps(included) and included not in result.use_primary:
                    result.use_primary.append(included)
            result.exclude = [p for p in result.exclude if not dst.overlaps(p)]
    return result


def _src_match(grant: CompiledGrant, viewer: NodeInfo) -> bool:
    return any(ips.contains_any(viewer.addrs) for ips in grant.src_sets)


def routes_for_peer(
    viewer: NodeInfo,
    peer: NodeInfo,
    reach: IPSet,
    primaries: Mapping[int, tuple[Prefix, ...]],
    via: ViaResult,
) -> list[Prefix]:
    """The routes ``viewer`` gets in ``peer``'s AllowedIPs (headscale's RoutesForPeer).

    Args:
        viewer: the node receiving the netmap.
        peer: the peer whose routes are listed.
        reach: the viewer's :func:`route_reach`.
        primaries: node id -> prefixes it is primary for.
        via: via steering for this pair.
    """
    peer_primaries = primaries.get(peer.id, ())
    candidates = [*peer_primaries, *peer.exit_routes]
    if via.include or via.exclude:
        candidates = [p for p in candidates if p not in via.exclude]
    reduced = [r for r in candidates if reach.overlaps_prefix(r)]
    for prefix in via.include:
        if prefix in reduced:
            continue
        if prefix in peer_primaries or prefix not in via.use_primary:
            reduced.append(prefix)
    for prefix in peer_primaries:
        if prefix in viewer.subnet_routes and prefix not in reduced:
            reduced.append(prefix)
    return reduced
