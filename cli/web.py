"""The HTTP side of the server (Quart on trio): health, the register page, metrics.

:func:`make_app` is served by hypercorn on the control port for every request that is
not ``/key`` or ``/ts2021`` (see :mod:`protocol.serve`):

* ``GET /health`` — 200 with the log head while the projection is current, 503 while it
  is still folding the backlog (load balancers should wait), and 503 with
  ``"status": "database-unavailable"`` while the log's database cannot be reached
  (PostgreSQL down: the server retries with back-off and recovers by itself).
* the routes that :func:`cli.server.open_server` has the app install: ``/register/<id>``,
  the page a client's AuthURL points to, and the OIDC sign-in behind it
  (:mod:`cli.register_web`); ``/ssh/check/<id>`` (:mod:`cli.sshcheck_web`); ``/verify``
  (:mod:`cli.verify`); the admin HTTP API (:mod:`cli.api`).

:func:`serve_metrics` serves ``GET /metrics`` (Prometheus text format) on its own
address, ``metrics_listen_addr`` (``127.0.0.1:9090`` by default, as Headscale): never
on the public control port, where anyone could read the tailnet's size and activity.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from quart import Response
from quart_trio import QuartTrio

from eventlog import EventLog, EventLogError
from projections import ProjectionRunner
from projections.presence import PresenceTable
from protocol import ConnectionStats
from protocol.control import Control
from relay.serve import RelayServer

from .api import ApiStats, api_metrics

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from protocol.control import ControlStats
    from protocol.registrations import PendingStats

__all__ = ["MetricSources", "make_app", "make_metrics_app", "metrics_registry", "serve_metrics"]


@dataclass(frozen=True)
class MetricSources:
    """What ``/metrics`` reads, live, at scrape time."""

    log: EventLog
    runner: ProjectionRunner
    presence: PresenceTable
    control: Control
    #: The control port's counters.
    connection_stats: ConnectionStats
    relay: RelayServer | None
    api: ApiStats


class _Collector(Collector):
    """Reads the live figures at scrape time (no background updating)."""

    def __init__(self, sources: MetricSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        state = s.runner.state
        yield GaugeMetricFamily("tailledger_log_head_seq", "Sequence number of the last folded event", value=state.seq)
        yield CounterMetricFamily("tailledger_log_appends", "Append requests committed by this server", value=s.log.appended)
        yield CounterMetricFamily("tailledger_log_commits", "Transactions committed by this server (group commits)", value=s.log.commits)
        yield CounterMetricFamily("tailledger_events_folded", "Events folded by the projection runner", value=s.runner.events_folded)
        yield GaugeMetricFamily("tailledger_users", "Users", value=len(state.users))
        yield GaugeMetricFamily("tailledger_nodes", "Registered nodes", value=len(state.nodes))
        online = sum(1 for _, p in s.presence.items() if p.online)
        yield GaugeMetricFamily("tailledger_nodes_online", "Nodes with an open map stream", value=online)
        yield GaugeMetricFamily("tailledger_map_streams", "Open map long-polls", value=s.control.streams.streams_open)
        stats = s.control.streams.hub.stats
        updates = CounterMetricFamily(
            "tailledger_map_updates",
            "Netmap versions computed, by path: incremental (only the changed nodes"
            " re-evaluated per visibility class) or rebuild (policy, users or routes)",
            labels=["path"],
        )
        updates.add_metric(["incremental"], stats.incremental)
        updates.add_metric(["rebuild"], stats.rebuilds)
        yield updates
        yield CounterMetricFamily(
            "tailledger_map_peer_evaluations", "Peer views evaluated by the policy engine",
            value=stats.peer_evaluations,
        )
        yield GaugeMetricFamily(
            "tailledger_map_visibility_classes", "Distinct visibility classes", value=s.control.streams.hub.classes()
        )
        yield from _control_limit_metrics(s.control.stats)
        yield from _pending_metrics(s.control.pending.stats)
        yield from _connection_metrics(s.connection_stats)
        if s.relay is not None:
            yield from _relay_metrics(s.relay)
        yield from api_metrics(s.api)


def _counts(name: str, documentation: str, label: str, counts: Iterable[tuple[str, int]]) -> CounterMetricFamily:
    """A counter with one ``label``, a value per label value (in the order given)."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts:
        family.add_metric([value], count)
    return family


def _control_limit_metrics(stats: ControlStats) -> Iterator[Metric]:
    """What the ``[limits]`` of map streams and node updates refused or dropped."""
    yield _counts(
        "tailledger_control_refused",
        "Node requests refused by a limit, by reason: hostinfo_too_large, too_many_routes"
        " (refused whole), rate_limited (log-writing updates over the per-node rate),"
        " expired_node (Hostinfo of an expired or logged-out node, ignored)",
        "reason",
        (
            ("hostinfo_too_large", stats.hostinfo_too_large),
            ("too_many_routes", stats.too_many_routes),
            ("rate_limited", stats.updates_rate_limited),
            ("expired_node", stats.expired_updates_ignored),
        ),
    )
    yield CounterMetricFamily(
        "tailledger_control_hostnames_cleaned",
        "Host names cut to limits.max_hostname_length or cleaned of control characters",
        value=stats.hostnames_cleaned,
    )
    yield CounterMetricFamily(
        "tailledger_map_streams_superseded", "Map long-polls ended by a newer one of the same node",
        value=stats.streams_superseded,
    )
    yield _counts(
        "tailledger_map_keepalives",
        "Keep-alives sent to idle map streams, by path: direct (the transport sent it to the"
        " parked stream at once, no task) or resumed (the stream was resumed and sent it)",
        "path",
        (("direct", stats.keepalives_direct), ("resumed", stats.keepalives_resumed)),
    )
    yield CounterMetricFamily(
        "tailledger_map_updates_direct",
        "Map updates sent to parked streams by their transport at once (no task, no resumption)",
        value=stats.updates_direct,
    )


def _pending_metrics(stats: PendingStats) -> Iterator[Metric]:
    """Pending interactive registrations: how many, refusals by cap, outcomes."""
    yield GaugeMetricFamily(
        "tailledger_pending_registrations",
        "Interactive registrations waiting for an admin (rejected ones until they expire)",
        value=stats.current,
    )
    yield _counts(
        "tailledger_pending_registrations_refused",
        "Interactive registration requests refused by a cap (limits.pending_registrations_*)",
        "cap",
        sorted(stats.refused.items()),
    )
    yield _counts(
        "tailledger_pending_registrations_ended",
        "Interactive registration requests approved, rejected or expired",
        "outcome",
        (("approved", stats.approved), ("rejected", stats.rejected), ("expired", stats.expired)),
    )


def _connection_metrics(stats: ConnectionStats) -> Iterator[Metric]:
    """The control port's connection limits (``[limits]``, protocol/serve/)."""
    yield GaugeMetricFamily("tailledger_connections_open", "Connections open on the control port", value=stats.open)
    yield CounterMetricFamily(
        "tailledger_connections_accepted", "Connections accepted on the control port", value=stats.accepted
    )
    yield _counts(
        "tailledger_connections_refused",
        "Connections closed at accept by a connection cap (limits.max_connections*)",
        "reason",
        stats.refused.items(),
    )
    yield _counts(
        "tailledger_connection_timeouts",
        "Deadlines that fired on the control port, by kind (limits.*_timeout)",
        "kind",
        stats.timeouts.items(),
    )
    yield _counts(
        "tailledger_slow_readers_closed",
        "Connections closed because they did not take what was sent"
        " (limits.max_outgoing_buffer, limits.write_timeout)",
        "reason",
        stats.slow_readers.items(),
    )


def _relay_metrics(relay: RelayServer) -> Iterator[Metric]:
    """The embedded relay's counters: ``tailledger_relay_<field>`` (DERP core),
    ``tailledger_relay_http_<field>`` (its HTTP front door), ``tailledger_relay_stun_<field>``
    and, per drop reason, ``tailledger_relay_drops{reason=...}`` / ``..._bytes_dropped``.
    """
    stats = relay.stats()
    for name in stats.__struct_fields__:
        value = getattr(stats, name)
        if isinstance(value, int | float):
            yield GaugeMetricFamily(f"tailledger_relay_{name}", f"DERP relay: {name}", value=value)
        elif isinstance(value, dict):
            family = GaugeMetricFamily(f"tailledger_relay_{name}", f"DERP relay: {name} by reason", labels=["reason"])
            for reason, count in sorted(value.items()):
                family.add_metric([str(reason)], count)
            yield family
    http = relay.http_stats()
    for name in http.__struct_fields__:
        yield GaugeMetricFamily(f"tailledger_relay_http_{name}", f"DERP relay HTTP front: {name}", value=getattr(http, name))
    if relay.stun is not None:
        stun = relay.stun.stats()
        for name in stun.__struct_fields__:
            yield GaugeMetricFamily(f"tailledger_relay_stun_{name}", f"STUN server: {name}", value=getattr(stun, name))


def metrics_registry(sources: MetricSources) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_Collector(sources))
    Gauge("tailledger_info", "Build information", ["version"], registry=registry).labels("0.1.0").set(1)
    return registry


def make_app(
    *,
    folded_seq: Callable[[], int],
    log_head: Callable[[], Awaitable[int]],
    install: Iterable[Callable[[QuartTrio], object]],
) -> QuartTrio:
    """The app of the control port: ``/health``, then the routes each of ``install`` adds.

    Args:
        folded_seq: the sequence number the projection has folded up to.
        log_head: the log head's sequence number (raises
            :class:`~eventlog.EventLogError` while the database is unreachable).
        install: add their routes to the app (the register pages, SSH checks,
            ``/verify``, the admin API).
    """
    app = QuartTrio("tailledger")

    @app.get("/health")
    async def health() -> tuple[dict[str, object], int]:
        folded = folded_seq()
        try:
            head = await log_head()
        except EventLogError as exc:  # the database is unreachable (the store retries)
            return {"status": "database-unavailable", "error": str(exc), "folded_seq": folded}, 503
        ok = folded >= head
        return {"status": "ok" if ok else "catching-up", "log_seq": head, "folded_seq": folded}, 200 if ok else 503

    for add_routes in install:
        add_routes(app)
    return app


def make_metrics_app(sources: MetricSources) -> QuartTrio:
    """The app of the metrics address: ``GET /metrics`` and nothing else."""
    app = QuartTrio("tailledger-metrics")
    registry = metrics_registry(sources)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), content_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def serve_metrics(
    sources: MetricSources, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve :func:`make_metrics_app` on ``host:port`` until cancelled; report the bound port.

    Raises:
        OSError: the address cannot be bound (raised before ``task_status.started``).
    """
    import socket

    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve

    # Bind here, so that a taken address is a plain OSError for the caller; hypercorn
    # then takes the socket over by its descriptor.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # connections queue from now on, before hypercorn accepts
    except BaseException:
        sock.close()
        raise
    bound: int = sock.getsockname()[1]
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    task_status.started(bound)
    await serve(make_metrics_app(sources), config)
