"""Netmaps: what each node is told about itself and its peers (pure).

The building blocks of a ``MapResponse``: :func:`wire_node` turns a node record, its
presence and the policy's view of it into a ``tailcfg.Node``; :func:`profiles_for`
gives the user profiles; :func:`full_map` is the reference full netmap of one node,
computed straight from the policy engine's per-node answer.

Live servers do not call :func:`full_map` per stream: :mod:`projections.mapviews`
shares peer views between nodes that see the world identically and sends each stream
the smallest delta (``PeersChanged``, ``PeersRemoved``, ``PeersChangedPatch``, the
self node, filter, SSH policy or DERP map only when they changed). Its maps must equal
this one; the tests compare them.

Nothing here reads a clock or the network: ``now`` and presence are arguments and the
policy is behind the small :class:`PolicyView` interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Protocol

import msgspec

from .policy import CompiledPolicy, NodeNetmap
from .presence import NodePresence
from .state import Node, TailnetState
from .tailcfg import (
    Debug,
    DERPMap,
    DNSConfig,
    MapResponse,
    UserProfile,
)
from .tailcfg import Node as WireNode

__all__ = [
    "DENY_ALL",
    "TAGGED_DEVICES_USER_ID",
    "NetmapSettings",
    "PolicyView",
    "PresenceOf",
    "expired_map",
    "expired_self",
    "full_map",
    "profiles_for",
    "user_id_shown",
    "wire_cap_map",
    "wire_node",
]

#: The user id tagged nodes are shown under (Tailscale's and Headscale's convention).
TAGGED_DEVICES_USER_ID: Final = 2147455555

PresenceOf = Callable[[int], NodePresence | None]
WireCapMap = dict[str, list[msgspec.Raw] | None]

_encoder: Final = msgspec.json.Encoder()
_raw_list: Final = msgspec.json.Decoder(list[msgspec.Raw])


class PolicyView(Protocol):
    """What the netmap needs from the policy engine (``PolicyCompiler`` implements it)."""

    def netmap(self, state: TailnetState, node_id: int) -> NodeNetmap:
        """The policy's part of ``node_id``'s map: filter, visible peers, routes, caps."""
        ...

    def compiled(self, state: TailnetState) -> CompiledPolicy:
        """The compiled policy, for per-pair questions (the incremental path)."""
        ...


def wire_cap_map(caps: dict[str, msgspec.Raw | None]) -> WireCapMap | None:
    """The engine's capability map (values are JSON arrays) in tailcfg's shape."""
    if not caps:
        return None
    return {name: None if value is None else _raw_list.decode(value) for name, value in caps.items()}


@dataclass(frozen=True)
class NetmapSettings:
    """Tailnet-wide parts of every map (from configuration)."""

    domain: str
    derp_map: DERPMap
    dns: DNSConfig | None = None


def user_id_shown(node: Node) -> int:
    """The user id a node is shown under (tagged nodes belong to "Tagged Devices")."""
    return TAGGED_DEVICES_USER_ID if node.tags else node.user_id


def wire_node(
    node: Node,
    presence: NodePresence | None,
    settings: NetmapSettings,
    *,
    allowed_ips: tuple[str, ...],
    primary_routes: tuple[str, ...],
    cap_map: dict[str, msgspec.Raw | None],
    is_self: bool,
    expired: bool = False,
) -> WireNode:
    """The ``tailcfg.Node`` for ``node``; the policy-dependent parts come from the
    viewer's netmap (a peer's AllowedIPs depend on who looks). ``expired`` marks a
    self node whose key is out of use (``Node.Expired``)."""
    addresses = [f"{node.ipv4}/32"] if node.ipv4 else []
    if node.ipv6:
        addresses.append(f"{node.ipv6}/128")
    wire_allowed = list(allowed_ips) if allowed_ips else addresses
    if wire_allowed is not addresses and wire_allowed == addresses:
        # A peer without routes: one list of the view's strings for both fields,
        # not an equal copy per field (issue 19, memory).
        addresses = wire_allowed
    p = presence or NodePresence()
    return WireNode(
        id=node.id,
        stable_id=str(node.id),
        name=f"{node.given_name}.{settings.domain}.",
        user=user_id_shown(node),
        key=f"nodekey:{node.node_key}",
        key_expiry=node.expiry,
        machine=f"mkey:{node.machine_key}",
        disco_key=p.disco_key,
        addresses=addresses,
        allowed_ips=wire_allowed,
        endpoints=list(p.endpoints) or None,
        home_derp=p.home_derp,
        hostinfo=p.hostinfo,
        created=node.created_at,
        cap=p.cap,
        tags=list(node.tags) or None,
        primary_routes=list(primary_routes) or None,
        online=None if is_self else p.online,
        last_seen=None if is_self else p.last_seen,  # kept while online, as Tailscale does
        machine_authorized=True,
        cap_map=wire_cap_map(cap_map),
        expired=expired,
    )


#: The packet filter of a node whose key is out of use: deny everything.
DENY_ALL: Final = msgspec.Raw(b"[]")


def expired_self(node: Node, presence: NodePresence | None, settings: NetmapSettings) -> WireNode:
    """The self node of a node whose key expired or that logged out: marked
    ``Expired`` (its ``KeyExpiry`` is in the past), with none of the policy's extras."""
    return wire_node(
        node, presence, settings, allowed_ips=(), primary_routes=(), cap_map={}, is_self=True, expired=True
    )


def expired_map(
    state: TailnetState, node: Node, presence: NodePresence | None, settings: NetmapSettings, now: datetime
) -> MapResponse:
    """What a node whose key is out of use (expired, or logged out) is told, as
    Tailscale's control plane does: its own node, marked expired, and nothing of the
    tailnet: no peers, a deny-all packet filter, no SSH policy and no DNS
    configuration. The client then asks its user to log in again."""
    return MapResponse(
        node=expired_self(node, presence, settings),
        derp_map=settings.derp_map,
        domain=settings.domain,
        packet_filters={"base": DENY_ALL},
        user_profiles=profiles_for(state, [node]),
        collect_services=False,
        control_time=now,
        debug=Debug(disable_log_tail=True),
    )




def profiles_for(state: TailnetState, nodes: Iterable[Node]) -> list[UserProfile]:
    """The user profiles of the users ``nodes`` are shown under, by id."""
    out: dict[int, UserProfile] = {}
    for node in nodes:
        uid = user_id_shown(node)
        if uid in out:
            continue
        if uid == TAGGED_DEVICES_USER_ID:
            out[uid] = UserProfile(id=uid, login_name="tagged-devices", display_name="Tagged Devices")
            continue
        user = state.users.get(uid)
        if user is not None:
            out[uid] = UserProfile(
                id=uid,
                login_name=user.login_name,
                display_name=user.display_name or user.name,
                profile_pic_url=user.profile_pic_url,
            )
    return sorted(out.values(), key=lambda p: p.id)


def full_map(
    state: TailnetState,
    node_id: int,
    *,
    policy: PolicyView,
    settings: NetmapSettings,
    presence: PresenceOf,
    now: datetime,
) -> MapResponse:
    """The full netmap of ``node_id``, straight from the policy engine's answer for it.

    This is the reference: servers use :mod:`projections.mapviews`, which shares peer
    views between nodes and must produce the same map (tests compare the two); replay
    and audit tools use this directly.
    """
    node = state.nodes[node_id]
    if node.is_expired(now):
        return expired_map(state, node, presence(node_id), settings, now)
    netmap = policy.netmap(state, node_id)
    peers: list[WireNode] = []
    for view in netmap.peers:
        peer = state.nodes.get(view.node_id)
        if peer is None or peer.is_expired(now):
            continue  # an expired node drops out of its peers' maps at once
        peers.append(
            wire_node(
                peer, presence(peer.id), settings, allowed_ips=view.allowed_ips,
                primary_routes=view.primary_routes, cap_map=view.cap_map, is_self=False,
            )
        )
    peers.sort(key=lambda n: n.id)
    self_node = wire_node(
        node, presence(node_id), settings, allowed_ips=netmap.allowed_ips,
        primary_routes=netmap.primary_routes, cap_map=netmap.cap_map, is_self=True,
    )
    profiles = profiles_for(state, [node, *(state.nodes[p.id] for p in peers)])
    return MapResponse(
        node=self_node,
        derp_map=settings.derp_map,
        peers=peers or None,
        dns_config=settings.dns,
        domain=settings.domain,
        packet_filters={"base": msgspec.Raw(_encoder.encode(netmap.packet_filter))},
        ssh_policy=msgspec.Raw(_encoder.encode(netmap.ssh_policy)) if netmap.ssh_policy is not None else None,
        user_profiles=profiles,
        collect_services=False,
        control_time=now,
        debug=Debug(disable_log_tail=True),
    )
