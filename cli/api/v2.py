"""``/api/v2``: a subset of Tailscale's API (the tailnet is always ``-``)."""

from __future__ import annotations

from .core import ApiService

__all__ = ["add_v2_routes"]


def add_v2_routes(service: ApiService) -> None:
    """Register the v2 routes."""
