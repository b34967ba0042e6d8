"""``POST /verify``: admission of clients to an external DERP relay.

Tailscale's own ``derper`` run with ``--verify-client-url https://<server>/verify``
asks, for every client that connects, whether its node key may use the relay: it posts
a ``tailcfg.DERPAdmitClientRequest`` (``{"NodePublic": "nodekey:<hex>", "Source":
"<ip>"}``) and admits the client when the answer says ``{"Allow": true}``, as Headscale
answers it. We allow exactly what our own relay admits: the key of a registered node
whose key has not expired (or been logged out). A malformed request gets a 400 and
changes nothing; reading is all this does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from quart import Response, request

from projections.tailcfg import KeyFormatError, KeyPrefix, parse_key

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from projections import Tailnet

__all__ = ["DERPAdmitClientRequest", "DERPAdmitClientResponse", "install_verify_route", "may_use_relay"]

#: A request body larger than this is refused (a key and an address fit in far less).
_MAX_BODY = 4096


class DERPAdmitClientRequest(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    node_public: str
    source: str = ""


class DERPAdmitClientResponse(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    allow: bool


def may_use_relay(tailnet: Tailnet, node_key_hex: str) -> bool:
    """Whether a node key belongs to a registered node whose key is in use."""
    node = tailnet.state.node_by_key(node_key_hex)
    return node is not None and not node.is_expired(tailnet.clock())


def install_verify_route(app: QuartTrio, *, tailnet: Tailnet) -> None:
    @app.post("/verify")
    async def verify() -> Response:
        body = await request.get_data(cache=False)
        if len(body) > _MAX_BODY:
            return Response("request too large\n", status=413, content_type="text/plain")
        try:
            req = msgspec.json.decode(body, type=DERPAdmitClientRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return Response(f"bad request: {exc}\n", status=400, content_type="text/plain")
        try:
            key = parse_key(KeyPrefix.NODE, req.node_public)
        except KeyFormatError:
            key = None
        if key is None:
            return Response("bad request: NodePublic is not a nodekey:<64 hex digits>\n", status=400,
                            content_type="text/plain")
        answer = DERPAdmitClientResponse(allow=may_use_relay(tailnet, key.hex()))
        return Response(msgspec.json.encode(answer), content_type="application/json")
