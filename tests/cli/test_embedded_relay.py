"""The embedded relay of ``tailledger serve`` authorizes from the server's own projection."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from cli.config import load_config
from cli.network import start_relay
from cli.storage import open_side_tables
from eventlog import EventLog, SQLiteEventStore
from projections import ProjectionRunner, Tailnet
from projections import commands as c
from tests.conftest import ADMIN


async def test_the_embedded_relay_follows_the_servers_runner(tmp_path: Path) -> None:
    # One fold of the log per server: a runner of the relay's own decoded every event a
    # second time into a second copy of the tailnet (issue 19: ~1 KiB per node). The
    # relay's authorizer follows the runner it is given, and a node registered through
    # the server's projection may log in to the relay without any other consumer.
    config = load_config(None, {
        "TAILLEDGER_DATA": str(tmp_path),
        "TAILLEDGER_DERP__SERVER__LISTEN_ADDR": "127.0.0.1:0",
        "TAILLEDGER_DERP__SERVER__STUN_LISTEN_ADDR": "127.0.0.1:0",
        "TAILLEDGER_DERP__SERVER__HOSTNAME": "localhost",
    })
    log = EventLog(SQLiteEventStore(tmp_path / "log.db"))
    runner = ProjectionRunner(log)
    tailnet = Tailnet(log, runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await nursery.start(runner.run)
        relay = await start_relay(nursery, config, runner, open_side_tables(config))
        assert relay is not None
        auth = relay.core.authorizer
        assert getattr(auth, "runner", None) is runner
        uid, _ = await tailnet.execute(lambda s: c.decide_create_user(s, "alice"), actor=ADMIN)
        key = bytes.fromhex("44" * 32)
        assert not auth.is_authorized(key)
        await tailnet.execute(
            lambda s: c.decide_register_node(
                s, machine_key="aa" * 32, node_key="44" * 32, hostname="one", user_id=uid, tags=(),
                ephemeral=False, expiry=None, auth="cli", preauth_key=None, plan=c.AddressPlan(None, None),
            ),
            actor=ADMIN,
        )
        await trio.testing.wait_all_tasks_blocked()
        assert auth.is_authorized(key)
        nursery.cancel_scope.cancel()
