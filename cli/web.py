"""The HTTP side of the server (Quart on trio): health, metrics, the register page."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart_trio import QuartTrio

if TYPE_CHECKING:
    from .server import Server

__all__ = ["make_app"]


def make_app(server: Server) -> QuartTrio:
    app = QuartTrio("tailledger")

    @app.get("/health")
    async def health() -> tuple[dict[str, object], int]:
        head = server.runner.state.seq
        return {"status": "ok", "log_seq": head}, 200

    return app
