"""The admin HTTP API on the control port: ``/api/v1`` (Headscale's REST API), ``/api/v2``
(a subset of Tailscale's API, with OAuth clients), ``/version``, and the OpenAPI
document at ``/api/v1/openapi.json`` with its reference page at ``/api/v1/docs``.

See :mod:`cli.api.core` for authentication, permissions and errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily

from .core import ApiService, ApiStats, Ctx, Route
from .openapi import openapi_document, reference_page
from .schema import Version
from .v1 import add_v1_routes
from .v2 import add_v2_routes

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from quart_trio import QuartTrio

__all__ = ["ApiService", "ApiStats", "api_metrics", "mount_api"]


def mount_api(app: QuartTrio, *, service: ApiService) -> None:
    """Add every route of the API (``/version``, the OpenAPI document, v1, v2) to
    ``service`` and serve them on ``app``."""

    async def version(ctx: Ctx) -> Version:
        return Version(version=ctx.service.version, api=["v1", "v2"])

    async def openapi(ctx: Ctx) -> object:
        return openapi_document(ctx.service)

    async def docs(ctx: Ctx) -> str:
        return reference_page(openapi_document(ctx.service))

    service.add(Route(method="GET", path="/version", handler=version, operation_id="version",
                      summary="The server's version", response=Version, auth=False, tags=("Meta",)))
    service.add(Route(method="GET", path="/api/v1/openapi.json", handler=openapi, operation_id="openapi",
                      summary="This OpenAPI document", auth=False, tags=("Meta",)))
    service.add(Route(method="GET", path="/api/v1/docs", handler=docs, operation_id="docs",
                      summary="The reference page of this API", auth=False, tags=("Meta",),
                      content_type="text/html; charset=utf-8"))
    add_v1_routes(service)
    add_v2_routes(service)
    service.mount(app)


def api_metrics(stats: ApiStats) -> Iterator[Metric]:
    """``tailledger_api_requests_total{route,method,status}``, the time spent,
    ``tailledger_api_node_lists_built_total{route}`` and
    ``tailledger_api_node_list_bytes_total{encoding}``."""
    requests = CounterMetricFamily(
        "tailledger_api_requests", "Admin API requests by route template, method and status",
        labels=["route", "method", "status"],
    )
    for (route, method, status), count in sorted(stats.requests.items()):
        requests.add_metric([route, method, str(status)], count)
    yield requests
    seconds = CounterMetricFamily(
        "tailledger_api_request_seconds", "Time spent answering admin API requests, by route template and method",
        labels=["route", "method"],
    )
    for (route, method), total in sorted(stats.seconds.items()):
        seconds.add_metric([route, method], total)
    yield seconds
    yield _by_label(
        "tailledger_api_node_lists_built", "Node lists the admin API built, by route template; "
        "the other list requests were answered with a kept list (nothing changed since)",
        "route", stats.node_lists_built,
    )
    yield _by_label(
        "tailledger_api_node_list_bytes", "Bytes of node list bodies the admin API sent, by content coding "
        "(gzip for clients that accept it, identity otherwise)",
        "encoding", stats.node_list_bytes,
    )


def _by_label(name: str, documentation: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter with one ``label``: a value per label value, sorted."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family
