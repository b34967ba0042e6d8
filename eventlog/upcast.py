"""Upcasters: how old event payloads are brought to the current shape at read time.

History is never edited. When a shipped event's shape changes, its class bumps
``SCHEMA`` and an upcaster from the previous version is registered here. Upcasters are
pure ``dict -> dict`` functions applied to the raw decoded payload, in order, before the
payload is converted into the current class; consumers only ever see the latest shape.
The hash chain covers the stored bytes, so upcasting never affects verification.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

__all__ = ["UPCASTERS", "Payload", "Upcaster", "register_upcaster", "upcast"]

# A raw decoded payload. ``object`` (not ``Any``) keeps the strict typing honest: an
# upcaster has to check what it reads.
Payload = dict[str, object]
Upcaster = Callable[[Payload], Payload]

UPCASTERS: Final[dict[tuple[str, int], Upcaster]] = {}


def register_upcaster(event_type: str, from_schema: int) -> Callable[[Upcaster], Upcaster]:
    """Register ``fn`` as the upcaster of ``event_type`` from ``from_schema`` to the next."""

    def decorate(fn: Upcaster) -> Upcaster:
        key = (event_type, from_schema)
        if key in UPCASTERS:
            raise ValueError(f"an upcaster for {event_type} v{from_schema} already exists")
        UPCASTERS[key] = fn
        return fn

    return decorate


def upcast(event_type: str, schema: int, target: int, payload: Payload) -> Payload:
    """Apply the registered upcasters to take ``payload`` from ``schema`` to ``target``.

    Raises:
        KeyError: a step has no upcaster.
    """
    while schema < target:
        payload = UPCASTERS[(event_type, schema)](payload)
        schema += 1
    return payload


@register_upcaster("node.tags_set", 1)
def _node_tags_set_v1(payload: Payload) -> Payload:
    """v2 added ``user_id`` (the new owner when tags are cleared); v1 had none."""
    return payload
