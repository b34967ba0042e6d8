"""Immutable IP sets over one integer address line, for the policy engine.

Role in the pipeline: every alias in a policy (a user, a tag, ``*``, a host
alias, a CIDR) resolves to a set of addresses. The packet filter, peer
visibility, route reduction and the ``tests`` block are all set algebra over
those sets, so this module is the arithmetic underneath the whole engine.

Representation. IPv4 addresses occupy ``[0, 2**32)`` as plain integers and
IPv6 addresses are shifted to ``V6_BASE + addr`` with ``V6_BASE = 2**130``.
The gap between the two families means an interval can never straddle them,
so one sorted tuple of closed ``(lo, hi)`` intervals holds both families
(IPv4 first, as Go's netipx orders them) and every operation is a linear
merge. This mirrors ``netipx.IPSet`` (which keeps
sorted ranges) closely enough that rendering a set gives the same strings the
Tailscale control plane emits:

* a single address renders bare (``100.64.0.1``),
* a range that is exactly one CIDR renders as the CIDR (``10.0.0.0/8``),
* any other range renders as ``first-last``
  (``100.64.0.0-100.115.91.255``, the CGNAT range minus the ChromeOS /23).

Invariant: ``IPSet.ranges`` is sorted, non-overlapping and non-adjacent
(adjacent intervals are coalesced), so two sets are equal iff their tuples
are equal. Every constructor goes through :func:`_normalise`.
"""

from __future__ import annotations

import functools
import ipaddress
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Final

__all__ = [
    "ALL_V4",
    "ALL_V6",
    "CGNAT",
    "TAILSCALE_ULA",
    "V6_BASE",
    "AddressUnion",
    "IPSet",
    "Prefix",
    "addr_to_int",
    "format_addr",
    "is_exit_route",
    "parse_prefix",
    "prefix_str",
]

#: Offset of the IPv6 family on the shared integer line (see module docs).
V6_BASE: Final = 1 << 130


def is_v4(addr: int) -> bool:
    """Report whether a shared-line address is IPv4."""
    return addr < V6_BASE


class Prefix:
    """A CIDR prefix on the shared address line.

    Attributes:
        lo: first address (shifted for IPv4).
        hi: last address (shifted for IPv4).
        bits: prefix length (0-32 for IPv4, 0-128 for IPv6).
        v4: True for IPv4.

    Prefixes are hashable values; two prefixes are equal when they cover the
    same block with the same length. Host bits are always masked off.
    """

    __slots__ = ("bits", "hi", "lo", "v4")

    def __init__(self, lo: int, bits: int, v4: bool) -> None:
        width = 32 if v4 else 128
        if bits == width:
            # One address: keep the caller's integer as both ends rather than two
            # equal new ones (a host prefix per node address and alias; issue 19).
            self.lo = self.hi = lo
            self.bits = bits
            self.v4 = v4
            return
        size = 1 << (width - bits)
        base = 0 if v4 else V6_BASE
        masked = ((lo - base) // size) * size + base
        self.lo = masked
        self.hi = masked + size - 1
        self.bits = bits
        self.v4 = v4

    @property
    def width(self) -> int:
        """Address width of the family: 32 or 128."""
        return 32 if self.v4 else 128

    def is_single(self) -> bool:
        """True when the prefix covers exactly one address (/32 or /128)."""
        return self.bits == self.width

    def contains(self, addr: int) -> bool:
        """Report whether ``addr`` (a shifted integer) lies in the prefix."""
        return self.lo <= addr <= self.hi

    def overlaps(self, other: Prefix) -> bool:
        """Report whether two prefixes share at least one address."""
        return self.lo <= other.hi and other.lo <= self.hi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prefix) and (self.lo, self.bits, self.v4) == (
            other.lo,
            other.bits,
            other.v4,
        )

    def __hash__(self) -> int:
        return hash((self.lo, self.bits, self.v4))

    def __lt__(self, other: Prefix) -> bool:
        return (self.lo, self.bits) < (other.lo, other.bits)

    def __repr__(self) -> str:
        return f"Prefix({prefix_str(self)!r})"

    def __str__(self) -> str:
        return prefix_str(self)


# ---------------------------------------------------------------------------
# Parsing and formatting


@functools.lru_cache(maxsize=1 << 16)
def addr_to_int(text: str) -> int:
    """Parse an IPv4 or IPv6 address into the shared integer line (memoised: every
    compile parses every node address again).

    Raises:
        ValueError: when ``text`` is not an address.
    """
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return int(ip)
    return V6_BASE + int(ip)


@lru_cache(maxsize=65536)
def format_addr(value: int) -> str:
    """Render a shifted integer back to Go's ``netip.Addr.String`` form."""
    if value < V6_BASE:
        return str(ipaddress.IPv4Address(value))
    return str(ipaddress.IPv6Address(value - V6_BASE))


@lru_cache(maxsize=16384)
def parse_prefix(text: str) -> Prefix:
    """Parse ``addr`` or ``addr/bits`` (host bits are masked off).

    A bare address becomes a /32 or /128. This follows headscale's
    ``Prefix.parseString`` and Go's ``netip.ParsePrefix`` (which rejects
    IPv4-mapped or zoned forms the same way ``ipaddress`` does).

    Raises:
        ValueError: when ``text`` is neither an address nor a prefix.
    """
    if "/" in text:
        addr_text, _, bits_text = text.partition("/")
        if not bits_text.isdigit() or (len(bits_text) > 1 and bits_text[0] == "0"):
            raise ValueError(f"invalid prefix {text!r}")
        ip = ipaddress.ip_address(addr_text)
        bits = int(bits_text)
        width = 32 if ip.version == 4 else 128
        if bits > width:
            raise ValueError(f"invalid prefix {text!r}")
        base = 0 if ip.version == 4 else V6_BASE
        return Prefix(base + int(ip), bits, ip.version == 4)
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return Prefix(int(ip), 32, True)
    return Prefix(V6_BASE + int(ip), 128, False)


def prefix_str(prefix: Prefix) -> str:
    """Render a prefix as ``addr/bits`` (always with the length)."""
    return f"{format_addr(prefix.lo)}/{prefix.bits}"


def is_exit_route(prefix: Prefix) -> bool:
    """Report whether ``prefix`` is ``0.0.0.0/0`` or ``::/0`` (an exit route)."""
    return prefix.bits == 0


# ---------------------------------------------------------------------------
# Interval helpers


def _normalise(intervals: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sort and coalesce overlapping or adjacent intervals."""
    ordered = sorted(intervals)
    if not ordered:
        return ()
    out: list[tuple[int, int]] = []
    cur_lo, cur_hi = ordered[0]
    for lo, hi in ordered[1:]:
        if lo <= cur_hi + 1:
            if hi > cur_hi:
                cur_hi = hi
        else:
            out.append((cur_lo, cur_hi))
            cur_lo, cur_hi = lo, hi
    out.append((cur_lo, cur_hi))
    return tuple(out)


def _range_to_prefixes(lo: int, hi: int) -> Iterator[Prefix]:
    """Decompose a closed interval into the minimal list of CIDR prefixes."""
    v4 = lo < V6_BASE
    base = 0 if v4 else V6_BASE
    width = 32 if v4 else 128
    start = lo - base
    end = hi - base
    while start <= end:
        # Largest block aligned at ``start`` that does not run past ``end``.
        size = start & -start if start else 1 << width
        while size > end - start + 1:
            size >>= 1
        bits = width - size.bit_length() + 1
        yield Prefix(base + start, bits, v4)
        start += size


def _range_is_prefix(lo: int, hi: int) -> Prefix | None:
    """Return the prefix equal to ``[lo, hi]`` or None when it is not one."""
    size = hi - lo + 1
    if size & (size - 1):
        return None
    v4 = lo < V6_BASE
    base = 0 if v4 else V6_BASE
    if (lo - base) % size:
        return None
    width = 32 if v4 else 128
    return Prefix(lo, width - size.bit_length() + 1, v4)


class IPSet:
    """An immutable set of IPv4 and IPv6 addresses.

    Construct with :meth:`of` (from prefixes), :meth:`from_ranges`, or the
    set operators. Instances are hashable and compare by content.
    """

    __slots__ = ("_hash", "ranges")

    ranges: tuple[tuple[int, int], ...]

    def __init__(self, ranges: tuple[tuple[int, int], ...] = ()) -> None:
        # Callers must pass normalised ranges; use the classmethods otherwise.
        self.ranges = ranges
        self._hash: int | None = None

    # -- construction -----------------------------------------------------

    @classmethod
    def of(cls, prefixes: Iterable[Prefix]) -> IPSet:
        """Build a set from prefixes."""
        return cls(_normalise((p.lo, p.hi) for p in prefixes))

    @classmethod
    def from_ranges(cls, intervals: Iterable[tuple[int, int]]) -> IPSet:
        """Build a set from arbitrary closed intervals."""
        return cls(_normalise(intervals))

    @classmethod
    def from_addrs(cls, addrs: Iterable[int]) -> IPSet:
        """Build a set of single addresses."""
        return cls.from_sorted_addrs(sorted(addrs))

    @classmethod
    def from_sorted_addrs(cls, addrs: Iterable[int]) -> IPSet:
        """Build a set from addresses already in ascending order (one pass)."""
        out: list[tuple[int, int]] = []
        lo = hi = -2
        for addr in addrs:
            if addr <= hi + 1:
                if addr > hi:
                    hi = addr
                continue
            if hi >= -1:
                out.append((lo, hi))
            lo = hi = addr
        if hi >= -1:
            out.append((lo, hi))
        return cls(tuple(out))

    def with_addr(self, addr: int) -> IPSet:
        """This set plus one address (merged with adjacent ranges, as
        :meth:`from_sorted_addrs` merges): ``O(log n)`` search and one tuple copy."""
        ranges = self.ranges
        i = bisect_right(ranges, (addr, addr))
        lo = hi = addr
        start = end = i
        if i > 0 and ranges[i - 1][1] >= addr - 1:
            if ranges[i - 1][1] >= addr:
                return self
            start, lo = i - 1, ranges[i - 1][0]
        if i < len(ranges) and ranges[i][0] <= addr + 1:
            if ranges[i][0] <= addr:
                return self
            end, hi = i + 1, ranges[i][1]
        return IPSet((*ranges[:start], (lo, hi), *ranges[end:]))

    def without_addr(self, addr: int) -> IPSet:
        """This set less one address (the range holding it split in two)."""
        ranges = self.ranges
        i = bisect_right(ranges, (addr, addr)) - 1
        if i < 0 or not ranges[i][0] <= addr <= ranges[i][1]:
            if i + 1 < len(ranges) and ranges[i + 1][0] == addr:
                i += 1
            else:
                return self
        lo, hi = ranges[i]
        pieces: tuple[tuple[int, int], ...] = ((lo, addr - 1),) if lo < addr else ()
        if addr < hi:
            pieces += ((addr + 1, hi),)
        return IPSet((*ranges[:i], *pieces, *ranges[i + 1 :]))

    @classmethod
    def union(cls, sets: Iterable[IPSet]) -> IPSet:
        """The union of many sets in one pass (the set itself when only one is not
        empty: sets are immutable)."""
        parts = [s for s in sets if s.ranges]
        if len(parts) == 1:
            return parts[0]
        return cls(_normalise(r for s in parts for r in s.ranges))

    # -- algebra ----------------------------------------------------------

    def __or__(self, other: IPSet) -> IPSet:
        if not other.ranges:
            return self
        if not self.ranges:
            return other
        return IPSet(_normalise(self.ranges + other.ranges))

    def __sub__(self, other: IPSet) -> IPSet:
        if not other.ranges or not self.ranges:
            return self
        out: list[tuple[int, int]] = []
        sub = other.ranges
        j = 0
        for lo, hi in self.ranges:
            cur = lo
            while j < len(sub) and sub[j][1] < cur:
                j += 1
            k = j
            while k < len(sub) and sub[k][0] <= hi:
                s_lo, s_hi = sub[k]
                if s_lo > cur:
                    out.append((cur, s_lo - 1))
                cur = max(cur, s_hi + 1)
                if cur > hi:
                    break
                k += 1
            if cur <= hi:
                out.append((cur, hi))
        return IPSet(tuple(out))

    def __and__(self, other: IPSet) -> IPSet:
        out: list[tuple[int, int]] = []
        a, b = self.ranges, other.ranges
        i = j = 0
        while i < len(a) and j < len(b):
            lo = max(a[i][0], b[j][0])
            hi = min(a[i][1], b[j][1])
            if lo <= hi:
                out.append((lo, hi))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return IPSet(tuple(out))

    # -- queries ----------------------------------------------------------

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IPSet) and self.ranges == other.ranges

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self.ranges)
        return self._hash

    def __repr__(self) -> str:
        return f"IPSet({self.strings()!r})"

    def contains(self, addr: int) -> bool:
        """Report whether a single (shifted) address is in the set."""
        ranges = self.ranges
        lo_i, hi_i = 0, len(ranges)
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            r_lo, r_hi = ranges[mid]
            if addr < r_lo:
                hi_i = mid
            elif addr > r_hi:
                lo_i = mid + 1
            else:
                return True
        return False

    def contains_any(self, addrs: Iterable[int]) -> bool:
        """Report whether at least one of ``addrs`` is in the set."""
        return any(self.contains(a) for a in addrs)

    def overlaps_range(self, lo: int, hi: int) -> bool:
        """Report whether any address in ``[lo, hi]`` is in the set."""
        ranges = self.ranges
        # First range whose end is >= lo; it overlaps iff it starts <= hi.
        left, right = 0, len(ranges)
        while left < right:
            mid = (left + right) // 2
            if ranges[mid][1] < lo:
                left = mid + 1
            else:
                right = mid
        return left < len(ranges) and ranges[left][0] <= hi

    def overlaps_prefix(self, prefix: Prefix) -> bool:
        """Report whether the set shares an address with ``prefix``."""
        return self.overlaps_range(prefix.lo, prefix.hi)

    def overlaps(self, other: IPSet) -> bool:
        """Report whether the two sets intersect (a search in the larger set per range
        of the smaller, stopping at the first hit)."""
        small, large = (self, other) if len(self.ranges) <= len(other.ranges) else (other, self)
        return any(large.overlaps_range(lo, hi) for lo, hi in small.ranges)

    def contains_range(self, lo: int, hi: int) -> bool:
        """Report whether every address of ``[lo, hi]`` is in the set."""
        ranges = self.ranges
        left, right = 0, len(ranges)
        while left < right:
            mid = (left + right) // 2
            if ranges[mid][1] < lo:
                left = mid + 1
            else:
                right = mid
        return left < len(ranges) and ranges[left][0] <= lo and hi <= ranges[left][1]

    def contains_prefix(self, prefix: Prefix) -> bool:
        """Report whether the whole prefix is in the set."""
        return self.contains_range(prefix.lo, prefix.hi)

    def issubset(self, other: IPSet) -> bool:
        """Report whether every address of this set is in ``other``."""
        return all(other.contains_range(lo, hi) for lo, hi in self.ranges)

    # -- rendering --------------------------------------------------------

    def prefixes(self) -> list[Prefix]:
        """The minimal CIDR decomposition, in address order (IPv4 first)."""
        out: list[Prefix] = []
        for lo, hi in self.ranges:
            out.extend(_range_to_prefixes(lo, hi))
        return out

    def strings(self) -> list[str]:
        """Render like headscale's ``ipSetToStrings`` (netipx ``Ranges``).

        Single addresses render bare, exact CIDRs as ``addr/bits`` and any
        other interval as ``first-last``.
        """
        out: list[str] = []
        for lo, hi in self.ranges:
            if lo == hi:
                out.append(format_addr(lo))
                continue
            whole = _range_is_prefix(lo, hi)
            if whole is not None:
                out.append(prefix_str(whole))
            else:
                out.append(f"{format_addr(lo)}-{format_addr(hi)}")
        return out

    def addrs(self) -> Iterator[int]:
        """Iterate every address (only sensible for small sets)."""
        for lo, hi in self.ranges:
            yield from range(lo, hi + 1)


def _cidr(text: str) -> Prefix:
    return parse_prefix(text)


#: 100.64.0.0/10, the CGNAT block Tailscale allocates IPv4 addresses from.
CGNAT: Final = _cidr("100.64.0.0/10")
#: fd7a:115c:a1e0::/48, Tailscale's IPv6 ULA block.
TAILSCALE_ULA: Final = _cidr("fd7a:115c:a1e0::/48")
#: 0.0.0.0/0
ALL_V4: Final = _cidr("0.0.0.0/0")
#: ::/0
ALL_V6: Final = _cidr("::/0")


class AddressUnion:
    """A lazy union of :class:`IPSet` parts, deduplicated by identity.

    Rules keep their sources and destinations as the per-alias sets they
    were built from instead of one merged set: a hundred rules naming
    ``autogroup:member`` then share one member set, membership tests stay a
    few binary searches, and folding many rules together (peer visibility)
    unions each distinct part once instead of once per rule.
    """

    __slots__ = ("_merged", "parts")

    def __init__(self, parts: Iterable[IPSet]) -> None:
        unique: dict[int, IPSet] = {}
        for part in parts:
            if part.ranges:
                unique.setdefault(id(part), part)
        self.parts: tuple[IPSet, ...] = tuple(unique.values())
        self._merged: IPSet | None = None

    def __bool__(self) -> bool:
        return bool(self.parts)

    def __repr__(self) -> str:
        return f"AddressUnion({self.parts!r})"

    def contains(self, addr: int) -> bool:
        """Report whether one address is in the union."""
        return any(part.contains(addr) for part in self.parts)

    def contains_any(self, addrs: Iterable[int]) -> bool:
        """Report whether at least one of ``addrs`` is in the union."""
        return any(part.contains(a) for a in addrs for part in self.parts)

    def overlaps_prefix(self, prefix: Prefix) -> bool:
        """Report whether the union shares an address with ``prefix``."""
        return any(part.overlaps_range(prefix.lo, prefix.hi) for part in self.parts)

    def merged(self) -> IPSet:
        """The union as one :class:`IPSet` (computed once)."""
        if self._merged is None:
            self._merged = IPSet.union(self.parts)
        return self._merged
