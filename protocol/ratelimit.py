"""Token buckets per key (sans-I/O: the caller passes the time).

Used by the control handler to bound how fast one node can append to the permanent
log (host name, route and expiry changes, re-keys): each node has a bucket of
``burst`` tokens that refills by one every ``interval`` seconds; an update that
would append costs a token per event, and one that finds too few is refused.

Only keys that spent something have a bucket; a bucket that has refilled is the
same as none, and :meth:`TokenBuckets.prune` forgets those.
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """``burst`` tokens per key, one more every ``interval`` seconds.

    Args:
        interval: seconds to regain one token (positive).
        burst: the most tokens a key holds (at least 1).
    """

    def __init__(self, interval: float, burst: int) -> None:
        if interval <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive interval and a burst of at least 1")
        self.interval = interval
        self.burst = burst
        #: key -> (tokens at ``stamp``, stamp)
        self._buckets: dict[Hashable, tuple[float, float]] = {}

    def _tokens(self, key: Hashable, now: float) -> float:
        held = self._buckets.get(key)
        if held is None:
            return float(self.burst)
        tokens, stamp = held
        return min(float(self.burst), tokens + max(now - stamp, 0.0) / self.interval)

    def take(self, key: Hashable, cost: int, now: float) -> float | None:
        """Spend ``cost`` tokens of ``key`` at ``now``: ``None`` when they were there
        (and are now spent), else how many seconds until they will be (nothing spent).
        A cost above the burst can never be paid: it is refused with ``inf``."""
        if cost <= 0:
            return None
        if cost > self.burst:
            return float("inf")
        tokens = self._tokens(key, now)
        if tokens + 1e-9 < cost:
            return (cost - tokens) * self.interval
        self._buckets[key] = (tokens - cost, now)
        return None

    def forget(self, key: Hashable) -> None:
        self._buckets.pop(key, None)

    def prune(self, now: float) -> None:
        """Forget the buckets that have refilled (they hold nothing a new one would not)."""
        full = [k for k in self._buckets if self._tokens(k, now) >= self.burst]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
