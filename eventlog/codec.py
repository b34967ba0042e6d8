"""Encoding events to stored bytes and decoding stored rows back to events.

One module-level encoder and decoder serve the whole process (msgspec's advice). Rows
whose schema is older than the class's ``SCHEMA`` take the slow path through the
upcasters; rows from the future (a newer build wrote them) are refused rather than
misread.
"""

from __future__ import annotations

from typing import Final

import msgspec

from .errors import UnknownEventError
from .events import EVENT_TYPES, AnyEvent, Event
from .upcast import Payload, upcast

__all__ = ["decode_event", "encode_event"]

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(AnyEvent)


def encode_event(event: Event) -> bytes:
    """The stored form of ``event``: compact JSON including its ``type`` tag."""
    return _encoder.encode(event)


def decode_event(type_: str, schema: int, data: bytes) -> AnyEvent:
    """Decode a stored payload of ``type_`` written at ``schema``.

    Raises:
        UnknownEventError: unknown type, a schema newer than this build, or a payload
            that does not fit the class.
    """
    cls = EVENT_TYPES.get(type_)
    if cls is None:
        raise UnknownEventError(f"unknown event type {type_!r}")
    try:
        if schema == cls.SCHEMA:
            decoded: AnyEvent = _decoder.decode(data)
            return decoded
        if schema > cls.SCHEMA:
            raise UnknownEventError(
                f"{type_} was written with schema {schema}; this build knows up to {cls.SCHEMA}"
            )
        raw = msgspec.json.decode(data, type=Payload)
        converted: AnyEvent = msgspec.convert(
            upcast(type_, schema, cls.SCHEMA, raw), type=AnyEvent
        )
        return converted
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
        raise UnknownEventError(f"cannot decode {type_} v{schema}: {exc}") from exc
