"""Who may reach whom under a compiled policy, and which policy rule says so.

Theory of operation
-------------------
Tailscale enforces a policy at the *destination*: a packet from SRC to DST is accepted
when DST's packet filter has a rule whose ``SrcIPs`` hold SRC's address, whose
``IPProto`` includes the protocol and one of whose ``DstPorts`` covers DST's address
and the port; the same rule makes the two peers of each other. A node whose key has
expired drops out of every peer's map, so it neither reaches nor is reached.

:func:`explain` answers that question for one pair with the policy engine's own
compiled rules (:class:`~projections.policy.CompiledPolicy`) and, instead of the merged
and reduced filter the client receives, walks them *grant by grant* (ACL entries are
grants with a path ``acls[i]``), so the answer names the first rule that allows the
traffic: its index and its text as written in the policy. A destination may be a node
or an address: an address in a subnet route is reached through the route's primary
router (its filter decides), a public address through an approved exit node.

The answer for one pair depends only on the policy, the users (groups, logins), the two
nodes (user, tags, addresses, expiry) and, for an address destination, the routers.
:func:`pair_policy` therefore compiles the policy against that small tailnet, which
makes following one pair through a long history cheap (see
:mod:`projections.replay.timeline`); the tests hold it equal to the full compile.

:func:`reach_pairs` lists every (src, dst, protocol:ports) allowed in a tailnet, from
each destination's reduced filter: the input of ``replay diff`` and ``policy impact``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from ..policy import CompiledPolicy, PolicySyntaxError, Tailnet, compile_policy, parse_stored_policy
from ..policy.compile import CompiledGrant, GrantKind, self_rules, via_rules
from ..policy.document import Policy
from ..policy.hujson import load_hujson, load_legacy_hujson
from ..policy.ipset import Prefix, addr_to_int, prefix_str
from ..policy.rules import Rule
from ..policy.tailnet import INTERNET, NodeInfo
from ..policystate import (
    ALLOW_ALL_POLICY,
    PolicyCompiler,
    policy_node,
    policy_user,
    recorded_primaries,
)
from ..state import Node, TailnetState
from .history import ReplayError

__all__ = [
    "Hit",
    "Target",
    "explain",
    "explain_subnet_source",
    "find_node",
    "pair_policy",
    "parse_proto",
    "reach_pairs",
    "rule_text",
    "target_for",
]

PROTOCOLS: Final = {"tcp": (6,), "udp": (17,), "icmp": (1, 58)}
#: What a rule without ``IPProto`` allows (Tailscale's default).
DEFAULT_PROTOCOLS: Final = (6, 17, 1, 58)
_PORTED: Final = frozenset((6, 17, 132))
_NAMES: Final = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp"}


def parse_proto(text: str | None, port: int | None) -> tuple[int, ...]:
    """``--proto``: a name; without one, TCP and UDP when a port is given, else any."""
    if text is None:
        return (6, 17) if port is not None else DEFAULT_PROTOCOLS
    try:
        return PROTOCOLS[text.lower()]
    except KeyError:
        raise ReplayError(f"unknown protocol {text!r} (tcp, udp or icmp)") from None


@dataclass(frozen=True, slots=True)
class Target:
    """A destination: a node, or an address that belongs to no node."""

    node_id: int | None = None
    addr: str | None = None

    def label(self, state: TailnetState) -> str:
        if self.node_id is not None:
            node = state.nodes.get(self.node_id)
            return node.given_name if node is not None else f"node {self.node_id}"
        return str(self.addr)


def find_node(state: TailnetState, ref: str) -> Node | None:
    """A node by id, given name or address (``None`` when none matches)."""
    ref = ref.strip()
    if ref.isascii() and ref.isdigit() and int(ref) in state.nodes:
        return state.nodes[int(ref)]
    node = state.node_named(ref)
    if node is not None:
        return node
    try:
        ip = str(ipaddress.ip_address(ref))
    except ValueError:
        return None
    nid = state.node_by_ip.get(ip)
    return None if nid is None else state.nodes.get(nid)


def target_for(state: TailnetState, ref: str) -> Target:
    """A destination reference: a node (id, name, IP) or any other IP address."""
    node = find_node(state, ref)
    if node is not None:
        return Target(node_id=node.id)
    try:
        return Target(addr=str(ipaddress.ip_address(ref.strip())))
    except ValueError:
        raise ReplayError(f"no node {ref!r} (by id, name or IP) and not an IP address") from None


# -- rule labels -----------------------------------------------------------------------

_entries_cache: dict[str, dict[str, list[object]]] = {}


def rule_text(policy_text: str | None, path: tuple[str | int, ...]) -> str:
    """``acls[0]: {...}`` -- the rule's index in the policy and its text (compact JSON)."""
    if not path:
        return "default: allow-all (no policy set)"
    section, index = str(path[0]), int(path[1])
    text = policy_text or ALLOW_ALL_POLICY
    entries = _entries_cache.get(text)
    if entries is None:
        try:
            value, _ = load_hujson(text)
        except PolicySyntaxError:  # stored before the reader became strict HuJSON
            value = load_legacy_hujson(text)
        entries = {}
        if isinstance(value, dict):
            for key in ("acls", "grants"):
                items = value.get(key)
                if isinstance(items, list):
                    entries[key] = items
        if len(_entries_cache) > 64:
            _entries_cache.clear()
        _entries_cache[text] = entries
    items = entries.get(section, [])
    body = json.dumps(items[index], separators=(",", ":")) if index < len(items) else "?"
    label = f"{section}[{index}]"
    if policy_text is None:
        label = "default allow-all " + label
    return f"{label}: {body}"


# -- one pair --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    """Why SRC reaches DST: the rule (its path in the policy) and the path taken."""

    path: tuple[str | int, ...]
    via: str | None = None  # "subnet route 10.0.0.0/24 of router", "exit node exit-1"

    def rule(self, policy_text: str | None) -> str:
        return rule_text(policy_text, self.path[:2])


def _grant_rules(compiled: CompiledPolicy, grant: CompiledGrant, dst: NodeInfo) -> Iterator[Rule]:
    """The rules a grant puts in ``dst``'s filter (unreduced)."""
    if grant.kind is not GrantKind.VIA:
        yield from grant.rules
    if grant.kind is GrantKind.SELF:
        yield from self_rules(grant, dst, compiled.tailnet)
    elif grant.kind is GrantKind.VIA:
        yield from via_rules(grant, dst)


def _allows(rule: Rule, src: NodeInfo | Prefix, dst_addrs: Iterable[int], port: int | None,
            protocols: tuple[int, ...]) -> bool:
    """Whether ``rule`` lets ``src`` (a node, or the hosts of a subnet) reach one of
    ``dst_addrs`` on ``port`` with one of ``protocols``."""
    if rule.caps:
        return False
    if isinstance(src, Prefix):
        if not rule.src_set.overlaps_prefix(src):
            return False
    elif not rule.src_set.contains_any(src.addrs):
        return False
    common = set(rule.protocols or DEFAULT_PROTOCOLS) & set(protocols)
    if not common:
        return False
    # Ports mean nothing to ICMP: a port only narrows TCP, UDP and SCTP.
    wanted = port if bool(common & _PORTED) else None
    addrs = tuple(dst_addrs)
    for entry in rule.dst:
        if not entry.addresses.contains_any(addrs):
            continue
        if wanted is None or entry.first <= wanted <= entry.last:
            return True
    return False


def _first_hit(compiled: CompiledPolicy, src: NodeInfo | Prefix, filter_node: NodeInfo,
               dst_addrs: tuple[int, ...], port: int | None, protocols: tuple[int, ...]) -> tuple[str | int, ...] | None:
    for grant in compiled.grants:
        for rule in _grant_rules(compiled, grant, filter_node):
            if _allows(rule, src, dst_addrs, port, protocols):
                return grant.grant.path
    return None


def explain(
    compiled: CompiledPolicy,
    state: TailnetState,
    src_id: int,
    target: Target,
    *,
    port: int | None,
    protocols: tuple[int, ...],
    now: datetime,
) -> Hit | None:
    """The first rule that lets ``src_id`` reach ``target`` at ``now``, or ``None``."""
    src_node = state.nodes.get(src_id)
    if src_node is None or src_node.is_expired(now) or src_id not in compiled.tailnet.nodes:
        return None
    src = compiled.tailnet.nodes[src_id]
    if target.node_id is not None:
        dst_node = state.nodes.get(target.node_id)
        if dst_node is None or target.node_id == src_id or dst_node.is_expired(now):
            return None
        if target.node_id not in compiled.tailnet.nodes:
            return None
        dst = compiled.tailnet.nodes[target.node_id]
        path = _first_hit(compiled, src, dst, dst.addrs, port, protocols)
        return None if path is None else Hit(path)
    assert target.addr is not None
    addr = addr_to_int(target.addr)
    best: tuple[int, int] | None = None  # (prefix bits, router id)
    for prefix, router_id in compiled.primaries.items():
        if prefix.contains(addr) and (best is None or prefix.bits > best[0]):
            best = (prefix.bits, router_id)
    routers: list[tuple[NodeInfo, str]] = []
    if best is not None:
        router = compiled.tailnet.nodes[best[1]]
        served = next(p for p, r in compiled.primaries.items() if r == router.id and p.contains(addr) and p.bits == best[0])
        routers.append((router, f"subnet route {served} of {router.node.name}"))
    elif INTERNET.contains(addr):
        routers.extend(
            (r, f"exit node {r.node.name}") for r in compiled.tailnet.routers() if r.is_exit
        )
    for router, via in routers:
        node = state.nodes.get(router.id)
        if router.id == src_id or node is None or node.is_expired(now):
            continue
        path = _first_hit(compiled, src, router, (addr,), port, protocols)
        if path is not None:
            return Hit(path, via)
    return None


def explain_subnet_source(
    compiled: CompiledPolicy,
    state: TailnetState,
    router_id: int,
    target: Target,
    *,
    port: int | None,
    protocols: tuple[int, ...],
    now: datetime,
) -> Hit | None:
    """Whether hosts of a subnet the router is primary for may reach a node ``target``.

    Their packets enter the tailnet at the router; the destination's filter sees their
    own addresses only when the router does not masquerade them (``tailscale up
    --snat-subnet-routes=false``; with the default SNAT they arrive as the router, which
    is then a source in its own right).
    """
    router_node = state.nodes.get(router_id)
    if target.node_id is None or router_node is None or router_node.is_expired(now):
        return None
    dst_node = state.nodes.get(target.node_id)
    if dst_node is None or dst_node.is_expired(now) or target.node_id == router_id:
        return None
    dst = compiled.tailnet.nodes.get(target.node_id)
    if dst is None:
        return None
    for prefix in compiled.primaries_by_node.get(router_id, ()):
        path = _first_hit(compiled, prefix, dst, dst.addrs, port, protocols)
        if path is not None:
            via = f"hosts in {prefix_str(prefix)} behind {router_node.given_name} (subnet route, without SNAT)"
            return Hit(path, via)
    return None


_policy_cache: dict[str, Policy] = {}


def _policy(text: str | None) -> Policy:
    key = text or ALLOW_ALL_POLICY
    policy = _policy_cache.get(key)
    if policy is None:
        if len(_policy_cache) > 16:
            _policy_cache.clear()
        policy = _policy_cache[key] = parse_stored_policy(key)
    return policy


def pair_policy(state: TailnetState, node_ids: Iterable[int], *, routers: bool) -> CompiledPolicy:
    """The policy of ``state`` compiled against only the given nodes (and, with
    ``routers``, every node serving routes): enough to decide their pairs."""
    keep = set(node_ids)
    nodes = [
        n for n in state.nodes.values()
        if n.id in keep or (routers and n.approved_routes and n.advertised_routes)
    ]
    tailnet = Tailnet([policy_user(u) for u in state.users.values()], [policy_node(n) for n in nodes])
    return compile_policy(
        _policy(state.policy_text), tailnet, previous_primaries=recorded_primaries(state), auto_approve=False
    )


# -- every pair ------------------------------------------------------------------------


def _proto_label(protocols: tuple[int, ...]) -> str:
    if not protocols:
        return "any"
    return "+".join(_NAMES.get(p, str(p)) for p in protocols)


def _port_label(first: int, last: int) -> str:
    if first == 0 and last == 65535:
        return "*"
    return str(first) if first == last else f"{first}-{last}"


def reach_pairs(
    state: TailnetState, now: datetime, compiler: PolicyCompiler | None = None
) -> dict[tuple[int, int], frozenset[str]]:
    """Every ``(src, dst) -> {"tcp:22", "any:*", …}`` the policy allows at ``now``.

    Built from each destination's reduced filter, as its client enforces it; expired
    nodes are left out on both sides.
    """
    compiled = (compiler or PolicyCompiler()).compiled(state)
    live = {nid for nid, n in state.nodes.items() if not n.is_expired(now)}
    out: dict[tuple[int, int], set[str]] = {}
    for dst_id in sorted(live):
        dst = compiled.tailnet.nodes.get(dst_id)
        if dst is None:
            continue
        for rule in compiled.filter_rules(dst_id):
            if rule.caps:
                continue
            labels = {
                f"{_proto_label(rule.protocols)}:{_port_label(e.first, e.last)}"
                for e in rule.dst
                if e.addresses.contains_any(dst.addrs)
            }
            # Through the destination's primary subnet routes: "tcp:22@10.0.0.0/24".
            for prefix in compiled.primaries_by_node.get(dst_id, ()):
                labels.update(
                    f"{_proto_label(rule.protocols)}:{_port_label(e.first, e.last)}@{prefix_str(prefix)}"
                    for e in rule.dst
                    if e.addresses.overlaps_prefix(prefix)
                )
            if not labels:
                continue
            for src_id in compiled.tailnet.node_ids_in(rule.src_set.merged()):
                if src_id != dst_id and src_id in live:
                    out.setdefault((src_id, dst_id), set()).update(labels)
    return {k: frozenset(v) for k, v in out.items()}
