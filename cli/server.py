"""``tailledger serve``: compose the log, the projections and the network services.

:func:`open_server` builds every service once, in dependency order, and yields them as
one frozen :class:`Services` record; nothing is filled in afterwards. One process, one
nursery. Start-up order is the dependency order:

1. the store, the log and its signer, the checkpoints, the projection runner and the
   command side (:class:`~projections.Tailnet`), the admin operations (opened before
   any task runs: a bad signing key or database password stops here);
2. the log's writer task, the chain check, the projection runner (which folds the
   backlog before it reports ready), the leader election and the head signer;
3. presence (restored from the side tables before anything reads it), the admin socket;
4. the network services (:mod:`cli.network`): the relay, the control logic with its
   SSH checks, route fail-over and auto-approvals, the DNS followers, the control port
   with the web app (:mod:`cli.web`) and ``/metrics``.

Shutdown is the reverse, by cancellation of the nursery. The settings of every service
come from :mod:`cli.settings`.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from eventlog import Actor, ActorKind, ChainError, EventLog, EventStore
from eventlog.audit import audit_log
from eventlog.events import ChainErrorsIgnored
from eventlog.headsigner import HeadSigner
from eventlog.sidetables import SideTables
from eventlog.signing import Signer, read_anchor
from projections import CheckpointStore, CommandError, ProjectionRunner, Tailnet
from projections.admin import AdminOps, Presence
from projections.derpmap import single_point_of_failure
from projections.policystate import PolicyCompiler
from projections.presence import PresenceTable
from protocol import ConnectionStats, public_key
from protocol.control import Control
from protocol.ha import PolicyAutoApprover, RouteFailover
from protocol.registrations import PendingRegistrations
from protocol.sshcheck import SshChecks
from relay.serve import RelayServer

from .adminsock import serve_admin_socket
from .api import ApiService, mount_api
from .audit import SigningKeyError, anchor_file, open_signer
from .config import Config
from .dnsapply import follow_dns
from .dnsrecords import sync_extra_records
from .fdlimit import raise_fd_limit
from .gcpolicy import manage_gc, set_mmap_threshold
from .leader import Leadership, while_leading
from .network import (
    DerpSources,
    EmbeddedRegion,
    load_noise_key,
    refresh_derp_map,
    replicas_of,
    serve_control_port,
    start_metrics,
    start_presence,
    start_relay,
    start_relay_mesh,
)
from .policyfile import watch_policy_file
from .register_web import RegisterPages, install_register_routes
from .settings import control_settings, pending_limits, tailnet_settings
from .sshcheck_web import install_ssh_check_routes
from .storage import open_leader_lock, open_side_tables, open_store, secure_data_dir
from .verify import install_verify_route
from .web import MetricSources, make_app

__all__ = ["Services", "open_server", "run_server"]

log = logging.getLogger("tailledger")


class ChainRefused(Exception):
    """The log does not verify; the server will not serve from it."""


@dataclass(frozen=True)
class Services:
    """A running ``tailledger serve``: every service, composed once by :func:`open_server`."""

    config: Config
    store: EventStore
    log: EventLog
    #: Presence and pending registrations, beside the log in its database.
    side: SideTables
    checkpoints: CheckpointStore
    runner: ProjectionRunner
    tailnet: Tailnet
    ops: AdminOps
    #: Whether this replica runs the run-once jobs (always, on SQLite).
    leadership: Leadership
    signing: HeadSigner
    presence: PresenceTable
    control: Control
    ssh_checks: SshChecks
    route_failover: RouteFailover
    auto_approver: PolicyAutoApprover
    #: The embedded DERP relay (``None`` with ``derp.server.enabled = false``).
    relay: RelayServer | None
    #: The admin HTTP API (:mod:`cli.api`) of the web app.
    api: ApiService
    #: The control port's counters.
    connection_stats: ConnectionStats
    #: The bound control port, and the server's Noise public key.
    port: int
    noise_public: bytes
    #: The bound port of ``/metrics`` (0 while not served).
    metrics_port: int
    #: This process among the replicas of one PostgreSQL log (random per start).
    replica_id: str


@asynccontextmanager
async def open_server(config: Config, *, ignore_chain_errors: bool = False) -> AsyncIterator[Services]:
    """Start every service of ``tailledger serve``; yield them once all serve; stop them
    all (by cancellation) when the block ends.

    Args:
        ignore_chain_errors: start although the log fails verification (the start is
            recorded as a ``log.chain_errors_ignored`` event).

    Raises:
        SigningKeyError: the signing key is unusable (before anything starts).
        ChainRefused: the log fails verification and ``ignore_chain_errors`` is not set.
    """
    secure_data_dir(config.data_path)
    signer = open_signer(config)
    store = open_store(config)
    event_log = EventLog(store)
    side = open_side_tables(config)
    leadership = Leadership(open_leader_lock(config))
    signing = HeadSigner(
        event_log,
        signer,
        every_events=config.audit.checkpoint_events,
        every_seconds=config.durations.checkpoint_interval,
        anchor_file=anchor_file(config),
    )
    checkpoints = CheckpointStore(config.data_path / "checkpoints.db", mac_key=signer.mac_key())
    runner = ProjectionRunner(event_log, checkpoints, check_links=not ignore_chain_errors)
    tailnet = Tailnet(event_log, runner)
    presence = PresenceTable()
    ops = AdminOps(tailnet, presence=partial(_presence, presence))
    ops.register("log.checkpoint", partial(_sign_now, signing))
    replica_id = secrets.token_hex(6)
    control: Control | None = None  # closed at the end once made
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(event_log.run)
            await _check_log(config, store, event_log, signer, ignore_chain_errors=ignore_chain_errors)
            await nursery.start(runner.run)
            await nursery.start(leadership.run)
            await nursery.start(while_leading, leadership, signing.run)
            if config.policy.mode == "file":
                ops.policy_mode = "file"
                await nursery.start(watch_policy_file, tailnet, Path(config.policy.path))
            await start_presence(nursery, presence, side, tailnet, replica_id)
            await nursery.start(
                partial(serve_admin_socket, group=config.admin.socket_group), config.admin_socket_path, ops
            )

            # The network services.
            relay = await start_relay(nursery, config, runner, side)
            derp = await DerpSources.read(config)
            region = EmbeddedRegion(config, relay, replica_id=replica_id if replicas_of(side) is not None else None)
            derp_map = derp.derp_map(config, region)
            if single_point_of_failure(derp_map):
                log.warning(
                    "the DERP map has a single relay: it is a single point of failure for NAT traversal; "
                    "add regions or mesh relays for production"
                )
            policy = PolicyCompiler(config.public_url, tailnet_settings(config))
            control = Control(
                tailnet, presence, control_settings(config, derp_map),
                pending=PendingRegistrations(side, tailnet, pending_limits(config)), policy=policy,
            )
            control.register_admin_ops(ops)
            ssh_checks = SshChecks(tailnet, lambda: control.public_url, period=policy.check_period)
            ssh_checks.register_admin_ops(ops)
            control.ssh_action = ssh_checks
            # Run-once jobs: only the elected replica fails routes over and collects
            # ephemeral nodes (every server on SQLite).
            control.leads = lambda: leadership.leading
            await nursery.start(control.run)
            # Subnet routers fail over when their primary goes offline (recorded as events).
            grace = config.durations.route_failover_grace
            route_failover = RouteFailover(
                tailnet, presence, control.policy, startup_grace=grace.total_seconds() if grace is not None else 0.0
            )
            await nursery.start(while_leading, leadership, route_failover.run)
            # So is recording the route approvals a policy change implies (an approval an
            # admin revoked meanwhile must not come back from a replica that saw the change late).
            auto_approver = PolicyAutoApprover(tailnet)
            await nursery.start(while_leading, leadership, auto_approver.run)
            # Every replica follows the extra DNS records file and the policy file (each
            # machine has its own copy): safe, since each appends only what makes the log
            # match the file, decided against the head with optimistic concurrency, so a
            # change of the file is appended once (tests/cli/test_replica_jobs.py).
            await nursery.start(sync_extra_records, config, tailnet)  # extra DNS records into the log
            await nursery.start(partial(follow_dns, config, runner, control))  # DNS set through the API
            key = await trio.to_thread.run_sync(load_noise_key, config.data_path)
            pages = RegisterPages(config, tailnet, control)
            api = ApiService(tailnet, ops, presence, config)

            async def log_head() -> int:
                return (await event_log.head()).seq

            app = make_app(
                folded_seq=lambda: runner.state.seq,
                log_head=log_head,
                install=(
                    partial(install_register_routes, pages=pages),
                    partial(install_ssh_check_routes, checks=ssh_checks, pages=pages),  # SSH check mode
                    partial(install_verify_route, tailnet=tailnet),  # derper --verify-client-url
                    partial(mount_api, service=api),
                ),
            )
            connection_stats = ConnectionStats()
            port = await serve_control_port(
                nursery, config, key=key, control=control, app=app, relay=relay, derp=derp, region=region,
                stats=connection_stats,
            )
            await start_relay_mesh(
                nursery, config, control=control, relay=relay, side=side, replica_id=replica_id, derp=derp, region=region
            )
            if config.derp.paths or config.derp.urls:
                interval = config.durations.derp_auto_update_interval
                if interval is not None:
                    nursery.start_soon(refresh_derp_map, config, control, region, interval.total_seconds())
            metrics_port = await start_metrics(
                nursery,
                config.metrics_listen_addr,
                MetricSources(
                    log=event_log, runner=runner, presence=presence, control=control,
                    connection_stats=connection_stats, relay=relay, api=api.stats,
                ),
            )
            log.info(
                "tailledger serving on %s (data in %s, log head %d)",
                config.public_url, config.data_path, runner.state.seq,
            )
            yield Services(
                config=config, store=store, log=event_log, side=side, checkpoints=checkpoints, runner=runner,
                tailnet=tailnet, ops=ops, leadership=leadership, signing=signing, presence=presence,
                control=control, ssh_checks=ssh_checks, route_failover=route_failover,
                auto_approver=auto_approver, relay=relay, api=api, connection_stats=connection_stats,
                port=port, noise_public=public_key(key), metrics_port=metrics_port, replica_id=replica_id,
            )
            nursery.cancel_scope.cancel()
    finally:
        if control is not None:
            control.close()
        checkpoints.close()
        side.close()
        store.close()


def _presence(table: PresenceTable, node_id: int) -> Presence | None:
    p = table.get(node_id)
    return Presence(online=p.online, last_seen=p.last_seen) if p is not None else Presence(online=False)


async def _sign_now(signing: HeadSigner, raw: dict[str, object], actor: Actor) -> object:
    """``tailledger log checkpoint``: sign the head now (if it is not signed yet)."""
    if raw:
        raise CommandError("bad arguments: log.checkpoint takes none")
    checkpoint = await signing.sign_head()
    if checkpoint is None:
        raise CommandError("the log is empty: there is nothing to sign yet")
    log.info("%s signed the log head on demand: seq %d", actor, checkpoint.seq)
    return {"n": checkpoint.n, "seq": checkpoint.seq, "hash": checkpoint.hash, "anchor": checkpoint.anchor_line()}


async def _check_log(
    config: Config, store: EventStore, event_log: EventLog, signer: Signer, *, ignore_chain_errors: bool
) -> None:
    """Verify the log from the last verified signed checkpoint (and the anchor kept
    beside the key); refuse to go on unless told to ignore what is found.

    Raises:
        ChainRefused: the log fails and ``ignore_chain_errors`` is not set.
    """
    anchor = read_anchor(anchor_file(config))
    report = await trio.to_thread.run_sync(
        partial(
            audit_log,
            store,
            public_key=signer.public_key,
            anchors=[anchor] if anchor is not None else [],
            from_last_checkpoint=True,
        )
    )
    if report.ok:
        return
    message = f"the event log fails verification at seq {report.first_bad}: {report.reason}"
    if not ignore_chain_errors:
        raise ChainRefused(
            f"refusing to serve: {message}. Run 'tailledger log verify' to see all of it; "
            "'tailledger serve --ignore-chain-errors' starts anyway and records that it did."
        )
    log.error("%s; starting anyway (--ignore-chain-errors), and recording that", message)
    assert report.first_bad is not None
    await event_log.append(
        [
            ChainErrorsIgnored(
                first_bad=report.first_bad,
                reason=report.reason or "",
                head_seq=report.head_seq,
                head_hash=report.head_hash,
            )
        ],
        actor=Actor(kind=ActorKind.ADMIN, id=_local_user()),
        reason="serve --ignore-chain-errors",
    )


def _local_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid{os.geteuid()}"


def run_server(config: Config, *, ignore_chain_errors: bool = False) -> int:
    """Run until SIGINT/SIGTERM; return the exit code."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    os.umask(0o077)  # everything the server creates is private to its account
    # One socket per connected node (and per relay client): a Python process starts
    # with the soft limit of 1,024 where Go would have raised it (cli/fdlimit.py).
    problem = raise_fd_limit(config.limits.max_connections, remedy="or lower limits.max_connections")
    if problem:
        log.warning("%s; connections beyond that fail at accept", problem)
    if config.tuning.malloc_mmap_threshold and not set_mmap_threshold(config.tuning.malloc_mmap_threshold):
        log.info("tuning.malloc_mmap_threshold: not glibc, left to the C library")

    async def main() -> None:
        # At a signal the whole task tree is cancelled at once.
        with trio.CancelScope() as everything:
            async with open_server(config, ignore_chain_errors=ignore_chain_errors), trio.open_nursery() as nursery:
                if config.tuning.gc_freeze:
                    await nursery.start(manage_gc)
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("received %s, shutting down", signal.Signals(signum).name)
                        everything.cancel()
                        break

    try:
        trio.run(main)
    except SigningKeyError as exc:
        log.error("%s", exc)
        print(f"tailledger: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        refused = group.subgroup(lambda e: isinstance(e, ChainRefused | ChainError | SigningKeyError))
        if refused is None:
            raise
        first = refused.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        text = str(first)
        if isinstance(first, ChainError):
            text = (
                f"refusing to serve: the event log fails verification at seq {first.seq}: "
                f"{first.reason}. Run 'tailledger log verify'."
            )
        log.error("%s", text)
        print(f"tailledger: {text}", file=sys.stderr)
        return 1
    return 0


