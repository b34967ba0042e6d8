"""The network services of ``tailledger serve`` (HTTP, control protocol, relay)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from .web import make_app

if TYPE_CHECKING:
    from .server import Server

__all__ = ["start_network"]


async def start_network(server: Server, nursery: trio.Nursery) -> None:
    host, port = server.config.listen
    hc = HypercornConfig()
    hc.bind = [f"{host}:{port}"]
    hc.accesslog = None
    app = make_app(server)
    await nursery.start(serve, app, hc)
