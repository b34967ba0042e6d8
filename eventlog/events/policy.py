"""Policy events. The full text is kept so any past policy can be read back exactly."""

from __future__ import annotations

from .base import Event

__all__ = ["PolicySet"]


class PolicySet(Event, frozen=True, kw_only=True, tag="policy.set"):
    """The policy in force is now ``text`` (HuJSON). ``source``: ``"file"`` or ``"db"``."""

    text: str
    sha256: str
    source: str = "db"
