"""Request bodies in, answers out: the JSON the control handler reads and writes.

Both ``/machine/register`` and ``/machine/map`` carry a JSON body with the client's
capability version and node key (:func:`decode_keyed`); an undecodable body, a client
older than :data:`MIN_CAPABILITY_VERSION` or a malformed node key is answered with an
HTTP error (:func:`http_error`). Everything else a user should see about a registration
is answered as HTTP 200 with ``Error`` set (:func:`register_error`, :func:`rejected`):
the client shows it. A successful registration answers the node's user and login
(:func:`register_response`).

Pure: no state, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import msgspec

from projections.state import Node, TailnetState
from projections.tailcfg import (
    KeyFormatError,
    KeyPrefix,
    Login,
    MapRequest,
    RegisterRequest,
    RegisterResponse,
    User,
    encode,
    parse_key,
)

from ..handler import NoiseResponse

__all__ = [
    "JSON",
    "MIN_CAPABILITY_VERSION",
    "decode_keyed",
    "http_error",
    "register_error",
    "register_response",
    "rejected",
]

#: Clients older than this are refused (Headscale's floor: v1.80).
MIN_CAPABILITY_VERSION = 113

#: The headers of a JSON answer.
JSON = (("content-type", "application/json"),)


def register_response(state: TailnetState, node: Node, **extra: object) -> NoiseResponse:
    """The answer to a registration that ended with ``node`` registered."""
    user = state.users.get(node.user_id)
    name = user.name if user else "tagged-devices"
    display = (user.display_name if user else "") or name
    body = RegisterResponse(
        user=User(id=node.user_id, display_name=display, created=user.created_at if user else None),
        login=Login(
            id=node.user_id, login_name=user.login_name if user else name, display_name=display
        ),
        machine_authorized=True,
        **extra,  # type: ignore[arg-type]
    )
    return NoiseResponse(200, JSON, encode(body))


def register_error(message: str) -> NoiseResponse:
    """A refused registration: HTTP 200 with ``Error`` set (the client shows it)."""
    return NoiseResponse(200, JSON, encode(RegisterResponse(error=message)))


def rejected(reason: str) -> NoiseResponse:
    """An interactive registration an administrator rejected."""
    why = f": {reason}" if reason else ""
    return register_error(f"an administrator rejected this machine's registration{why}")


def http_error(status: int, message: str) -> NoiseResponse:
    """A plain-text HTTP error (a request the client cannot show an ``Error`` for)."""
    return NoiseResponse(
        status, (("content-type", "text/plain; charset=utf-8"),), message.encode() + b"\n"
    )


_Keyed = TypeVar("_Keyed", RegisterRequest, MapRequest)


def decode_keyed(
    body: bytes, decode: Callable[[bytes], _Keyed], what: str
) -> tuple[_Keyed, bytes | None] | NoiseResponse:
    """Decode a register or map body and its node key; an HTTP error if unusable."""
    try:
        req = decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return http_error(400, f"invalid {what} request: {exc}")
    if req.version < MIN_CAPABILITY_VERSION:
        return http_error(400, f"unsupported client version: capability {req.version}")
    try:
        return req, parse_key(KeyPrefix.NODE, req.node_key)
    except KeyFormatError as exc:
        return http_error(400, str(exc))
