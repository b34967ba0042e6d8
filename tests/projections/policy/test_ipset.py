"""IP sets against a naive model (Python sets of integers)."""

from __future__ import annotations

import ipaddress
import itertools

from hypothesis import given
from hypothesis import strategies as st

from projections.policy.compile import parse_address_strings
from projections.policy.ipset import AddressUnion, IPSet, Prefix, parse_prefix, prefix_str
from projections.policy.tailnet import INTERNET, WILDCARD

# A small universe (10.0.0.0/26) keeps the naive model cheap while still
# exercising alignment, adjacency and CIDR decomposition.
_BASE = int(ipaddress.IPv4Address("10.0.0.0"))

prefixes = st.builds(
    lambda offset, bits: Prefix(_BASE + offset, bits, True),
    st.integers(0, 63),
    st.integers(26, 32),
)
sets = st.lists(prefixes, max_size=6).map(IPSet.of)


def model(s: IPSet) -> set[int]:
    return set(s.addrs())


@given(sets, sets)
def test_algebra_matches_model(a: IPSet, b: IPSet) -> None:
    assert model(a | b) == model(a) | model(b)
    assert model(a - b) == model(a) - model(b)
    assert model(a & b) == model(a) & model(b)
    assert IPSet.union([a, b]) == a | b
    assert a.overlaps(b) == b.overlaps(a) == bool(model(a) & model(b))
    assert not a or IPSet.union([a, IPSet()]) is a  # one set: itself, not a copy


@given(sets, prefixes)
def test_queries_match_model(a: IPSet, p: Prefix) -> None:
    block = set(range(p.lo, p.hi + 1))
    assert a.overlaps_prefix(p) == bool(model(a) & block)
    assert a.contains_prefix(p) == block.issubset(model(a))
    for addr in (p.lo, p.hi):
        assert a.contains(addr) == (addr in model(a))


@given(sets)
def test_rendering_round_trips(a: IPSet) -> None:
    assert parse_address_strings(a.strings()) == a
    assert IPSet.of(a.prefixes()) == a
    # The CIDR decomposition is minimal: no two blocks could merge.
    blocks = a.prefixes()
    for x, y in itertools.pairwise(blocks):
        assert not (
            x.bits == y.bits and x.hi + 1 == y.lo and (x.lo - _BASE) % (2 * (x.hi - x.lo + 1)) == 0
        )


@given(st.lists(sets, max_size=4), prefixes)
def test_address_union_matches_merged_set(parts: list[IPSet], p: Prefix) -> None:
    union = AddressUnion(parts)
    merged = IPSet.union(parts)
    assert union.merged() == merged
    assert union.overlaps_prefix(p) == merged.overlaps_prefix(p)
    assert union.contains(p.lo) == merged.contains(p.lo)


def test_wildcard_renders_like_tailscale() -> None:
    assert sorted(WILDCARD.strings()) == [
        "100.115.94.0-100.127.255.255",
        "100.64.0.0-100.115.91.255",
        "fd7a:115c:a1e0::/48",
    ]


def test_internet_excludes_private_space() -> None:
    for private in ("10.1.2.3", "192.168.0.1", "100.64.0.1", "fd7a:115c:a1e0::1", "fe80::1"):
        assert not INTERNET.contains(parse_prefix(private).lo)
    for public in ("8.8.8.8", "2001:4860::8888"):
        assert INTERNET.contains(parse_prefix(public).lo)


def test_prefix_parsing_masks_host_bits() -> None:
    assert prefix_str(parse_prefix("10.1.2.3/8")) == "10.0.0.0/8"
    assert parse_prefix("100.64.0.1").is_single()
    assert prefix_str(parse_prefix("fd7a:115c:a1e0::1")) == "fd7a:115c:a1e0::1/128"


@given(st.sets(st.integers(0, 40), max_size=25), st.integers(0, 40))
def test_adding_or_removing_one_address_equals_building_afresh(addrs: set[int], addr: int) -> None:
    """Issue 19: a join edits an alias's addresses instead of rebuilding them."""
    s = IPSet.from_addrs(addrs)
    assert s.with_addr(addr).ranges == IPSet.from_addrs(addrs | {addr}).ranges
    assert s.without_addr(addr).ranges == IPSet.from_addrs(addrs - {addr}).ranges


def test_a_host_prefix_keeps_the_address_integer_as_both_ends() -> None:
    """Issue 19, memory: a /32 or /128 holds the caller's address integer as its low and
    high end (one object, not two equal new ones); wider prefixes still mask."""
    for text in ("100.64.3.7", "fd7a:115c:a1e0::5"):
        addr = parse_prefix(text).lo + 0  # a fresh integer object
        v4 = "." in text
        host = Prefix(addr, 32 if v4 else 128, v4)
        assert host.lo is addr and host.hi is addr
        assert prefix_str(host) == text + ("/32" if v4 else "/128") and host == parse_prefix(text)
    net = Prefix(parse_prefix("100.64.3.7").lo, 24, True)
    assert prefix_str(net) == "100.64.3.0/24" and net.hi - net.lo == 255
