"""``tailledger relay``: the DERP relay and STUN server as a process of its own.

It reads the same event log as the control server (read-only; for SQLite, the same
database file) and follows it with its own projection runner and checkpoint, so it
learns who may connect without asking the control server. Give it the same
configuration file; ``derp.server`` says where it listens.
"""

from __future__ import annotations

import logging
import os
import signal

import trio

from eventlog import EventLog
from projections import CheckpointStore, ProjectionRunner
from projections.derpmap import merge_derp_maps
from projections.tailcfg import encode

from .audit import mac_key_for
from .config import Config
from .network import relay_region
from .settings import relay_config
from .storage import describe, open_store, secure_data_dir

__all__ = ["run_relay"]

log = logging.getLogger("tailledger.relay")


async def relay_main(config: Config, *, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
    from relay.logauth import LogAuthorizer
    from relay.serve import serve_relay

    store = open_store(config, read_only=True)
    secure_data_dir(config.data_path)  # its checkpoint says who may use the relay
    mac_key = mac_key_for(config)
    checkpoints = CheckpointStore(config.data_path / "relay-checkpoints.db", mac_key=mac_key)
    if mac_key is None:
        log.warning(
            "relay: cannot read the signing key %s, so its checkpoints cannot be "
            "authenticated: folding the log from the start instead",
            config.audit.signing_key_file,
        )
    try:
        events = EventLog(store, poll_interval=0.5)
        runner = ProjectionRunner(events, checkpoints if mac_key is not None else None, name="relay")
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            auth = LogAuthorizer(runner)
            auth.refresh()
            relay = await nursery.start(serve_relay, relay_config(config), auth)
            await nursery.start(auth.run, relay.revoke)
            log.info("relay following the log at %s (head %d)", describe(config), runner.state.seq)
            # What the control server's DERP map needs to name this relay (derp.paths),
            # including the CertName pin of a self-signed certificate made on first start.
            derp_map = merge_derp_maps([], embedded=relay_region(config, relay))
            log.info("relay: DERP map for this relay: %s", encode(derp_map).decode())
            task_status.started(relay)
    finally:
        checkpoints.close()
        store.close()


def run_relay(config: Config) -> int:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.database.type == "sqlite" and not config.database_path.exists():
        raise SystemExit(f"tailledger relay: no event log at {config.database_path}; start 'tailledger serve' first")
    os.umask(0o077)  # everything the relay creates is private to its account, as the server's

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay_main, config)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0
