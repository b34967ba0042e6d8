"""Internal filter-rule form: wire rules plus the address sets behind them.

Role in the pipeline: ``compile.py`` produces :class:`Rule` values,
``filter.py`` reduces them per node and ``peers.py`` derives matchers from
them. A rule keeps the exact strings Tailscale puts on the wire *and* the
parsed :class:`~projections.policy.ipset.IPSet` of each string, so per-node
work never re-parses ``100.64.0.0-100.115.91.255``.

Two invariants:

* ``Rule.src_set`` is the set the ``SrcIPs`` strings denote, kept as the
  per-alias parts it was built from (:class:`AddressUnion`).
* each :class:`DstEntry` carries the set its ``IP`` string denotes (``*`` is
  every address).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from .ipset import ALL_V4, ALL_V6, AddressUnion, IPSet, Prefix, prefix_str
from .tailnet import INTERNET
from .wire import CapGrant, FilterRule, NetPortRange, PortRangeWire

__all__ = ["CapEntry", "DstEntry", "DstIndex", "Match", "MergedRules", "Rule", "Signature", "merge_rules", "merge_rules_reusing"]


class DstEntry(msgspec.Struct, frozen=True, eq=False, gc=False):
    """One ``DstPorts`` element with its address set.

    A rule holds one per destination prefix and port range (several per node at
    corp), so it carries no garbage-collector header (16 bytes each; issue 19): its
    fields (a string, two ints, an address set) cannot reach back to it. Entries
    compare by identity, as shared entries mean the same thing."""

    ip: str
    first: int
    last: int
    addresses: IPSet

    def wire(self) -> NetPortRange:
        return NetPortRange(ip=self.ip, ports=PortRangeWire(first=self.first, last=self.last))


class CapEntry:
    """One ``CapGrant`` element: destination prefixes and the cap map."""

    __slots__ = ("cap_map", "dsts")

    def __init__(
        self, dsts: tuple[Prefix, ...], cap_map: tuple[tuple[str, bytes | None], ...]
    ) -> None:
        self.dsts = dsts
        self.cap_map = cap_map

    def addresses(self) -> IPSet:
        """The destination prefixes as one set."""
        return IPSet.of(self.dsts)

    def wire(self) -> CapGrant:
        return CapGrant(
            dsts=tuple(prefix_str(p) for p in self.dsts),
            cap_map={
                name: (msgspec.Raw(raw) if raw is not None else None) for name, raw in self.cap_map
            },
        )


class Signature:
    """A rule's :meth:`Rule.signature`: a value hashed once (a rule listing every member
    of a group has thousands of entries, and a join compares every rule's signature)."""

    __slots__ = ("_hash", "key")

    def __init__(self, key: tuple[object, ...]) -> None:
        self.key = key
        self._hash = hash(key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, Signature) and self._hash == other._hash and self.key == other.key
        )


class DstIndex:
    """A rule's ``dst`` entries by address: each single-address entry's position under
    its address, and the positions of all others (ranges, CIDRs, ``*``).

    A rule to a group lists one entry per member address, so this holds one item per
    node of the tailnet for each such rule: an address with one entry (the usual case,
    one port range) maps to that position as a bare ``int``, one with several to a
    tuple of positions, rather than to a list each.
    """

    __slots__ = ("_singles", "others")

    def __init__(self, dst: Sequence[DstEntry]) -> None:
        singles: dict[int, int | tuple[int, ...]] = {}
        others: list[int] = []
        for i, entry in enumerate(dst):
            ranges = entry.addresses.ranges
            if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
                addr = ranges[0][0]
                had = singles.get(addr)
                if had is None:
                    singles[addr] = i
                elif isinstance(had, int):
                    singles[addr] = (had, i)
                else:
                    singles[addr] = (*had, i)
            else:
                others.append(i)
        self._singles = singles
        #: Positions of the entries that are not a single address.
        self.others: tuple[int, ...] = tuple(others)

    def addresses(self) -> Iterable[int]:
        """Every address some single-address entry names."""
        return self._singles.keys()

    def positions(self, addr: int) -> tuple[int, ...]:
        """Positions of the single-address entries naming ``addr``, in order."""
        found = self._singles.get(addr)
        if found is None:
            return ()
        if isinstance(found, int):
            return (found,)
        return found


class Rule:
    """A packet-filter rule (``dst``) or a capability rule (``caps``).

    A rule has either ``dst`` entries or ``caps`` entries, never both, as
    tailcfg requires.

    Attributes:
        src: the ``SrcIPs`` strings.
        src_set: the addresses ``src`` denotes, as per-alias parts.
        dst: ``DstPorts`` entries with their addresses (for reduction).
        protocols: ``IPProto``.
        caps: ``CapGrant`` entries.
        dst_parts: the destination addresses as per-alias parts (for
            matching; equal in content to the union of ``dst`` entries).
    """

    __slots__ = ("_dst_index", "_match", "_signature", "caps", "dst", "dst_parts", "protocols", "src", "src_set")

    def __init__(
        self,
        src: tuple[str, ...],
        src_set: AddressUnion,
        dst: tuple[DstEntry, ...] = (),
        protocols: tuple[int, ...] = (),
        caps: tuple[CapEntry, ...] = (),
        dst_parts: tuple[IPSet, ...] | None = None,
    ) -> None:
        self.src = src
        self.src_set = src_set
        self.dst = dst
        self.protocols = protocols
        self.caps = caps
        if dst_parts is None:
            dst_parts = tuple(e.addresses for e in dst) + tuple(c.addresses() for c in caps)
        self.dst_parts = dst_parts
        self._match: Match | None = None
        self._dst_index: DstIndex | None = None
        self._signature: Signature | None = None

    def signature(self) -> Signature:
        """What tells this rule apart from another of an earlier compile (computed
        once): its ``SrcIPs``, protocols and very entry objects (grants that were not
        recompiled share theirs, and so do merged rules made of the same rules)."""
        if self._signature is None:
            # The entry tuples themselves: entries compare and hash by identity, and
            # holding them costs no new object per entry (ids would be one int each).
            self._signature = Signature((self.src, self.protocols, self.dst, self.caps))
        return self._signature

    def dst_index(self) -> DstIndex:
        """``dst`` entries by address (see :class:`DstIndex`), built once. Lets per-node
        reduction of a rule listing every member cost the node's addresses, not the
        tailnet."""
        if self._dst_index is None:
            self._dst_index = DstIndex(self.dst)
        return self._dst_index

    def wire(self) -> FilterRule:
        """The tailcfg.FilterRule for this rule."""
        return FilterRule(
            src_ips=self.src,
            dst_ports=tuple(d.wire() for d in self.dst),
            ip_proto=self.protocols,
            cap_grant=tuple(c.wire() for c in self.caps),
        )

    def match(self) -> Match:
        """The matcher used for peer visibility (dst and cap targets alike).

        Computed once per rule; rules are shared between compiled policies,
        so an incremental recompile reuses the matchers of unchanged rules.
        """
        if self._match is None:
            self._match = Match(self.src_set, AddressUnion(self.dst_parts))
        return self._match


class Match:
    """Sources and destinations of one rule, for "can A reach B" questions.

    Mirrors headscale's ``matcher.Match``. ``internet`` is its
    ``DestsIsTheInternet``: the destinations hold a whole family's /0 or
    cover every internet address.
    """

    __slots__ = ("dests", "internet", "srcs")

    def __init__(self, srcs: AddressUnion, dests: AddressUnion) -> None:
        self.srcs = srcs
        self.dests = dests
        public = [p for p in dests.parts if p.overlaps(INTERNET)]
        self.internet = any(
            p.contains_prefix(ALL_V4) or p.contains_prefix(ALL_V6) for p in public
        ) or (bool(public) and INTERNET.issubset(IPSet.union(public)))


def merge_rules(rules: Iterable[Rule]) -> list[Rule]:
    """Merge rules with identical ``SrcIPs`` and ``IPProto``.

    DstPorts are concatenated (not deduplicated), first occurrence keeps its
    position; capability rules pass through unmerged. This is headscale's
    ``mergeFilterRules``, which the hosted control plane's output matches.
    """
    return merge_rules_reusing(rules, {})[0]


#: Merged rules by the rules they were merged from (see :func:`merge_rules_reusing`).
MergedRules = dict[tuple[Rule, ...], Rule]


def merge_rules_reusing(rules: Iterable[Rule], previous: MergedRules) -> tuple[list[Rule], MergedRules]:
    """:func:`merge_rules`, reusing the merged rule of an earlier call when it was made
    of the very same rules (``previous``: that call's second result), so that its
    matcher, index and signature are computed once across compiles.

    Returns:
        The merged rules, and every merged rule by the rules it was made of.
    """
    slots: list[Rule | list[Rule]] = []
    index: dict[tuple[tuple[str, ...], tuple[int, ...]], int] = {}
    for rule in rules:
        if rule.caps:
            slots.append(rule)
            continue
        key = (rule.src, rule.protocols)
        at = index.get(key)
        if at is None:
            index[key] = len(slots)
            slots.append([rule])
        else:
            group = slots[at]
            assert isinstance(group, list)
            group.append(rule)
    out: list[Rule] = []
    merged: MergedRules = {}
    for slot in slots:
        if isinstance(slot, Rule):
            out.append(slot)
        elif len(slot) == 1:
            out.append(slot[0])
        else:
            parts = tuple(slot)
            reused = previous.get(parts)
            if reused is None:
                first = slot[0]
                reused = Rule(
                    first.src,
                    first.src_set,
                    tuple(e for r in slot for e in r.dst),
                    first.protocols,
                    dst_parts=tuple(p for r in slot for p in r.dst_parts),
                )
            merged[parts] = reused
            out.append(reused)
    return out, merged
