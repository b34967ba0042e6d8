"""Policy events. The full text is kept so any past policy can be read back exactly."""

from __future__ import annotations

from typing import ClassVar

import msgspec

from ..upcast import Payload, register_upcaster
from .base import Event

__all__ = ["PolicyImpact", "PolicySet"]


class PolicyImpact(msgspec.Struct, frozen=True, kw_only=True):
    """What a policy change did to the tailnet, computed before it was appended.

    ``against_seq`` is the state it was computed against; pairs are (source node,
    destination node, protocol:ports) allowed before and not after (``pairs_lost``) or
    the other way round; ``netmaps_changed`` counts the nodes whose netmap changes, and
    ``nodes`` names the first of them (at most 50).
    """

    against_seq: int
    pairs_gained: int
    pairs_lost: int
    netmaps_changed: int
    nodes: tuple[str, ...] = ()


class PolicySet(Event, frozen=True, kw_only=True, tag="policy.set"):
    """The policy in force is now ``text`` (HuJSON). ``source``: ``"file"`` or ``"db"``.

    ``impact`` (schema 2): the impact summary ``policy set`` computed, when it did.
    """

    SCHEMA: ClassVar[int] = 2

    text: str
    sha256: str
    source: str = "db"
    impact: PolicyImpact | None = None


@register_upcaster("policy.set", 1)
def _v1_to_v2(payload: Payload) -> Payload:
    """Schema 1 had no impact summary."""
    return {**payload, "impact": None}
