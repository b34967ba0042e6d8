"""Run our DERP relay alone, open to any client, for tailcat tests.

``python -m tests.e2e.relay_runner --data DIR --port P --stun-port S`` runs
``relay.serve.serve_relay`` with plain HTTP (no TLS) and the `relay.auth.AllowAll`
authorizer, then prints one line ``READY {json}`` with the bound ports and the
relay's DERP region (the JSON a DERP map holds), and serves until SIGTERM.

Why a runner: ``tailledger serve`` embeds the relay but authorizes only node
keys registered in its log, while tailcat clients use ephemeral keys that no
control server ever sees. Once a ``tailledger relay`` command with an
open-access option exists, `E2EHarness.start_relay` can run that instead.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence

import msgspec
import trio

from relay.auth import AllowAll
from relay.serve import RelayConfig, serve_relay

READY_PREFIX = "READY "


async def _run(args: argparse.Namespace) -> None:
    config = RelayConfig(
        data_dir=args.data,
        listen_host=args.host,
        listen_port=args.port,
        tls="off",
        hostnames=(args.host,),
        stun_host=args.host,
        stun_port=args.stun_port,
    )
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, config, AllowAll())
        region = relay.derp_region(
            region_id=args.region_id, region_code="e2e", region_name="tailledger e2e relay"
        )
        ready = {
            "derp_port": relay.derp_port,
            "stun_port": relay.stun.port if relay.stun is not None else -1,
            "region": json.loads(msgspec.json.encode(region)),
        }
        print(READY_PREFIX + json.dumps(ready), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="relay_runner", description=__doc__)
    parser.add_argument("--data", required=True, help="relay data directory (server key)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="DERP (HTTP) port; 0 picks one")
    parser.add_argument("--stun-port", type=int, default=0, help="STUN (UDP) port; 0 picks one")
    parser.add_argument("--region-id", type=int, default=900)
    trio.run(_run, parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
