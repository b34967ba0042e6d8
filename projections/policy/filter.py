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

from collections.abc import Iterable, Sequence

from .ipset import Prefix
from .resolve import host_prefix
from .rules import CapEntry, DstEntry, Rule
from .tailnet import INTERNET, NodeInfo

__all__ = ["RuleIndex", "reduce_rules"]


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
            index = rule.dst_index()
            positions = [i for addr in node.addrs for i in index.positions(addr)]
            positions += [i for i in index.others if rule.dst[i].addresses.contains_any(node.addrs)]
            kept = tuple(rule.dst[i] for i in sorted(set(positions)))
        if len(kept) == len(rule.dst):
            # Nothing to drop: the rule itself, shared by every node keeping it whole.
            out.append(rule)
        elif kept:
            out.append(Rule(rule.src, rule.src_set, kept, rule.protocols, dst_parts=rule.dst_parts))
    return out


class RuleIndex:
    """A rule list's rules by the addresses their single-address ``DstPorts`` entries
    (and ``CapGrant`` destinations) name, so that reducing it for a node without
    routes visits only the rules that can keep something: those naming one of its
    addresses, and those with other destinations (ranges, CIDRs, ``*``), which
    every node looks at.

    Identity aliases list every member address as an entry of its own, so a rule
    to a team or a tag names hundreds of addresses, and a tailnet's filter is many
    such rules: a node is a destination of a few. :meth:`reduce` gives exactly
    ``reduce_rules(node, rules)`` (it skips only rules that would keep nothing).
    """

    __slots__ = ("_always", "_by_addr", "rules")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = rules
        by_addr: dict[int, list[int]] = {}
        always: list[int] = []
        for i, rule in enumerate(rules):
            if rule.caps:
                # A plain node keeps a capability toward a single address only when
                # the address is its own (see _reduce_caps).
                for cap in rule.caps:
                    for dst in cap.dsts:
                        if dst.is_single():
                            by_addr.setdefault(dst.lo, []).append(i)
                        else:
                            always.append(i)
                continue
            index = rule.dst_index()
            if index.others:
                always.append(i)
            for addr in index.addresses():
                by_addr.setdefault(addr, []).append(i)
        # A bare int for an address one rule names (most members of a group or tag
        # are named by one rule), a tuple for several: not a tuple per address each.
        self._by_addr: dict[int, int | tuple[int, ...]] = {}
        for addr, positions in by_addr.items():
            distinct = tuple(dict.fromkeys(positions))
            self._by_addr[addr] = distinct[0] if len(distinct) == 1 else distinct
        self._always = frozenset(always)

    def reduce(self, node: NodeInfo) -> list[Rule]:
        """``reduce_rules(node, self.rules)`` for ``node``; one with subnet routes or an
        exit route is a destination by route too, and is reduced rule by rule."""
        if node.subnet_routes or node.is_exit:
            return reduce_rules(node, self.rules)
        picked = set(self._always)
        for addr in node.addrs:
            hit = self._by_addr.get(addr)
            if isinstance(hit, int):
                picked.add(hit)
            elif hit is not None:
                picked.update(hit)
        return reduce_rules(node, [self.rules[i] for i in sorted(picked)])


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
