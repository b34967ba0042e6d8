"""Primary subnet-route election (route high availability).

Role in the pipeline: input to peer ``AllowedIPs``/``PrimaryRoutes``. When
several nodes serve (advertise *and* have approved) the same subnet prefix,
exactly one of them -- the primary -- carries it in peers' AllowedIPs.

Rule: the previous primary keeps the prefix while it still serves it
(stickiness, so failover does not flap); otherwise the node with the lowest
id wins. Node ids increase with registration, so on a fresh tailnet this is
the hosted control plane's "first advertiser is primary". Exit routes
(``0.0.0.0/0``, ``::/0``) are never elected: every approved exit node
carries them.
"""

from __future__ import annotations

from collections.abc import Mapping

from .ipset import Prefix
from .tailnet import Tailnet

__all__ = ["elect_primaries", "primary_routes_by_node"]


def elect_primaries(
    tailnet: Tailnet, previous: Mapping[Prefix, int] | None = None
) -> dict[Prefix, int]:
    """Map each served subnet prefix to the id of its primary router.

    Args:
        tailnet: the nodes.
        previous: the last election's result, for stickiness (optional).

    Returns:
        prefix -> node id, deterministic for a given input.
    """
    candidates: dict[Prefix, list[int]] = {}
    for info in tailnet.iter_nodes():
        for route in info.subnet_routes:
            candidates.setdefault(route, []).append(info.id)
    out: dict[Prefix, int] = {}
    for prefix, ids in candidates.items():
        prior = previous.get(prefix) if previous else None
        out[prefix] = prior if prior is not None and prior in ids else min(ids)
    return out


def primary_routes_by_node(primaries: Mapping[Prefix, int]) -> dict[int, tuple[Prefix, ...]]:
    """Invert an election: node id -> the prefixes it is primary for."""
    out: dict[int, list[Prefix]] = {}
    for prefix, node_id in primaries.items():
        out.setdefault(node_id, []).append(prefix)
    return {k: tuple(sorted(v)) for k, v in out.items()}
