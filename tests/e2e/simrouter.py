"""A subnet router speaking the real control protocol, as a process of its own.

Role: neither real client we can install advertises routes. caddy-tailscale
configures tsnet with a host name, tags and an auth key only (no
``AdvertiseRoutes``), and tailcat has no control plane at all (see
``CLIENTS.md``). So the routers of the HA end-to-end test are this script:
our protocol client (:mod:`protocol.client`: Noise over HTTP/2, the same
bytes a tailscale client sends) registers with a pre-auth key, then holds a
map long-poll whose Hostinfo advertises the routes, exactly as ``tailscaled
--advertise-routes`` does. The observer of the failover is a real tsnet node.

Its keys live in ``--state`` so a restart is the same machine and node (a
daemon restart, not a new node). It prints ``streaming <node key>`` once the
map stream answered, then reads the stream until killed: killing it is the
router going offline (its stream ends without a goodbye).

Usage: ``python simrouter.py --port P --auth-key K --hostname NAME --route PREFIX --state DIR``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from projections.tailcfg import Hostinfo, MapRequest, NetInfo, RegisterRequest, RegisterResponseAuth
from protocol.client import open_control_client
from protocol.noise.handshake import generate_private_key, public_key


def _key(path: Path, make: Callable[[], bytes]) -> bytes:
    """The key kept at ``path``, made (and kept) on the first start."""
    if path.exists():
        return path.read_bytes()
    value = make()
    path.write_bytes(value)
    return value


async def _main(args: argparse.Namespace) -> None:
    state = Path(args.state)
    machine = _key(state / "machine.key", generate_private_key)
    node = _key(state / "node.key", lambda: os.urandom(32))
    node_key = "nodekey:" + public_key(node).hex()
    disco_key = "discokey:" + public_key(node[::-1]).hex()
    hostinfo = Hostinfo(
        hostname=args.hostname,
        os="linux",
        net_info=NetInfo(preferred_derp=999),
        routable_ips=args.route,
    )
    async with open_control_client("127.0.0.1", args.port, machine_key=machine) as client:
        answer = await client.register(
            RegisterRequest(
                version=130,
                node_key=node_key,
                auth=RegisterResponseAuth(auth_key=args.auth_key),
                hostinfo=hostinfo,
            )
        )
        if answer.error or not answer.machine_authorized:
            sys.exit(f"registration refused: {answer.error or 'not authorized'}")
        request = MapRequest(
            version=130,
            compress="zstd",
            keep_alive=True,
            node_key=node_key,
            disco_key=disco_key,
            stream=True,
            hostinfo=hostinfo,
            endpoints=["192.0.2.1:41641"],
            endpoint_types=[1],
        )
        async with client.map_stream(request) as stream:
            first = True
            async for _ in stream:
                if first:
                    print(f"streaming {node_key}", flush=True)
                    first = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="control port on 127.0.0.1")
    parser.add_argument("--auth-key", required=True)
    parser.add_argument("--hostname", required=True)
    parser.add_argument(
        "--route", action="append", required=True, help="advertised prefix (repeatable)"
    )
    parser.add_argument(
        "--state", required=True, help="directory keeping the machine and node keys"
    )
    args = parser.parse_args()
    Path(args.state).mkdir(parents=True, exist_ok=True)
    trio.run(_main, args)


if __name__ == "__main__":
    main()
