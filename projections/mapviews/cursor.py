"""The stream cursor: what one map stream has sent, and what it must send next (pure).

A :class:`StreamCursor` is all a stream keeps between updates: the peer set it last
sent (:mod:`.peersets`), digests of the self node and packet filter it last sent,
the SSH policy's JSON (shared per SSH key by the hub's :class:`~.hub.SSHCache`) and
the hub sequence number it has seen. It holds no peer of its own: n streams of one
class cost n cursors and one peer set.

**Messages.** Both are values; the transport (``protocol.mapwire``) makes the bytes.
:meth:`StreamCursor.full_map` makes the first message (and the baseline), a
:class:`FullMap` whose peers are the class's peer set; :meth:`StreamCursor.update`
brings the client from what it was sent to the hub's state in zero, one or two
:class:`~.peersets.MapMessage` objects:

1. the peer diff from the version it was on to its class's current one. Streams
   moving between the same two versions share one message (kept by the older
   version), unless the stream's own node is in the diff: then it gets its own copy
   without itself;
2. this node's own parts, each only if the hub says a change may have touched it
   (:meth:`~.hub.MapHub.self_dirty_since`, :meth:`~.hub.MapHub.filter_dirty_since`)
   and its digest differs from the one sent: the self node, the packet filter, the
   SSH policy, the DERP map, the DNS configuration. Streams whose parts are equal
   (told apart by their digests) share one object per hub version
   (:meth:`~.hub.MapHub.shared`).

**Expired keys.** A node whose key is out of use (expired or logged out) is sent only
its own node, marked expired: the transition is one message that removes every peer
and clears the filter, SSH policy and DNS configuration; if the key comes back into
use (re-keyed), one message sends the whole netmap again.

Nothing here reads a clock or does I/O: time and state are arguments.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import msgspec

from ..netmap import DENY_ALL, expired_map, expired_self, profiles_for, wire_node
from ..state import Node
from ..tailcfg import Debug, DNSConfig, MapResponse
from ..tailcfg import Node as WireNode
from .hub import MapHub
from .peersets import MapMessage, PeerSet, update_response

__all__ = ["FullMap", "StreamCursor"]

_encoder: Final = msgspec.json.Encoder()
_NO_SSH: Final = b'{"rules":[]}'


def _digest(data: bytes) -> bytes:
    """What a stream remembers of a part it sent: enough to tell a change (SHA-1 is
    the fastest hashlib digest here, with hardware support; not a security use)."""
    return hashlib.sha1(data, usedforsecurity=False).digest()


@dataclass(frozen=True, slots=True)
class FullMap:
    """A stream's first message as values: everything but the peers in ``body``, and
    the peers as its class's peer set less the stream's own node (``exclude``).

    The transport encodes ``body`` and splices the peers' JSON in as a ``Peers`` array
    (``protocol.mapwire``), sharing what it can between the streams of a class;
    :meth:`response` is the same map as one struct.
    """

    body: MapResponse
    #: None for a node whose key is out of use: ``body`` is then the whole map.
    peers: PeerSet | None
    exclude: int

    def peer_ids(self) -> list[int]:
        """The ids of the peers shown, in the order they are sent."""
        if self.peers is None:
            return []
        return [i for i in sorted(self.peers.peers) if i != self.exclude]

    def response(self) -> MapResponse:
        """The whole map as one ``MapResponse`` (what the transport's bytes decode to)."""
        ids = self.peer_ids()
        if not ids:
            return self.body
        assert self.peers is not None
        return msgspec.structs.replace(self.body, peers=[self.peers.peers[i].wire for i in ids])


class StreamCursor:
    """What one map stream has been sent: a peer set and a few digests.

    :meth:`full_map` makes the first message; :meth:`update` the next ones (zero, one
    or two messages: the peer diff shared with the class, then this node's own parts).

    A node whose key is out of use (expired or logged out) is sent only its own node,
    marked expired: when that happens on an open stream, one message removes every
    peer and clears the filter, SSH policy and DNS configuration (``expired`` is then
    set and ``peers`` is ``None``); if the key comes back into use (re-keyed), one
    message sends the whole netmap again.
    """

    __slots__ = ("derp_map", "dns", "expired", "filter", "node_id", "peers", "self_node", "seq", "ssh")

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.seq = 0
        self.peers: PeerSet | None = None
        self.expired = False
        self.self_node = b""
        self.filter = b""
        self.ssh = b""
        self.derp_map: object = None
        self.dns: object = None  # the DNS configuration last sent (by identity)

    def full_map(self, hub: MapHub, control_time: datetime | None = None) -> FullMap:
        """The complete first message (and the new baseline).

        ``control_time``: the server's clock now, sent as ``ControlTime`` (clients
        correct peer key expiry by it) when the hub was last advanced earlier (it is
        not advanced for presence alone between publications); default the hub's time.
        """
        state, now, compiled = hub.state, hub.now, hub.compiled
        assert state is not None and now is not None and compiled is not None
        clock = now if control_time is None else max(now, control_time)
        me = self.node_id
        node = state.nodes[me]
        if node.is_expired(now):
            msg = expired_map(state, node, hub.presence(me), hub.settings, clock)
            self._now_expired(hub, msg.node)
            return FullMap(msg, None, me)
        self.expired = False
        peers = hub.peer_set(me)
        self_wire = self._self_wire(hub, node)
        pf = compiled.packet_filter_json(me)
        ssh = hub.ssh_json(me)
        self.peers, self.seq, self.derp_map = peers, hub.seq, hub.settings.derp_map
        self.dns = hub.settings.dns
        self.self_node = _digest(_encoder.encode(self_wire))
        self.filter = _digest(pf)
        self.ssh = ssh or _NO_SSH
        own = profiles_for(state, [node])
        profiles = dict(peers.users)
        for p in own:
            profiles[p.id] = p
        body = MapResponse(
            node=self_wire,
            derp_map=hub.settings.derp_map,
            dns_config=hub.settings.dns,
            domain=hub.settings.domain,
            packet_filters={"base": msgspec.Raw(pf)},
            ssh_policy=msgspec.Raw(ssh) if ssh is not None else None,
            user_profiles=[profiles[k] for k in sorted(profiles)],
            collect_services=False,
            control_time=clock,
            debug=Debug(disable_log_tail=True),
        )
        return FullMap(body, peers, me)

    def _self_wire(self, hub: MapHub, node: Node) -> WireNode:
        assert hub.compiled is not None
        allowed, primary, caps = hub.compiled.self_view(self.node_id)
        return wire_node(
            node, hub.presence(node.id), hub.settings, allowed_ips=allowed, primary_routes=primary,
            cap_map=caps, is_self=True,
        )

    def _now_expired(self, hub: MapHub, self_wire: WireNode | None) -> None:
        """Remember that the client was sent the expired map (or its transition)."""
        self.expired, self.peers, self.seq, self.derp_map = True, None, hub.seq, hub.settings.derp_map
        self.self_node = _digest(_encoder.encode(self_wire))
        self.filter = _digest(bytes(DENY_ALL))
        self.ssh = _NO_SSH

    def _expired_update(self, hub: MapHub, node: Node) -> list[MapMessage]:
        """The update of a stream whose node's key is out of use: at the transition,
        every peer removed and the filter, SSH policy and DNS configuration cleared;
        afterwards only its own node and the DERP map."""
        now = hub.now
        assert now is not None
        self_wire = expired_self(node, hub.presence(node.id), hub.settings)
        parts: dict[str, object] = {}
        digest = _digest(_encoder.encode(self_wire))
        if digest != self.self_node:
            parts["node"] = self_wire
        if not self.expired:
            assert self.peers is not None
            gone = sorted(nid for nid in self.peers.peers if nid != self.node_id)
            if gone:
                parts["peers_removed"] = gone
            if self.filter != _digest(bytes(DENY_ALL)):
                parts["packet_filters"] = {"base": DENY_ALL}
            if self.ssh != _NO_SSH:
                parts["ssh_policy"] = msgspec.Raw(_NO_SSH)
            if hub.settings.dns is not None:
                parts["dns_config"] = DNSConfig()
        if hub.settings.derp_map is not self.derp_map:
            parts["derp_map"] = hub.settings.derp_map
        self._now_expired(hub, self_wire)
        return [MapMessage(MapResponse(control_time=now, **parts))] if parts else []  # type: ignore[arg-type]

    def _restored(self, hub: MapHub, node: Node) -> list[MapMessage]:
        """The update of a stream whose node's key is back in use: the whole netmap
        (every peer as changed, since the client holds none)."""
        state, now, compiled = hub.state, hub.now, hub.compiled
        assert state is not None and now is not None and compiled is not None
        me = self.node_id
        peers = hub.peer_set(me)
        self_wire = self._self_wire(hub, node)
        pf = compiled.packet_filter_json(me)
        ssh = hub.ssh_json(me) or _NO_SSH
        changed = [peers.peers[i].wire for i in sorted(peers.peers) if i != me]
        profiles = dict(peers.users)
        for p in profiles_for(state, [node]):
            profiles[p.id] = p
        parts: dict[str, object] = {
            "node": self_wire,
            "packet_filters": {"base": msgspec.Raw(pf)},
            "ssh_policy": msgspec.Raw(ssh),
            "user_profiles": [profiles[k] for k in sorted(profiles)],
        }
        if changed:
            parts["peers_changed"] = changed
        if hub.settings.dns is not None:
            parts["dns_config"] = hub.settings.dns
        if hub.settings.derp_map is not self.derp_map:
            parts["derp_map"] = hub.settings.derp_map
        self.expired, self.peers, self.seq, self.derp_map = False, peers, hub.seq, hub.settings.derp_map
        self.dns = hub.settings.dns
        self.self_node = _digest(_encoder.encode(self_wire))
        self.filter = _digest(pf)
        self.ssh = ssh
        return [MapMessage(MapResponse(control_time=now, **parts))]  # type: ignore[arg-type]

    def update(self, hub: MapHub) -> list[MapMessage]:
        """Messages that bring the client from what it was sent to the hub's state."""
        state, now, compiled = hub.state, hub.now, hub.compiled
        assert state is not None and now is not None and compiled is not None
        me = self.node_id
        out: list[MapMessage] = []
        node = state.nodes.get(me)
        if node is None or hub.seq == self.seq:
            return out
        if node.is_expired(now):
            return self._expired_update(hub, node)
        if self.expired:
            return self._restored(hub, node)
        assert self.peers is not None
        peers = hub.peer_set(me)
        if peers is not self.peers:
            diff, shared = peers.diff_message(self.peers, now)
            if me in diff.ids:
                own = diff.without(me)
                if not own.is_empty():
                    out.append(MapMessage(update_response(now, {}, own)))
            elif shared is not None:
                out.append(shared)
            self.peers = peers
        # The node's own parts, and tokens that tell each apart (equal tokens, equal
        # part): streams whose parts are equal share one message.
        parts: dict[str, object] = {}
        tokens: list[tuple[str, object]] = []
        if hub.self_dirty_since(me, self.seq):
            self_wire = self._self_wire(hub, node)
            digest = _digest(_encoder.encode(self_wire))
            if digest != self.self_node:
                self.self_node = digest
                parts["node"] = self_wire
                tokens.append(("node", digest))
        if hub.filter_dirty_since(me, self.seq):
            hub.stats.filter_evaluations += 1
            pf = compiled.packet_filter_json(me)
            digest = _digest(pf)
            if digest != self.filter:
                self.filter = digest
                parts["packet_filters"] = {"base": msgspec.Raw(pf)}
                tokens.append(("packet_filters", digest))
        ssh = hub.ssh_json(me) or _NO_SSH
        if ssh is not self.ssh:
            # One object per SSH key: a different object is usually different bytes.
            if ssh != self.ssh:
                parts["ssh_policy"] = msgspec.Raw(ssh)
                tokens.append(("ssh_policy", ssh))
            self.ssh = ssh
        if hub.settings.derp_map is not self.derp_map:
            self.derp_map = hub.settings.derp_map
            parts["derp_map"] = hub.settings.derp_map
            tokens.append(("derp_map", True))  # the hub's, fixed within a version
        if hub.settings.dns is not self.dns:
            # A DNS change made through the API (dns.set): every stream gets it.
            self.dns = hub.settings.dns
            parts["dns_config"] = hub.settings.dns if hub.settings.dns is not None else DNSConfig()
            tokens.append(("dns_config", True))
        if parts:
            out.append(hub.shared(tuple(tokens), functools.partial(update_response, now, parts, None)))
        self.seq = hub.seq
        return out
