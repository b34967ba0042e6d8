"""Node capabilities: the self CapMap, peer CapMaps and WhoIs capabilities.

Role in the pipeline: per-node stage.

* :func:`self_cap_map` -- ``SelfNode.CapMap``: the baseline every node gets
  (Taildrop file sharing, Tailscale SSH, optionally the tailnet's
  auto-update default) plus the ``nodeAttrs`` that target the node and
  ``randomize-client-port`` when the policy sets ``randomizeClientPort``.
  Attribute values are null (tailcfg.RawMessage absent).
* :func:`peer_cap_map` -- the few caps a client reads from the *peer*
  view: ``suggest-exit-node`` on approved exit nodes.
* :func:`whois_cap_map` -- what a peer's address holds toward this node:
  the union of CapGrant cap maps of the node's packet filter whose sources
  contain the peer address and whose destinations contain this node's
  address of the same family (the client's ``PeerCaps(src, dst)``).

Hosted-only tailnet state (admin/owner roles, tailnet lock, display name,
magicsock tuning) is not modelled.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from .ipset import format_addr, is_v4
from .resolve import Resolver
from .rules import Rule
from .tailnet import NodeInfo, Tailnet

__all__ = [
    "CAP_FILE_SHARING",
    "CAP_SSH",
    "node_attr_caps",
    "peer_cap_map",
    "self_cap_map",
    "whois_cap_map",
]

CAP_FILE_SHARING = "https://tailscale.com/cap/file-sharing"
CAP_SSH = "https://tailscale.com/cap/ssh"
ATTR_RANDOMIZE_CLIENT_PORT = "randomize-client-port"
ATTR_SUGGEST_EXIT_NODE = "suggest-exit-node"
ATTR_DISABLE_IPV4 = "disable-ipv4"
ATTR_DEFAULT_AUTO_UPDATE = "default-auto-update"

#: A capability value: None (JSON null) or an encoded JSON array.
CapValue = msgspec.Raw | None


def node_attr_caps(
    resolver: Resolver, only: Iterable[NodeInfo] | None = None
) -> dict[int, tuple[str, ...]]:
    """Node id -> the ``nodeAttrs`` attributes that apply, in policy order.

    Args:
        resolver: the policy and tailnet.
        only: restrict to these nodes (a node's attributes depend only on
            the node itself, so a joining node needs just its own entry).
    """
    policy = resolver.policy
    nodes = list(only) if only is not None else list(resolver.tailnet.iter_nodes())
    out: dict[int, dict[str, None]] = {}
    if policy.randomize_client_port:
        for info in nodes:
            out.setdefault(info.id, {})[ATTR_RANDOMIZE_CLIENT_PORT] = None
    for entry in policy.node_attrs:
        if not entry.attrs:
            continue
        targets = resolver.union(entry.target)
        for info in nodes:
            if targets.contains_any(info.addrs):
                bucket = out.setdefault(info.id, {})
                for attr in entry.attrs:
                    bucket.setdefault(attr, None)
    return {k: tuple(v) for k, v in out.items()}


def self_cap_map(tailnet: Tailnet, attrs: Iterable[str]) -> dict[str, CapValue]:
    """The CapMap of the node itself."""
    settings = tailnet.settings
    out: dict[str, CapValue] = {}
    if settings.file_sharing:
        out[CAP_FILE_SHARING] = None
    if settings.ssh:
        out[CAP_SSH] = None
    if settings.auto_update_default is not None:
        value = b"[true]" if settings.auto_update_default else b"[false]"
        out[ATTR_DEFAULT_AUTO_UPDATE] = msgspec.Raw(value)
    for attr in attrs:
        out.setdefault(attr, None)
    return out


def peer_cap_map(
    tailnet: Tailnet, peer: NodeInfo, peer_attrs: Iterable[str]
) -> dict[str, CapValue]:
    """The CapMap a viewer sees on ``peer`` (usually empty).

    An approved exit node is marked ``suggest-exit-node`` (a candidate for
    the client's exit-node suggestion) when the tailnet suggests exit nodes
    or a ``nodeAttrs`` entry gives it the attribute.
    """
    if peer.is_exit and (
        tailnet.settings.suggest_exit_nodes or ATTR_SUGGEST_EXIT_NODE in peer_attrs
    ):
        return {ATTR_SUGGEST_EXIT_NODE: None}
    return {}


def whois_cap_map(
    node: NodeInfo, peers: Iterable[NodeInfo], reduced_rules: Iterable[Rule]
) -> dict[str, dict[str, list[msgspec.Raw] | None]]:
    """Per peer address, the app capabilities it holds toward ``node``.

    Args:
        node: the node answering WhoIs.
        peers: its visible peers.
        reduced_rules: the node's packet filter (internal form).

    Returns:
        ``{peer_ip: {cap: [values...]}}``, omitting addresses with no caps.
        Values of a cap granted by several rules are concatenated in rule
        order, as the client's filter does.
    """
    cap_rules = [r for r in reduced_rules if r.caps]
    out: dict[str, dict[str, list[msgspec.Raw] | None]] = {}
    if not cap_rules:
        return out
    own = {is_v4(addr): addr for addr in node.addrs}
    for peer in peers:
        for addr in peer.addrs:
            dst = own.get(is_v4(addr))
            if dst is None:
                continue
            caps = _caps_between(cap_rules, addr, dst)
            if caps:
                out[format_addr(addr)] = caps
    return out


def _caps_between(rules: Iterable[Rule], src: int, dst: int) -> dict[str, list[msgspec.Raw] | None]:
    """Caps ``src`` holds toward ``dst``; a cap granted without values is null."""
    caps: dict[str, list[msgspec.Raw] | None] = {}
    for rule in rules:
        if not rule.src_set.contains(src):
            continue
        for cap in rule.caps:
            if not any(p.contains(dst) for p in cap.dsts):
                continue
            for name, raw in cap.cap_map:
                if raw is None:
                    caps.setdefault(name, None)
                    continue
                values = caps.get(name) or []
                values.extend(msgspec.json.decode(raw, type=list[msgspec.Raw]))
                caps[name] = values
    return caps
