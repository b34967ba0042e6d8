"""An in-process tailledger server and simulated clients over the real protocol."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from cli.config import Config
from cli.server import Services, open_server
from eventlog import Actor, ActorKind
from projections.tailcfg import Hostinfo, MapRequest, NetInfo, RegisterRequest, RegisterResponseAuth
from protocol import ControlClient, generate_private_key, open_control_client, public_key

ADMIN = Actor(kind=ActorKind.ADMIN, id="test")


def make_config(tmp: Path, **overrides: object) -> Config:
    base: dict[str, object] = {
        "data_dir": str(tmp),
        "listen_addr": "127.0.0.1:0",
        "metrics_listen_addr": "127.0.0.1:0",
        # The log's signing key lives outside the data directory.
        "audit": {"signing_key_file": str(tmp.parent / f"{tmp.name}-signing.key")},
    }
    base.update(overrides)
    return msgspec.convert(base, type=Config)


@asynccontextmanager
async def running(tmp: Path, **overrides: object) -> AsyncIterator[Services]:
    async with open_server(make_config(tmp, **overrides)) as server:
        yield server


@dataclass
class SimNode:
    """A simulated tailscale client: its keys and a tunnel to the server."""

    machine_private: bytes
    node_private: bytes
    hostname: str

    @classmethod
    def new(cls, hostname: str) -> SimNode:
        return cls(generate_private_key(), os.urandom(32), hostname)

    @property
    def node_key(self) -> str:
        return "nodekey:" + public_key(self.node_private).hex()

    @property
    def machine_key_hex(self) -> str:
        return public_key(self.machine_private).hex()

    def register_request(self, auth_key: str | None = None, **kw: object) -> RegisterRequest:
        return RegisterRequest(
            version=130,
            node_key=self.node_key,
            auth=RegisterResponseAuth(auth_key=auth_key) if auth_key else None,
            hostinfo=Hostinfo(
                hostname=self.hostname, os="linux", net_info=NetInfo(preferred_derp=999)
            ),
            **kw,  # type: ignore[arg-type]
        )

    def map_request(
        self, *, stream: bool = True, endpoints: list[str] | None = None, **kw: object
    ) -> MapRequest:
        return MapRequest(
            version=130,
            compress="zstd",
            keep_alive=True,
            node_key=self.node_key,
            disco_key="discokey:" + public_key(self.node_private[::-1]).hex(),
            stream=stream,
            hostinfo=Hostinfo(
                hostname=self.hostname, os="linux", net_info=NetInfo(preferred_derp=999)
            ),
            endpoints=endpoints if endpoints is not None else ["192.0.2.1:41641"],
            endpoint_types=[1] * len(endpoints if endpoints is not None else [1]),
            **kw,  # type: ignore[arg-type]
        )

    @asynccontextmanager
    async def connect(self, server: Services) -> AsyncIterator[ControlClient]:
        async with open_control_client(
            "127.0.0.1", server.port, machine_key=self.machine_private
        ) as client:
            yield client


async def make_key(server: Services, user: str = "alice", **kw: object) -> str:
    if server.tailnet.state.user_named(user) is None:
        await server.ops.dispatch("users.create", {"name": user}, ADMIN)
    result = await server.ops.dispatch("preauthkeys.create", {"user": user, **kw}, ADMIN)
    assert isinstance(result, dict)
    key = result["key"]
    assert isinstance(key, str)
    return key


@asynccontextmanager
async def two_registered(
    server: Services,
) -> AsyncIterator[tuple[SimNode, ControlClient, SimNode, ControlClient]]:
    """Nodes alpha and bravo, each connected and registered with one reusable key."""
    key = await make_key(server, reusable=True)
    a, b = SimNode.new("alpha"), SimNode.new("bravo")
    async with a.connect(server) as ca, b.connect(server) as cb:
        await ca.register(a.register_request(key))
        await cb.register(b.register_request(key))
        yield a, ca, b, cb
