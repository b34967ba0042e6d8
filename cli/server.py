"""``tailledger serve``: compose the log, the projections and the network services.

One process, one nursery. Start-up order is the dependency order: the log's writer
task, the projection runner (which folds the backlog before it reports ready), then the
services that read the projection (admin socket, control protocol, relay). Shutdown is
the reverse, by cancellation of the nursery.
"""

from __future__ import annotations

import logging
import os
import signal
from functools import partial
from pathlib import Path

import trio

from eventlog import EventLog, SQLiteEventStore
from eventlog.sidetables import SideTables
from projections import CheckpointStore, ProjectionRunner, Tailnet
from projections.admin import AdminOps, Presence
from projections.presence import PresenceTable
from protocol import ConnectionStats
from protocol.control import Control
from relay.serve import RelayServer

from .adminsock import serve_admin_socket
from .api import ApiService
from .config import Config
from .gcpolicy import manage_gc

__all__ = ["Server"]

log = logging.getLogger("tailledger")


class Server:
    """A running tailledger server (built from a :class:`Config`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        secure_data_dir(config.data_path)
        self.store = SQLiteEventStore(config.database_path, synchronous=config.database.synchronous.upper())
        self.log = EventLog(self.store)
        #: Presence and pending registrations, beside the log in its database.
        self.side = SideTables(config.database_path)
        self.checkpoints = CheckpointStore(config.data_path / "checkpoints.db")
        self.runner = ProjectionRunner(self.log, self.checkpoints)
        self.tailnet = Tailnet(self.log, self.runner)
        self.presence: PresenceTable | None = None
        self.ops = AdminOps(self.tailnet, presence=self._presence)
        self.control: Control | None = None
        self.relay: RelayServer | None = None
        self.connection_stats: ConnectionStats | None = None  # the control port's counters
        self.noise_public = b""
        self.port = 0
        #: The admin HTTP API (``cli.api``), once the web app is made.
        self.api: ApiService | None = None
        #: The bound port of ``/metrics`` (0 while not served).
        self.metrics_port = 0

    def secure_files(self) -> None:
        """Make every file of the data directory private (0600), once they all exist."""
        secure_data_dir(self.config.data_path)

    def _presence(self, node_id: int) -> Presence | None:
        if self.presence is None:
            return None
        p = self.presence.get(node_id)
        return Presence(online=p.online, last_seen=p.last_seen) if p is not None else Presence(online=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.log.run)
                await nursery.start(self.runner.run)
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
            self.checkpoints.close()
            self.side.close()
            self.store.close()

    async def _start_network(self, nursery: trio.Nursery) -> None:
        from .network import start_network

        await start_network(self, nursery)


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


def run_server(config: Config) -> int:
    """Run until SIGINT/SIGTERM; return the exit code."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    os.umask(0o077)  # everything the server creates is private to its account

    async def main() -> None:
        server = Server(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            if config.tuning.gc_freeze:
                await nursery.start(manage_gc)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0


