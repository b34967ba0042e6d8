"""Per-key token buckets (protocol.ratelimit): a burst, then one token per interval."""

from __future__ import annotations

import math

import pytest

from protocol.ratelimit import TokenBuckets


def test_a_burst_then_one_token_per_interval() -> None:
    buckets = TokenBuckets(interval=10.0, burst=3)
    assert [buckets.take("n", 1, 0.0) for _ in range(3)] == [None, None, None]
    assert buckets.take("n", 1, 0.0) == pytest.approx(10.0)  # refused: 10 s until a token
    assert buckets.take("n", 1, 5.0) == pytest.approx(5.0)
    assert buckets.take("n", 1, 10.0) is None
    assert buckets.take("n", 2, 30.0) is None  # two more regained by then
    assert buckets.take("n", 1, 30.0) == pytest.approx(10.0)
    # Never more than the burst, however long it waited.
    assert buckets.take("n", 3, 10_000.0) is None
    assert buckets.take("n", 1, 10_000.0) is not None


def test_keys_are_apart_and_a_refusal_spends_nothing() -> None:
    buckets = TokenBuckets(interval=1.0, burst=2)
    assert buckets.take("a", 2, 0.0) is None
    assert buckets.take("b", 2, 0.0) is None
    assert buckets.take("a", 2, 1.0) == pytest.approx(1.0)  # has 1, wants 2: nothing spent
    assert buckets.take("a", 1, 1.0) is None


def test_costs_above_the_burst_and_free_updates() -> None:
    buckets = TokenBuckets(interval=1.0, burst=2)
    assert buckets.take("a", 3, 0.0) == math.inf
    assert buckets.take("a", 0, 0.0) is None
    assert len(buckets) == 0  # nothing was spent: no bucket kept


def test_prune_forgets_refilled_buckets_only() -> None:
    buckets = TokenBuckets(interval=1.0, burst=2)
    buckets.take("a", 2, 0.0)
    buckets.take("b", 1, 1.5)
    buckets.prune(2.0)  # a has refilled; b has 1.5 of 2
    assert len(buckets) == 1
    assert buckets.take("b", 2, 2.0) == pytest.approx(0.5)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="positive interval"):
        TokenBuckets(interval=0, burst=1)
    with pytest.raises(ValueError, match="burst of at least 1"):
        TokenBuckets(interval=1, burst=0)
