"""A client-side model of netmap state: apply MapResponses the way tailscale's
``controlclient`` does (sticky fields, Peers vs PeersChanged/Removed/Patch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from projections.tailcfg import MapResponse, Node, PeerChange


@dataclass
class ClientNetmap:
    node: Node | None = None
    peers: dict[int, Node] = field(default_factory=dict)
    packet_filter: bytes = b""
    ssh_policy: bytes | None = None
    profiles: dict[int, object] = field(default_factory=dict)

    def apply(self, msg: MapResponse) -> None:
        if msg.node is not None:
            self.node = msg.node
        if msg.peers:
            # A non-empty Peers replaces everything and the delta fields are ignored.
            self.peers = {p.id: p for p in msg.peers}
        else:
            for p in msg.peers_changed or ():
                self.peers[p.id] = p
            for nid in msg.peers_removed or ():
                self.peers.pop(nid, None)
            for patch in msg.peers_changed_patch or ():
                if patch.node_id in self.peers:
                    self.peers[patch.node_id] = _patched(self.peers[patch.node_id], patch)
        if msg.packet_filters is not None:
            self.packet_filter = bytes(msg.packet_filters["base"])
        if msg.ssh_policy is not None:
            self.ssh_policy = bytes(msg.ssh_policy)
        for prof in msg.user_profiles or ():
            self.profiles[prof.id] = prof

    def comparable(self) -> dict[str, object]:
        ssh = msgspec.json.decode(self.ssh_policy) if self.ssh_policy else {"rules": []}
        return {
            "node": msgspec.to_builtins(self.node),
            "peers": {nid: msgspec.to_builtins(p) for nid, p in sorted(self.peers.items())},
            "packet_filter": msgspec.json.decode(self.packet_filter) if self.packet_filter else None,
            "ssh_policy": ssh if ssh.get("rules") else {"rules": []},
        }


def _patched(node: Node, patch: PeerChange) -> Node:
    changes: dict[str, object] = {}
    if patch.derp_region:
        changes["home_derp"] = patch.derp_region
    if patch.endpoints is not None:
        changes["endpoints"] = patch.endpoints
    if patch.disco_key is not None:
        changes["disco_key"] = patch.disco_key
    if patch.online is not None:
        changes["online"] = patch.online
    if patch.last_seen is not None:
        changes["last_seen"] = patch.last_seen
    if patch.cap:
        changes["cap"] = patch.cap
    if patch.key is not None:
        changes["key"] = patch.key
    if patch.key_expiry is not None:
        changes["key_expiry"] = patch.key_expiry
    return msgspec.structs.replace(node, **changes)
