"""The base class of every event payload.

An event is a fact in the past tense (``node.registered``), a frozen, keyword-only msgspec
Struct tagged with a stable dotted name. The tag, never a Python path, is what the store
records, so classes can be renamed or moved without orphaning stored rows.

Each concrete class declares ``SCHEMA``: the version of its payload shape. The store
copies it into the envelope (it is not a payload field); a change of shape bumps it and
registers an upcaster from the previous version (see :mod:`eventlog.upcast`).
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

__all__ = ["Event"]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=True):
    """Base of all event payloads. Subclasses repeat ``frozen=True, kw_only=True``."""

    SCHEMA: ClassVar[int] = 1

    @classmethod
    def type_name(cls) -> str:
        """The stable tag this event is stored under."""
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str), f"{cls.__name__} has no string tag"
        return tag
