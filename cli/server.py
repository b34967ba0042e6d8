"""``tailledger serve``: compose the log, the projections and the network services.

One process, one nursery. Start-up order is the dependency order: the log's writer
task, the projection runner (which folds the backlog before it reports ready), then the
services that read the projection (admin socket, control protocol, relay). Shutdown is
the reverse, by cancellation of the nursery.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import signal
import sys
from functools import partial
from pathlib import Path

import trio

from eventlog import Actor, ActorKind, ChainError, EventLog
from eventlog.audit import audit_log
from eventlog.events import ChainErrorsIgnored
from eventlog.headsigner import HeadSigner
from eventlog.signing import read_anchor
from projections import CheckpointStore, CommandError, ProjectionRunner, Tailnet
from projections.admin import AdminOps, Presence
from projections.presence import PresenceTable
from protocol import ConnectionStats
from protocol.control import Control
from protocol.ha import PolicyAutoApprover, RouteFailover
from protocol.sshcheck import SshChecks
from relay.serve import RelayServer

from .adminsock import serve_admin_socket
from .api import ApiService
from .audit import SigningKeyError, anchor_file, open_signer
from .config import Config
from .gcpolicy import manage_gc
from .leader import Leadership, while_leading
from .storage import open_leader_lock, open_side_tables, open_store

__all__ = ["Server"]

log = logging.getLogger("tailledger")


class ChainRefused(Exception):
    """The log does not verify; the server will not serve from it."""


class Server:
    """A running tailledger server (built from a :class:`Config`).

    Args:
        ignore_chain_errors: start although the log fails verification (the start is
            recorded as a ``log.chain_errors_ignored`` event).
    """

    def __init__(self, config: Config, *, ignore_chain_errors: bool = False) -> None:
        self.config = config
        self.ignore_chain_errors = ignore_chain_errors
        secure_data_dir(config.data_path)
        self.signer = open_signer(config)
        self.store = open_store(config)
        self.log = EventLog(self.store)
        #: Presence and pending registrations, beside the log in its database.
        self.side = open_side_tables(config)
        #: This process among the replicas of one PostgreSQL log (random per start).
        self.replica_id = secrets.token_hex(6)
        #: Whether this replica runs the run-once jobs (always, on SQLite).
        self.leadership = Leadership(open_leader_lock(config))
        self.signing = HeadSigner(
            self.log,
            self.signer,
            every_events=config.audit.checkpoint_events,
            every_seconds=config.durations.checkpoint_interval,
            anchor_file=anchor_file(config),
        )
        self.checkpoints = CheckpointStore(config.data_path / "checkpoints.db", mac_key=self.signer.mac_key())
        self.runner = ProjectionRunner(self.log, self.checkpoints, check_links=not ignore_chain_errors)
        self.tailnet = Tailnet(self.log, self.runner)
        self.presence: PresenceTable | None = None
        self.ops = AdminOps(self.tailnet, presence=self._presence)
        self.ops.register("log.checkpoint", self._sign_now)
        self.control: Control | None = None
        self.relay: RelayServer | None = None
        self.connection_stats: ConnectionStats | None = None  # the control port's counters
        self.route_failover: RouteFailover | None = None
        self.auto_approver: PolicyAutoApprover | None = None
        self.ssh_checks: SshChecks | None = None
        self.noise_public = b""
        self.port = 0
        #: The admin HTTP API (``cli.api``), once the web app is made.
        self.api: ApiService | None = None
        #: The bound port of ``/metrics`` (0 while not served).
        self.metrics_port = 0

    async def _sign_now(self, raw: dict[str, object], actor: Actor) -> object:
        """``tailledger log checkpoint``: sign the head now (if it is not signed yet)."""
        if raw:
            raise CommandError("bad arguments: log.checkpoint takes none")
        checkpoint = await self.signing.sign_head()
        if checkpoint is None:
            raise CommandError("the log is empty: there is nothing to sign yet")
        log.info("%s signed the log head on demand: seq %d", actor, checkpoint.seq)
        return {"n": checkpoint.n, "seq": checkpoint.seq, "hash": checkpoint.hash, "anchor": checkpoint.anchor_line()}

    def secure_files(self) -> None:
        """Make every file of the data directory private (0600), once they all exist."""
        secure_data_dir(self.config.data_path)

    def _presence(self, node_id: int) -> Presence | None:
        if self.presence is None:
            return None
        p = self.presence.get(node_id)
        return Presence(online=p.online, last_seen=p.last_seen) if p is not None else Presence(online=False)

    async def check_log(self) -> None:
        """Verify the log from the last verified signed checkpoint (and the anchor kept
        beside the key); refuse to go on unless told to ignore what is found.

        Raises:
            ChainRefused: the log fails and ``ignore_chain_errors`` is not set.
        """
        anchor = read_anchor(anchor_file(self.config))
        report = await trio.to_thread.run_sync(
            partial(
                audit_log,
                self.store,
                public_key=self.signer.public_key,
                anchors=[anchor] if anchor is not None else [],
                from_last_checkpoint=True,
            )
        )
        if report.ok:
            return
        message = f"the event log fails verification at seq {report.first_bad}: {report.reason}"
        if not self.ignore_chain_errors:
            raise ChainRefused(
                f"refusing to serve: {message}. Run 'tailledger log verify' to see all of it; "
                "'tailledger serve --ignore-chain-errors' starts anyway and records that it did."
            )
        log.error("%s; starting anyway (--ignore-chain-errors), and recording that", message)
        assert report.first_bad is not None
        await self.log.append(
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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.log.run)
                await self.check_log()
                await nursery.start(self.runner.run)
                await nursery.start(self.leadership.run)
                await nursery.start(while_leading, self.leadership, self.signing.run)
                if self.config.policy.mode == "file":
                    from .policyfile import watch_policy_file

                    self.ops.policy_mode = "file"
                    await nursery.start(watch_policy_file, self.tailnet, Path(self.config.policy.path))
                await nursery.start(
                    partial(serve_admin_socket, group=self.config.admin.socket_group),
                    self.config.admin_socket_path,
                    self.ops,
                )
                await self._start_network(nursery)
                log.info(
                    "tailledger serving on %s (data in %s, log head %d)",
                    self.config.public_url, self.config.data_path, self.runner.state.seq,
                )
                task_status.started()
        finally:
            if self.control is not None:
                self.control.close()
            self.checkpoints.close()
            self.side.close()
            self.store.close()

    async def _start_network(self, nursery: trio.Nursery) -> None:
        from .network import start_network

        await start_network(self, nursery)


def _local_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid{os.geteuid()}"


def secure_data_dir(path: Path) -> None:
    """Create the data directory private to the server's account (0700), its files 0600.

    The log, the checkpoints and the presence table say who may reach what; nobody else
    on the machine has to read them. (A socket in it keeps the mode it was given.)
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    for child in path.iterdir():
        if child.is_file() and not child.is_symlink() and child.stat().st_mode & 0o077:
            os.chmod(child, 0o600)


def run_server(config: Config, *, ignore_chain_errors: bool = False) -> int:
    """Run until SIGINT/SIGTERM; return the exit code."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    os.umask(0o077)  # everything the server creates is private to its account

    async def main() -> None:
        server = Server(config, ignore_chain_errors=ignore_chain_errors)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            if config.tuning.gc_freeze:
                await nursery.start(manage_gc)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
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


