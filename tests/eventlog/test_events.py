"""The event catalogue: closed, uniquely tagged, versioned and upcastable."""

from __future__ import annotations

import typing
from typing import ClassVar

import msgspec
import pytest

import eventlog.events as events_pkg
from eventlog import EVENT_TYPES, UnknownEventError, decode_event, encode_event
from eventlog.events import Event, UserCreated
from eventlog.upcast import UPCASTERS, Payload, register_upcaster


def test_every_event_class_is_in_the_union_and_registered() -> None:
    union_members = set(typing.get_args(events_pkg.AnyEvent))
    exported = {
        obj
        for obj in vars(events_pkg).values()
        if isinstance(obj, type) and issubclass(obj, Event) and obj is not Event
    }
    assert exported == union_members
    assert set(EVENT_TYPES.values()) == union_members


def test_tags_are_unique_dotted_names() -> None:
    tags = [cls.type_name() for cls in EVENT_TYPES.values()]
    assert len(tags) == len(set(tags))
    for tag in tags:
        family, _, name = tag.partition(".")
        assert family and name, tag
        assert "__" not in tag and tag == tag.lower()


def test_events_are_frozen_and_keyword_only() -> None:
    ev = UserCreated(user_id=1, name="a")
    with pytest.raises(AttributeError):
        ev.name = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        UserCreated(1, "a")  # type: ignore[call-arg]


def test_schema_is_not_a_payload_field() -> None:
    data = encode_event(UserCreated(user_id=1, name="a"))
    assert b"SCHEMA" not in data
    assert msgspec.json.decode(data)["type"] == "user.created"


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(UnknownEventError):
        decode_event("user.created", 1, b'{"type":"user.created","user_id":1,"name":"a","x":1}')


def test_unknown_type_and_future_schema_are_refused() -> None:
    with pytest.raises(UnknownEventError, match="unknown event type"):
        decode_event("user.teleported", 1, b"{}")
    with pytest.raises(UnknownEventError, match="schema 9"):
        decode_event("user.created", 9, b'{"type":"user.created","user_id":1,"name":"a"}')


class _V2Probe(Event, frozen=True, kw_only=True, tag="user.created"):
    """Stand-in for a future shape of ``user.created``; used only to exercise upcasting."""

    SCHEMA: ClassVar[int] = 2


def test_upcaster_brings_an_old_payload_to_the_current_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """A v1 payload read by a build whose ``user.created`` is v2 goes through the
    registered upcaster before it is converted (and an old row's bytes stay intact)."""
    monkeypatch.setattr(UserCreated, "SCHEMA", 2)
    monkeypatch.setitem(UPCASTERS, ("user.created", 1), UPCASTERS.get(("user.created", 1), _noop))
    UPCASTERS.pop(("user.created", 1))

    @register_upcaster("user.created", 1)
    def v1_to_v2(payload: Payload) -> Payload:
        # v2 renamed nothing but requires a display name: default it from the name.
        out = dict(payload)
        out.setdefault("display_name", str(payload["name"]).title())
        return out

    try:
        old = b'{"type":"user.created","user_id":4,"name":"alice"}'
        ev = decode_event("user.created", 1, old)
        assert isinstance(ev, UserCreated)
        assert ev.display_name == "Alice"
        with pytest.raises(ValueError, match="already exists"):
            register_upcaster("user.created", 1)(v1_to_v2)
    finally:
        UPCASTERS.pop(("user.created", 1), None)


def _noop(payload: Payload) -> Payload:
    return payload
