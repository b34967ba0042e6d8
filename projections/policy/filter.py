"""Reduce compiled rules to the packet filter one node receives.

Role in the pipeline: per-node stage. A node's filter only needs the
destinations that concern it (headscale's ``policyutil.ReduceFilterRules``,
which matches the hosted control plane):

* a ``DstPorts`` entry survives when its addresses contain one of the node's
  addresses, overlap one of the node's served subnet routes, or -- on an
  exit node -- lie entirely within the public internet;
* a ``CapGrant`` destination prefix survives narrowed to the node's own
  /32 and /128 when it contains them, and unchanged when it overlaps one of
  the node's subnet routes;
* ``SrcIPs`` and ``IPProto`` are never narrowed;
* a rule with nothing left is dropped.

Invariant (checked by property tests): reduction only removes, so every
surviving ``DstPorts`` entry is one of the input entries.
"""

from __future__ import annotations

from collections.abc import Iterable

from .ipset import Prefix
from .resolve import host_prefix
from .rules import CapEntry, DstEntry, Rule
from .tailnet import INTERNET, NodeInfo

__all__ = ["reduce_rules"]


def reduce_rules(node: NodeInfo, rules: Iterable[Rule]) -> list[Rule]:
    """Keep only the parts of ``rules`` relevant to ``node`` as a destination.

    Args:
        node: the receiving node.
        rules: unreduced rules (global plus the node's self/via rules).

    Returns:
        The reduced rules, order preserved.
    """
    out: list[Rule] = []
    for rule in rules:
        if rule.caps:
            reduced = _reduce_caps(node, rule)
            if reduced is not None:
                out.append(reduced)
            continue
        if node.subnet_routes or node.is_exit or len(rule.dst) < 8:
            kept = tuple(entry for entry in rule.dst if _relevant(node, entry))
        else:
            # A plain node is a destination only by its own addresses: look them up.
            singles, others = rule.dst_index()
            positions = [i for addr in node.addrs for i in singles.get(addr, ())]
            positions += [i for i in others if rule.dst[i].addresses.contains_any(node.addrs)]
            kept = tuple(rule.dst[i] for i in sorted(set(positions)))
        if kept:
            out.append(Rule(rule.src, rule.src_set, kept, rule.protocols, dst_parts=rule.dst_parts))
    return out


def _relevant(node: NodeInfo, entry: DstEntry) -> bool:
    addresses = entry.addresses
    if addresses.contains_any(node.addrs):
        return True
    if any(addresses.overlaps_prefix(route) for route in node.subnet_routes):
        return True
    return node.is_exit and addresses.issubset(INTERNET)


def _reduce_caps(node: NodeInfo, rule: Rule) -> Rule | None:
    caps: list[CapEntry] = []
    for cap in rule.caps:
        matching: set[Prefix] = set()
        for dst in cap.dsts:
            if dst.is_single():
                if dst.lo in node.addrs:
                    matching.add(dst)
            else:
                for addr in node.addrs:
                    if dst.contains(addr):
                        matching.add(host_prefix(addr))
        for dst in cap.dsts:
            for route in node.subnet_routes:
                if dst.overlaps(route):
                    matching.add(dst)
        if matching:
            caps.append(CapEntry(tuple(sorted(matching)), cap.cap_map))
    if not caps:
        return None
    return Rule(rule.src, rule.src_set, caps=tuple(caps))
