"""Helpers for relay tests (and others that talk to a relay): sans-I/O login, running relays, event waits."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from relay import AllowAll, Authorizer, DerpClient, RelayConfig, RelayServer, serve_relay
from relay.derp.client import ClientEvent, ClientProtocol, PacketReceived, ServerInfoReceived
from relay.derp.server import RelayCore, ServerConn
from relay.keys import generate_private_key


class FakeClock:
    """A manually advanced monotonic clock for the core."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CoreClient:
    """A sans-I/O client joined to a :class:`RelayCore` connection by a fake link."""

    def __init__(
        self,
        core: RelayCore,
        *,
        private_key: bytes | None = None,
        mesh_key: bytes | None = None,
        remote: tuple[str, int] | None = ("192.0.2.7", 41641),
        ideal_node: str | None = None,
    ) -> None:
        self.core = core
        self.private_key = private_key or generate_private_key()
        self.protocol = ClientProtocol(self.private_key, mesh_key=mesh_key)
        self.key = self.protocol.public_key
        self.conn: ServerConn = core.accept(remote, ideal_node=ideal_node)
        self.wakes = 0
        self.conn.waker = self._wake

    def _wake(self) -> None:
        self.wakes += 1

    def pump_in(self) -> list[ClientEvent]:
        """Deliver everything the server queued for us; return the decoded events."""
        data, _ = self.core.take_outgoing(self.conn)
        events = self.protocol.receive_data(data) if data else []
        self.pump_out()
        return events

    def pump_out(self) -> None:
        """Deliver whatever the client protocol wants to send (ClientInfo, pongs)."""
        out = self.protocol.data_to_send()
        if out:
            self.core.receive_data(self.conn, out)

    def send_raw(self, data: bytes) -> None:
        self.core.receive_data(self.conn, data)

    def login(self) -> list[ClientEvent]:
        """Run the login; return the events (ServerInfo first if admitted)."""
        self.pump_in()  # ServerKey -> ClientInfo goes out
        return self.pump_in()


def login_all(core: RelayCore, n: int) -> list[CoreClient]:
    clients = [CoreClient(core) for _ in range(n)]
    for c in clients:
        events = c.login()
        assert isinstance(events[0], ServerInfoReceived)
    return clients


@asynccontextmanager
async def running_relay(
    tmp_path: Path,
    authorizer: Authorizer | None = None,
    **overrides: object,
) -> AsyncIterator[RelayServer]:
    """Run a relay on 127.0.0.1 with an ephemeral port (plain HTTP unless overridden)."""
    base: dict[str, object] = {
        "data_dir": str(tmp_path / "relay"),
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "tls": "off",
        "stun": False,
        "hostnames": ("127.0.0.1",),
    }
    base.update(overrides)
    config = RelayConfig(**base)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        server: RelayServer = await nursery.start(serve_relay, config, authorizer or AllowAll())
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def recv_until(
    client: DerpClient,
    predicate: Callable[[ClientEvent], bool],
    *,
    seconds: float = 5.0,
) -> ClientEvent:
    """Return the first event matching ``predicate`` (others are discarded)."""
    with trio.fail_after(seconds):
        while True:
            event = await client.recv()
            if predicate(event):
                return event


async def recv_packet(client: DerpClient, *, seconds: float = 5.0) -> PacketReceived:
    """Return the next relayed packet (other events are discarded)."""
    event = await recv_until(client, lambda e: isinstance(e, PacketReceived), seconds=seconds)
    assert isinstance(event, PacketReceived)
    return event
