"""The DERP client over WebSocket keeps the DERP bytes that arrive with the 101."""

from __future__ import annotations

import trio
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, BytesMessage, Request

from relay import connect_derp
from relay.derp import frames as f
from relay.keys import generate_private_key, public_key_of


async def test_server_key_sent_with_the_101_is_not_lost() -> None:
    """A relay may write its ServerKey frame right behind the 101 (one TCP read for
    the client). wsproto's WSConnection.events() goes on from the handshake's events
    to the new connection's messages, so a handshake loop that drains it would eat
    the ServerKey and wait for it for ever; it must stop at the 101."""
    server_public = public_key_of(generate_private_key())
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def fake_relay(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with await listener.accept() as stream:
            ws = WSConnection(ConnectionType.SERVER)
            while True:
                ws.receive_data(bytes(await stream.receive_some()))
                if any(isinstance(event, Request) for event in ws.events()):
                    break
            key_frame = f.encode_server_key(server_public)
            await stream.send_all(
                ws.send(AcceptConnection(subprotocol="derp"))
                + ws.send(BytesMessage(data=key_frame))
            )
            await trio.sleep_forever()  # the client's ClientInfo needs no answer here

    port = listener.socket.getsockname()[1]
    async with listener, trio.open_nursery() as nursery:
        await nursery.start(fake_relay)
        client = await connect_derp(
            f"http://127.0.0.1:{port}/derp",
            generate_private_key(),
            websocket=True,
            wait_login=False,
            connect_timeout=20,  # a guard against the old hang, not a measurement
        )
        async with client:
            assert client.server_public == server_public
        nursery.cancel_scope.cancel()
