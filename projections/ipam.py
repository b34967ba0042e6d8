"""IP address allocation for new nodes (IPv4 and IPv6), deterministic on replay.

The allocator runs when a registration is *decided*, never in the fold: the chosen
addresses are recorded in ``node.registered`` and replay reads them back. Randomness,
when configured, comes from a source the caller passes in, so a decision is repeatable
in tests.

Defaults match Tailscale: ``100.64.0.0/10`` (CGNAT) and ``fd7a:115c:a1e0::/48``.
Addresses Tailscale reserves inside those ranges are never handed out: the network
address, the broadcast address, ``100.100.100.0/24`` (Quad100, the in-client DNS and
services address) and ``100.115.92.0/23`` (ChromeOS's ARC range), and
``fd7a:115c:a1e0::53`` (Quad100's IPv6 address).

Sequential allocation continues after the last address handed out and wraps to the
start of the range only when it runs off the end, so a deleted node's address is not
given to a new node until the whole range has been used once: peers and logs keep an
unambiguous "who had this address" for a long time. Random allocation picks uniformly
among free addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Container
from enum import StrEnum

from .errors import CommandError

__all__ = [
    "DEFAULT_V4",
    "DEFAULT_V6",
    "AllocationMode",
    "allocate",
    "is_reserved",
]

DEFAULT_V4 = ipaddress.IPv4Network("100.64.0.0/10")
DEFAULT_V6 = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")

_RESERVED_NETS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.IPv4Network("100.100.100.0/24"),
    ipaddress.IPv4Network("100.115.92.0/23"),
    ipaddress.IPv6Network("fd7a:115c:a1e0::53/128"),
)

# How many random draws before falling back to a scan (a nearly full range).
_RANDOM_TRIES = 64


class AllocationMode(StrEnum):
    SEQUENTIAL = "sequential"
    RANDOM = "random"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_reserved(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, net: Network) -> bool:
    """Whether ``addr`` must never be given to a node in ``net``."""
    if addr == net.network_address or addr == net.broadcast_address:
        return True
    return any(addr.version == r.version and addr in r for r in _RESERVED_NETS)


def allocate(
    net: Network,
    in_use: Container[str],
    *,
    last: str | None,
    mode: AllocationMode = AllocationMode.SEQUENTIAL,
    randbelow: Callable[[int], int] | None = None,
) -> str:
    """Choose a free address in ``net``.

    Args:
        net: the prefix to allocate from.
        in_use: addresses (as strings) held by current nodes.
        last: the last address handed out in this family (sequential mode continues
            after it when it lies in ``net``).
        mode: sequential or random.
        randbelow: ``randbelow(n)`` returns a uniform int in ``[0, n)`` (random mode).

    Raises:
        CommandError: the prefix has no free address.
    """
    size = net.num_addresses
    base = int(net.network_address)

    def free(offset: int) -> str | None:
        addr = ipaddress.ip_address(base + offset)
        if is_reserved(addr, net):
            return None
        text = str(addr)
        return None if text in in_use else text

    if mode is AllocationMode.RANDOM:
        if randbelow is None:
            raise ValueError("random allocation needs a randomness source")
        for _ in range(_RANDOM_TRIES):
            found = free(randbelow(size))
            if found is not None:
                return found
        start = randbelow(size)
    else:
        start = 1
        if last is not None:
            prev = ipaddress.ip_address(last)
            if prev.version == net.version and prev in net:
                start = int(prev) - base + 1
    # Scan forward from ``start``, wrapping once. Bounded by the number of addresses in
    # use plus the reserved ones, not by the size of the range, in the common case.
    for step in range(size):
        found = free((start + step) % size)
        if found is not None:
            return found
    raise CommandError(f"no free address left in {net}")
