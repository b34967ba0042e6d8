"""Address allocation: sequential, random, reserved ranges, exhaustion, no reuse."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projections import CommandError
from projections.ipam import DEFAULT_V4, DEFAULT_V6, AllocationMode, allocate, is_reserved


def test_sequential_starts_at_the_first_usable_address() -> None:
    assert allocate(DEFAULT_V4, set(), last=None) == "100.64.0.1"
    assert allocate(DEFAULT_V6, set(), last=None) == "fd7a:115c:a1e0::1"


def test_sequential_continues_after_the_last_and_skips_used() -> None:
    assert allocate(DEFAULT_V4, {"100.64.0.6"}, last="100.64.0.5") == "100.64.0.7"


def test_a_freed_address_is_not_reused_before_wrapping() -> None:
    # 100.64.0.1 was freed, but the allocator continues after the last one handed out.
    assert allocate(DEFAULT_V4, {"100.64.0.2"}, last="100.64.0.2") == "100.64.0.3"


def test_reserved_addresses_are_skipped() -> None:
    assert allocate(DEFAULT_V4, set(), last="100.100.99.255") == "100.100.101.0"
    assert allocate(DEFAULT_V6, set(), last="fd7a:115c:a1e0::52") == "fd7a:115c:a1e0::54"
    assert is_reserved(ipaddress.ip_address("100.100.100.100"), DEFAULT_V4)
    assert is_reserved(ipaddress.ip_address("100.115.92.7"), DEFAULT_V4)


def test_small_prefix_wraps_then_exhausts() -> None:
    net = ipaddress.IPv4Network("10.9.0.0/29")  # .1-.6 usable
    used: set[str] = set()
    last = None
    for _ in range(6):
        last = allocate(net, used, last=last)
        used.add(last)
    assert used == {f"10.9.0.{i}" for i in range(1, 7)}
    used.discard("10.9.0.3")
    assert allocate(net, used, last=last) == "10.9.0.3"  # wraps to the freed one
    used.add("10.9.0.3")
    with pytest.raises(CommandError, match="no free address"):
        allocate(net, used, last=last)


def test_random_mode_is_reproducible_from_its_source() -> None:
    a = allocate(DEFAULT_V4, set(), last=None, mode=AllocationMode.RANDOM, randbelow=random.Random(7).randrange)
    b = allocate(DEFAULT_V4, set(), last=None, mode=AllocationMode.RANDOM, randbelow=random.Random(7).randrange)
    assert a == b
    with pytest.raises(ValueError, match="randomness"):
        allocate(DEFAULT_V4, set(), last=None, mode=AllocationMode.RANDOM)


@given(seed=st.integers(0, 2**32), n=st.integers(1, 40))
def test_random_never_hands_out_a_used_or_reserved_address(seed: int, n: int) -> None:
    net = ipaddress.IPv4Network("100.100.100.0/26")  # mostly reserved except nothing: all reserved
    with pytest.raises(CommandError):
        allocate(net, set(), last=None, mode=AllocationMode.RANDOM, randbelow=random.Random(seed).randrange)
    net = ipaddress.IPv4Network("10.0.0.0/26")
    rnd = random.Random(seed)
    used: set[str] = set()
    for _ in range(min(n, 62)):
        addr = allocate(net, used, last=None, mode=AllocationMode.RANDOM, randbelow=rnd.randrange)
        assert addr not in used
        assert not is_reserved(ipaddress.ip_address(addr), net)
        used.add(addr)
