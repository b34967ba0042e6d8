"""Netmaps: what each node is told about itself and its peers (pure).

:func:`full_map` builds the first message of a map stream; :class:`StreamView` keeps
what one stream has been sent and turns later changes (a log :class:`Delta`, a set of
nodes whose presence changed, the passage of time across a key expiry) into the
smallest message that brings the client up to date:

* a peer that appears or changes structurally (key, name, tags, addresses, routes,
  Hostinfo) goes in ``PeersChanged``;
* a peer that disappears (deleted, expired, no longer visible under the policy) goes
  in ``PeersRemoved`` — an empty ``Peers`` list is a no-op for clients, so this is the
  only way to reach zero peers (pitfall 3);
* a peer whose presence alone changed (endpoints, DERP home, disco key, online)
  gets a ``PeersChangedPatch`` entry;
* the self node, the packet filter, the SSH policy and user profiles are sent only
  when they changed.

Nothing here reads a clock or the network: ``now`` and presence are arguments, the
policy is behind the small :class:`PolicyView` interface, and the result is a
``tailcfg.MapResponse`` ready to encode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Protocol

import msgspec

from .delta import Delta
from .policy import CompiledPolicy, FilterRule, NodeNetmap, SSHPolicy
from .presence import NodePresence
from .state import Node, TailnetState
from .tailcfg import (
    Debug,
    DERPMap,
    DNSConfig,
    MapResponse,
    PeerChange,
    UserProfile,
)
from .tailcfg import Node as WireNode

__all__ = [
    "TAGGED_DEVICES_USER_ID",
    "NetmapSettings",
    "PolicyView",
    "StreamView",
    "full_map",
    "wire_node",
]

#: The user id tagged nodes are shown under (Tailscale's and Headscale's convention).
TAGGED_DEVICES_USER_ID: Final = 2147455555

PresenceOf = Callable[[int], NodePresence | None]
WireCapMap = dict[str, list[msgspec.Raw] | None]

_encoder: Final = msgspec.json.Encoder()
_raw_list: Final = msgspec.json.Decoder(list[msgspec.Raw])
_NO_SSH: Final = msgspec.Raw(b'{"rules":[]}')


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
    """Tailnet-wide parts of every map (from configuration), and the peer cache
    every stream of the server shares."""

    domain: str
    derp_map: DERPMap
    dns: DNSConfig | None = None
    peers: PeerCache = field(default_factory=lambda: PeerCache(), compare=False)


class PeerCache:
    """One shared ``tailcfg.Node`` per peer version, so viewers hold references to the
    same immutable object instead of a copy each (peer data is shared, not copied per
    viewer). Keyed by node id; the entry is reused while the node record, its
    presence and the policy's view of it are the same objects/values."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple[object, ...], WireNode]] = {}
        self.hits = 0
        self.misses = 0

    def get(
        self,
        node: Node,
        presence: NodePresence | None,
        settings: NetmapSettings,
        allowed_ips: tuple[str, ...],
        primary_routes: tuple[str, ...],
        cap_map: dict[str, msgspec.Raw | None],
    ) -> WireNode:
        caps = tuple((k, bytes(v) if v is not None else None) for k, v in cap_map.items())
        entry = self._entries.get(node.id)
        if entry is not None:
            key, wire = entry
            if key[0] is node and key[1] is presence and key[2:] == (allowed_ips, primary_routes, caps):
                self.hits += 1
                return wire
        self.misses += 1
        wire = wire_node(
            node, presence, settings, allowed_ips=allowed_ips, primary_routes=primary_routes,
            cap_map=cap_map, is_self=False,
        )
        self._entries[node.id] = ((node, presence, allowed_ips, primary_routes, caps), wire)
        return wire

    def forget(self, node_id: int) -> None:
        self._entries.pop(node_id, None)


def _user_id(node: Node) -> int:
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
) -> WireNode:
    """The ``tailcfg.Node`` for ``node``; the policy-dependent parts come from the
    viewer's netmap (a peer's AllowedIPs depend on who looks)."""
    addresses = [f"{node.ipv4}/32"] if node.ipv4 else []
    if node.ipv6:
        addresses.append(f"{node.ipv6}/128")
    p = presence or NodePresence()
    return WireNode(
        id=node.id,
        stable_id=str(node.id),
        name=f"{node.given_name}.{settings.domain}.",
        user=_user_id(node),
        key=f"nodekey:{node.node_key}",
        key_expiry=node.expiry,
        machine=f"mkey:{node.machine_key}",
        disco_key=p.disco_key,
        addresses=addresses,
        allowed_ips=list(allowed_ips) if allowed_ips else addresses,
        endpoints=list(p.endpoints) or None,
        home_derp=p.home_derp,
        hostinfo=p.hostinfo,
        created=node.created_at,
        cap=p.cap,
        tags=list(node.tags) or None,
        primary_routes=list(primary_routes) or None,
        online=None if is_self else p.online,
        last_seen=p.last_seen if (not is_self and not p.online) else None,
        machine_authorized=True,
        cap_map=wire_cap_map(cap_map),
    )


def _peer_nodes(
    state: TailnetState, netmap: NodeNetmap, presence: PresenceOf, settings: NetmapSettings, now: datetime
) -> dict[int, WireNode]:
    out: dict[int, WireNode] = {}
    for view in netmap.peers:
        peer = state.nodes.get(view.node_id)
        if peer is None or peer.is_expired(now):
            continue  # an expired node drops out of its peers' maps at once
        out[view.node_id] = settings.peers.get(
            peer, presence(peer.id), settings, view.allowed_ips, view.primary_routes, view.cap_map
        )
    return out


def _self_node(
    state: TailnetState, node: Node, netmap: NodeNetmap, presence: PresenceOf, settings: NetmapSettings
) -> WireNode:
    return wire_node(
        node, presence(node.id), settings, allowed_ips=netmap.allowed_ips,
        primary_routes=netmap.primary_routes, cap_map=netmap.cap_map, is_self=True,
    )


def _profiles(state: TailnetState, nodes: Iterable[Node]) -> list[UserProfile]:
    out: dict[int, UserProfile] = {}
    for node in nodes:
        uid = _user_id(node)
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


@dataclass
class UpdateStats:
    """How stream updates were computed (process-wide, for metrics and benchmarks)."""

    incremental: int = 0
    full: int = 0


STATS = UpdateStats()


@dataclass(eq=False)
class StreamView:
    """What one map stream has sent so far; produces the next message.

    Attributes:
        node_id: the node the stream belongs to.
        peers: peer id -> the wire node last sent for it.
    """

    node_id: int
    policy: PolicyView
    settings: NetmapSettings
    presence: PresenceOf
    peers: dict[int, WireNode] = field(default_factory=dict)
    self_node: WireNode | None = None
    packet_filter: bytes = b""
    ssh_policy: bytes | None = None
    profiles: dict[int, UserProfile] = field(default_factory=dict)
    derp_map: DERPMap | None = None

    def full_map(self, state: TailnetState, now: datetime) -> MapResponse:
        """The complete first message of a stream (and the new baseline)."""
        node = state.nodes[self.node_id]
        netmap = self.policy.netmap(state, node.id)
        self.peers = _peer_nodes(state, netmap, self.presence, self.settings, now)
        self.self_node = _self_node(state, node, netmap, self.presence, self.settings)
        pf = msgspec.Raw(_encoder.encode(netmap.packet_filter))
        ssh = msgspec.Raw(_encoder.encode(netmap.ssh_policy)) if netmap.ssh_policy is not None else None
        self.packet_filter = bytes(pf)
        self.ssh_policy = bytes(ssh) if ssh is not None else None
        profiles = _profiles(state, [node, *(state.nodes[i] for i in self.peers)])
        self.profiles = {p.id: p for p in profiles}
        self.derp_map = self.settings.derp_map
        return MapResponse(
            node=self.self_node,
            derp_map=self.settings.derp_map,
            peers=[self.peers[nid] for nid in sorted(self.peers)] or None,
            dns_config=self.settings.dns,
            domain=self.settings.domain,
            packet_filters={"base": pf},
            ssh_policy=ssh,
            user_profiles=profiles,
            collect_services=False,
            control_time=now,
            debug=Debug(disable_log_tail=True),
        )

    def update(
        self,
        state: TailnetState,
        now: datetime,
        delta: Delta,
        presence_changed: set[int],
    ) -> MapResponse | None:
        """The message that brings the client from what it was sent to ``state``;
        ``None`` when nothing it can see changed.

        When only *other* nodes changed (no policy, user or self change, and no route
        that could move a primary), only those nodes are looked at: the cost is the
        size of the change, not of the tailnet.
        """
        node = state.nodes.get(self.node_id)
        if node is None:
            return None
        if self._incremental_ok(state, delta, presence_changed):
            STATS.incremental += 1
            return self._update_incremental(state, node, now, delta, presence_changed)
        STATS.full += 1
        netmap = self.policy.netmap(state, node.id)
        visible = _peer_nodes(state, netmap, self.presence, self.settings, now)
        changed: list[WireNode] = []
        patches: list[PeerChange] = []
        removed = sorted(set(self.peers) - set(visible))
        for nid in removed:
            del self.peers[nid]
        for nid, new in visible.items():
            old = self.peers.get(nid)
            if old is new or old == new:
                continue
            self.peers[nid] = new
            if old is None or _structural(old) != _structural(new):
                changed.append(new)
            else:
                patches.append(_patch(old, new))
        msg: dict[str, object] = {}
        new_self = _self_node(state, node, netmap, self.presence, self.settings)
        if new_self != self.self_node:
            self.self_node = new_self
            msg["node"] = new_self
        self._filter_changes(netmap.packet_filter, msg)
        self._ssh_changes(netmap.ssh_policy, msg)
        new_profiles = [
            p
            for p in _profiles(state, [node, *(state.nodes[i] for i in visible)])
            if self.profiles.get(p.id) != p
        ]
        for p in new_profiles:
            self.profiles[p.id] = p
        if self.settings.derp_map != self.derp_map:
            self.derp_map = self.settings.derp_map
            msg["derp_map"] = self.settings.derp_map
        return _message(now, msg, sorted(changed, key=lambda n: n.id), removed, patches, new_profiles)

    def _filter_changes(self, rules: tuple[FilterRule, ...], msg: dict[str, object]) -> None:
        """Put the packet filter in ``msg`` when it differs from what was sent."""
        pf = msgspec.Raw(_encoder.encode(rules))
        if bytes(pf) != self.packet_filter:
            self.packet_filter = bytes(pf)
            msg["packet_filters"] = {"base": pf}

    def _ssh_changes(self, policy: SSHPolicy | None, msg: dict[str, object]) -> None:
        """Put the SSH policy in ``msg`` when it differs from what was sent."""
        ssh = msgspec.Raw(_encoder.encode(policy)) if policy is not None else None
        ssh_bytes = bytes(ssh) if ssh is not None else None
        if ssh_bytes != self.ssh_policy:
            self.ssh_policy = ssh_bytes
            msg["ssh_policy"] = ssh if ssh is not None else _NO_SSH

    def _incremental_ok(self, state: TailnetState, delta: Delta, presence_changed: set[int]) -> bool:
        if delta.policy or delta.users_changed or delta.users_removed or self.self_node is None:
            return False
        me = self.node_id
        if me in delta.nodes_changed:
            return False
        for nid in delta.nodes_changed | delta.nodes_removed:
            n = state.nodes.get(nid)
            if n is not None and (n.advertised_routes or n.approved_routes):
                return False  # a route can move a primary: other peers' views change
            sent = self.peers.get(nid)
            if sent is not None and sent.primary_routes:
                return False
        return True

    def _update_incremental(
        self, state: TailnetState, node: Node, now: datetime, delta: Delta, presence_changed: set[int]
    ) -> MapResponse | None:
        compiled = self.policy.compiled(state)
        changed: list[WireNode] = []
        patches: list[PeerChange] = []
        removed: list[int] = []
        new_users: list[Node] = []
        for nid in sorted(delta.nodes_changed | delta.nodes_removed | presence_changed):
            if nid == self.node_id:
                continue
            peer = state.nodes.get(nid)
            view = compiled.peer_view(self.node_id, nid) if peer is not None else None
            old = self.peers.get(nid)
            if peer is None or view is None or peer.is_expired(now):
                if old is not None:
                    del self.peers[nid]
                    removed.append(nid)
                continue
            new = self.settings.peers.get(
                peer, self.presence(nid), self.settings, view.allowed_ips, view.primary_routes, view.cap_map
            )
            if old is new or old == new:
                continue
            self.peers[nid] = new
            if old is None or _structural(old) != _structural(new):
                changed.append(new)
                if _user_id(peer) not in self.profiles:
                    new_users.append(peer)
            else:
                patches.append(_patch(old, new))
        msg: dict[str, object] = {}
        if self.node_id in presence_changed:
            allowed, primary, caps = compiled.self_view(self.node_id)
            new_self = wire_node(
                node, self.presence(node.id), self.settings, allowed_ips=allowed,
                primary_routes=primary, cap_map=caps, is_self=True,
            )
            if new_self != self.self_node:
                self.self_node = new_self
                msg["node"] = new_self
        if self.settings.derp_map != self.derp_map:
            self.derp_map = self.settings.derp_map
            msg["derp_map"] = self.settings.derp_map
        self._filter_changes(compiled.packet_filter(self.node_id), msg)
        if delta.nodes_changed or delta.nodes_removed:
            self._ssh_changes(compiled.ssh_policy(self.node_id), msg)
        profiles = _profiles(state, new_users)
        for p in profiles:
            self.profiles[p.id] = p
        return _message(now, msg, changed, removed, patches, profiles)



def _message(
    now: datetime,
    msg: dict[str, object],
    changed: list[WireNode],
    removed: list[int],
    patches: list[PeerChange],
    profiles: list[UserProfile],
) -> MapResponse | None:
    """Assemble an update from its parts; ``None`` when it would say nothing."""
    if changed:
        msg["peers_changed"] = changed
    if removed:
        msg["peers_removed"] = removed
    if patches:
        msg["peers_changed_patch"] = patches
    if profiles:
        msg["user_profiles"] = profiles
    if not msg:
        return None
    return MapResponse(control_time=now, **msg)  # type: ignore[arg-type]




def _structural(node: WireNode) -> WireNode:
    return msgspec.structs.replace(
        node, endpoints=None, home_derp=0, disco_key=None, online=None, last_seen=None, cap=0
    )


def _patch(old: WireNode, new: WireNode) -> PeerChange:
    return PeerChange(
        node_id=new.id,
        derp_region=new.home_derp if new.home_derp != old.home_derp else 0,
        endpoints=new.endpoints if new.endpoints != old.endpoints else None,
        disco_key=new.disco_key if new.disco_key != old.disco_key else None,
        online=new.online if new.online != old.online else None,
        last_seen=new.last_seen if new.last_seen != old.last_seen else None,
        cap=new.cap if new.cap != old.cap else 0,
    )


def full_map(
    state: TailnetState,
    node_id: int,
    *,
    policy: PolicyView,
    settings: NetmapSettings,
    presence: PresenceOf,
    now: datetime,
) -> MapResponse:
    """The full netmap of ``node_id`` (convenience over :class:`StreamView`)."""
    return StreamView(node_id, policy, settings, presence).full_map(state, now)
