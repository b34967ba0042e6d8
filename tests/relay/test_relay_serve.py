"""A real relay on 127.0.0.1 with Python DERP clients: relaying, auth, abuse, slow readers, TLS."""

from __future__ import annotations

import ssl
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from relay import (
    ConfigError,
    ConnectionClosedError,
    DerpClient,
    MeshPeer,
    StaticAuthorizer,
    UnauthorizedError,
    connect_derp,
)
from relay.derp import frames as f
from relay.derp.client import (
    KeepAliveReceived,
    PacketReceived,
    PeerGoneReceived,
    PongReceived,
)
from relay.keys import generate_private_key, public_key_of
from tests.support.relay_helpers import recv_packet, recv_until, running_relay
from tests.support.waits import wait_until


async def pair(url: str, **kwargs: object) -> tuple[DerpClient, DerpClient]:
    a = await connect_derp(url, generate_private_key(), **kwargs)  # type: ignore[arg-type]
    b = await connect_derp(url, generate_private_key(), **kwargs)  # type: ignore[arg-type]
    return a, b


async def test_two_clients_exchange_packets(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        a, b = await pair(relay.url)
        async with a, b:
            await a.send(b.public_key, b"to b")
            await b.send(a.public_key, b"to a")
            assert await recv_packet(b) == PacketReceived(source=a.public_key, data=b"to b")
            assert await recv_packet(a) == PacketReceived(source=b.public_key, data=b"to a")
            big = bytes(range(256)) * 256  # exactly MAX_PACKET_SIZE
            await a.send(b.public_key, big)
            assert await recv_packet(b) == PacketReceived(source=a.public_key, data=big)
        stats = relay.stats()
        assert stats.packets_sent == 3
        assert relay.http_stats().derp_upgrades == 2


async def test_fast_start_and_websocket_clients(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        fast = await connect_derp(
            relay.url, generate_private_key(), fast_start=True, server_public=relay.public_key
        )
        ws = await connect_derp(relay.url, generate_private_key(), websocket=True)
        async with fast, ws:
            await fast.send(ws.public_key, b"over websocket")
            assert (await recv_packet(ws)) == PacketReceived(
                source=fast.public_key, data=b"over websocket"
            )
            await ws.send(fast.public_key, b"back")
            assert (await recv_packet(fast)) == PacketReceived(source=ws.public_key, data=b"back")
        counts = relay.http_stats()
        assert (counts.derp_fast_start, counts.websocket_upgrades) == (1, 1)


async def test_ping_pong_and_keepalive(tmp_path: Path) -> None:
    async with (
        running_relay(tmp_path, keepalive_interval=0.05) as relay,
        await connect_derp(relay.url, generate_private_key()) as c,
    ):
        await c.ping(b"12345678")
        assert await recv_until(c, lambda e: isinstance(e, PongReceived)) == PongReceived(
            data=b"12345678"
        )
        # keepalive_interval adds up to 5 s of jitter; be patient.
        await recv_until(c, lambda e: isinstance(e, KeepAliveReceived), seconds=10)


async def test_peer_gone_when_a_sender_disconnects(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        a, b = await pair(relay.url)
        async with b:
            await a.send(b.public_key, b"remember me")
            await recv_packet(b)
            await a.aclose()
            gone = await recv_until(b, lambda e: isinstance(e, PeerGoneReceived))
            assert gone == PeerGoneReceived(peer=a.public_key, reason=f.PeerGoneReason.DISCONNECTED)


async def test_unauthorized_key_is_refused_while_others_keep_working(tmp_path: Path) -> None:
    auth = StaticAuthorizer()
    good_a, good_b, bad = generate_private_key(), generate_private_key(), generate_private_key()
    auth.allow(public_key_of(good_a))
    auth.allow(public_key_of(good_b))
    async with running_relay(tmp_path, auth) as relay:
        a = await connect_derp(relay.url, good_a)
        b = await connect_derp(relay.url, good_b)
        with pytest.raises(UnauthorizedError):
            await connect_derp(relay.url, bad)
        async with a, b:
            await a.send(b.public_key, b"still here")
            assert (await recv_packet(b)).data == b"still here"
            assert relay.stats().refused_unauthorized == 1

            # Revocation: the log says b is gone; the authorizer is updated first.
            auth.deny(b.public_key)
            assert relay.revoke(b.public_key) == 1
            with pytest.raises(ConnectionClosedError):
                await recv_until(b, lambda e: False)
            await b.aclose()
            with pytest.raises(UnauthorizedError):
                await connect_derp(relay.url, good_b)
            await a.ping(b"alive!!!")
            await recv_until(a, lambda e: isinstance(e, PongReceived))


async def test_reauthorize_closes_clients_the_authorizer_now_refuses(tmp_path: Path) -> None:
    auth = StaticAuthorizer()
    keys = [generate_private_key() for _ in range(3)]
    for k in keys:
        auth.allow(public_key_of(k))
    async with running_relay(tmp_path, auth) as relay:
        clients = [await connect_derp(relay.url, k) for k in keys]
        auth.deny(public_key_of(keys[1]))
        assert relay.reauthorize() == 1
        with pytest.raises(ConnectionClosedError):
            await recv_until(clients[1], lambda e: False)
        await wait_until(lambda: relay.stats().current_connections == 2)
        for c in clients:
            await c.aclose()


async def test_abuse_does_not_hurt_other_clients(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        a, b = await pair(relay.url)
        async with a, b:
            # Packets to nobody: dropped and counted, the sender stays connected.
            for _ in range(20):
                await a.send(b"\x01" * 32, b"into the void")
            await wait_until(lambda: relay.stats().drops["unknown_dest"] == 20)

            # A malformed frame (SendPacket shorter than a key) kills only its sender.
            async with await connect_derp(relay.url, generate_private_key()) as evil:
                await evil.send_raw(b"\x04\x00\x00\x00\x02hi")
                with pytest.raises(ConnectionClosedError):
                    await recv_until(evil, lambda e: False)

            # An oversized frame header is refused before any payload arrives.
            async with await connect_derp(relay.url, generate_private_key()) as huge:
                await huge.send_raw(b"\x04\x7f\xff\xff\xff")
                with pytest.raises(ConnectionClosedError):
                    await recv_until(huge, lambda e: False)

            # Raw garbage instead of a ClientInfo.
            async with await trio.open_tcp_stream("127.0.0.1", relay.derp_port) as raw:
                await raw.send_all(
                    b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
                )
                await raw.send_all(b"\xff" * 64)
                with trio.fail_after(5):
                    while await raw.receive_some(4096):
                        pass

            await a.send(b.public_key, b"unaffected")
            assert (await recv_packet(b)).data == b"unaffected"
            assert relay.stats().refused_protocol == 3


async def test_slow_reader_gets_drops_and_does_not_stall_others(tmp_path: Path) -> None:
    async with running_relay(tmp_path, queue_depth=8, write_timeout=30.0) as relay:
        a, b = await pair(relay.url)
        slow = await connect_derp(relay.url, generate_private_key())  # never reads
        async with a, b, slow:
            packet = b"\xab" * 60_000
            # ~60 MB towards a reader that never reads: socket buffers fill,
            # its queue fills, the relay drops.  The sender must never block.
            with trio.fail_after(20):
                for i in range(1000):
                    await a.send(slow.public_key, packet)
                    if i % 100 == 0:
                        await a.send(b.public_key, b"tick %d" % i)
            with trio.fail_after(10):
                for i in range(0, 1000, 100):
                    assert (await recv_packet(b)).data == b"tick %d" % i
            await wait_until(lambda: relay.stats().drops["queue_full"] > 0)
            assert relay.stats().drops["unknown_dest"] == 0
            io = relay.io_stats()
            # The kernel stopped taking bytes for `slow`: the reader's direct
            # write came up short and the rest went to slow's writer task.
            assert io.partial_writes > 0
            assert io.direct_writes > 0


async def test_write_timeout_disconnects_a_stuck_reader(tmp_path: Path) -> None:
    async with running_relay(tmp_path, queue_depth=4, write_timeout=0.3) as relay:
        a = await connect_derp(relay.url, generate_private_key())
        stuck = await connect_derp(relay.url, generate_private_key())
        async with a, stuck:
            for _ in range(400):
                await a.send(stuck.public_key, b"\x00" * 60_000)
                if relay.stats().drops["write_error"]:
                    break
            await wait_until(lambda: relay.stats().drops["write_error"] > 0, seconds=10)
            await wait_until(lambda: not relay.core.is_connected(stuck.public_key))
            assert relay.io_stats().write_timeouts == 1


async def test_login_timeout(tmp_path: Path) -> None:
    async with (
        running_relay(tmp_path, handshake_timeout=0.3) as relay,
        await trio.open_tcp_stream("127.0.0.1", relay.derp_port) as raw,
    ):
        await raw.send_all(
            b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
        )
        with trio.fail_after(5):
            received = b""
            while chunk := await raw.receive_some(4096):
                received += chunk
        assert received.startswith(
            b"HTTP/1.1 101 Switching Protocols"
        )  # then ServerKey, then close


async def test_full_mesh_forwards_both_ways_and_reports_peer_gone(tmp_path: Path) -> None:
    mesh_key = "ab" * 32
    async with (
        running_relay(tmp_path / "p", mesh_key=mesh_key) as p,
        running_relay(tmp_path / "q", mesh_key=mesh_key) as q,
    ):
        p.add_mesh_peer(MeshPeer(url=q.url))
        q.add_mesh_peer(MeshPeer(url=p.url))
        a = await connect_derp(p.url, generate_private_key())
        b = await connect_derp(q.url, generate_private_key())
        async with b:
            await wait_until(lambda: p.stats().forwarded_keys == 1 and q.stats().forwarded_keys == 1)
            await a.send(b.public_key, b"p to q")
            assert await recv_packet(b) == PacketReceived(source=a.public_key, data=b"p to q")
            await b.send(a.public_key, b"q to p")
            assert await recv_packet(a) == PacketReceived(source=b.public_key, data=b"q to p")
            assert (p.stats().packets_forwarded_out, q.stats().packets_forwarded_in) == (1, 1)
            assert (q.stats().packets_forwarded_out, p.stats().packets_forwarded_in) == (1, 1)
            # a leaves p; p tells q (PeerGone on q's watch link); q tells b,
            # who had received packets from a.
            await a.aclose()
            gone = await recv_until(b, lambda e: isinstance(e, PeerGoneReceived))
            assert gone == PeerGoneReceived(peer=a.public_key, reason=f.PeerGoneReason.DISCONNECTED)
            await wait_until(lambda: q.stats().forwarded_keys == 0)


async def test_one_way_mesh_only_forwards_one_way(tmp_path: Path) -> None:
    mesh_key = "cd" * 32
    async with (
        running_relay(tmp_path / "p", mesh_key=mesh_key) as p,
        running_relay(tmp_path / "q", mesh_key=mesh_key, mesh_with=(MeshPeer(url=p.url),)) as q,
    ):
        on_p = await connect_derp(p.url, generate_private_key())
        on_q = await connect_derp(q.url, generate_private_key())
        async with on_p, on_q:
            await wait_until(lambda: q.core.stats().forwarded_keys == 1)
            await on_q.send(on_p.public_key, b"q to p")
            assert (await recv_packet(on_p)).data == b"q to p"
            # p has no link to q, so it cannot know on_q: every relay of a
            # region must mesh with every other one.
            await on_p.send(on_q.public_key, b"p to q")
            await wait_until(lambda: p.stats().drops["unknown_dest"] == 1)


async def test_mesh_link_to_ourselves_is_ignored(tmp_path: Path) -> None:
    key = "privkey:" + generate_private_key().hex()
    # A second relay with the same key is "us" from s2's point of view.
    async with (
        running_relay(tmp_path / "s", mesh_key="ef" * 32, private_key=key) as s,
        running_relay(
            tmp_path / "s2", mesh_key="ef" * 32, private_key=key, mesh_with=(MeshPeer(url=s.url),)
        ) as s2,
    ):
        # Wait until the link has been tried and refused (a client claiming the
        # relay's own key is a protocol error), not for a fixed while: a sleep
        # passes without the link having even connected.
        await wait_until(lambda: s.stats().refused_protocol >= 1)
        assert s2.stats().forwarded_keys == 0
        assert s.stats().watchers == 0


async def test_a_mesh_peer_that_breaks_the_tls_handshake_is_retried_not_fatal(tmp_path: Path) -> None:
    # A peer restarting: it accepts the connection and closes it at once, which fails
    # the TLS handshake. The relay logs it and tries again; it does not stop.
    accepted = 0

    async def slam(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, slam, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        peer = MeshPeer(url=f"https://127.0.0.1:{port}/derp", cert_name="sha256-raw:" + "00" * 32)
        async with running_relay(tmp_path, mesh_key="ab" * 32, mesh_with=(peer,), mesh_retry=0.01) as relay:
            await wait_until(lambda: accepted >= 3, what="the link retried")
            a, b = await pair(relay.url)
            async with a, b:
                await a.send(b.public_key, b"still relaying")
                assert (await recv_packet(b)).data == b"still relaying"
        nursery.cancel_scope.cancel()


# -- TLS -------------------------------------------------------------------------------


async def http_get(
    port: int, target: str, headers: list[tuple[str, str]], ctx: ssl.SSLContext | None
) -> tuple[int, dict[bytes, bytes], bytes]:
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if ctx is not None:
        stream = trio.SSLStream(stream, ctx, server_hostname="127.0.0.1")
    conn = h11.Connection(h11.CLIENT)
    req = h11.Request(method="GET", target=target, headers=[("Host", "127.0.0.1"), *headers])
    await stream.send_all((conn.send(req) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    status, hdrs, body = 0, {}, b""
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(4096)))
        elif isinstance(ev, h11.Response):
            status, hdrs = ev.status_code, dict(ev.headers)
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            break
    await stream.aclose()
    return status, hdrs, body


async def test_self_signed_tls_is_pinned_and_stable(tmp_path: Path) -> None:
    data_dir = tmp_path / "relay"
    async with running_relay(tmp_path, tls="self-signed", data_dir=str(data_dir)) as relay:
        assert relay.url.startswith("https://")
        name = relay.cert_name
        assert name is not None
        assert name.startswith("sha256-raw:")
        a, b = await pair(relay.url, cert_name=name)
        async with a, b:
            await a.send(b.public_key, b"over tls")
            assert (await recv_packet(b)).data == b"over tls"
        with pytest.raises(ConfigError):
            await connect_derp(
                relay.url, generate_private_key(), cert_name="sha256-raw:" + "00" * 32
            )
        pinned = ssl.create_default_context()
        pinned.check_hostname = False
        pinned.verify_mode = ssl.CERT_NONE
        status, hdrs, _ = await http_get(
            relay.derp_port, "/generate_204", [("X-Tailscale-Challenge", "c0ffee")], pinned
        )
        assert status == 204
        assert hdrs[b"x-tailscale-response"] == b"response c0ffee"
        # A CA-verifying client trusting our certificate file accepts it too.
        ca = ssl.create_default_context(cafile=str(data_dir / "derp-tls-cert.pem"))
        status, _, _ = await http_get(relay.derp_port, "/derp/probe", [], ca)
        assert status == 200
    # Restart: same certificate, same CertName for the DERP map.
    async with running_relay(tmp_path, tls="self-signed", data_dir=str(data_dir)) as again:
        assert again.cert_name == name


async def test_tls_from_cert_files(tmp_path: Path) -> None:
    from relay.certs import generate_self_signed

    cert, key = generate_self_signed(["relay.test"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    async with running_relay(
        tmp_path,
        tls="files",
        cert_file=str(tmp_path / "c.pem"),
        key_file=str(tmp_path / "k.pem"),
        hostnames=("relay.test",),
    ) as relay:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))
        c = await connect_derp(
            relay.url.replace("relay.test", "relay.test"),
            generate_private_key(),
            ssl_context=ctx,
            dial_host="127.0.0.1",
        )
        await c.aclose()
        region = relay.derp_region(host_name="relay.test")
        assert region.nodes is not None
        assert region.nodes[0].cert_name == ""  # CA-issued certs need no pin


async def test_plain_http_endpoints(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        assert (await http_get(relay.derp_port, "/derp", [], None))[0] == 426
        assert (await http_get(relay.derp_port, "/derp/latency-check", [], None))[0] == 200
        assert (await http_get(relay.derp_port, "/", [], None))[0] == 200
        assert (await http_get(relay.derp_port, "/missing", [], None))[0] == 404


async def test_derp_region_describes_the_running_relay(tmp_path: Path) -> None:
    async with running_relay(
        tmp_path, tls="self-signed", stun=True, stun_host="127.0.0.1", stun_port=0
    ) as relay:
        region = relay.derp_region(region_id=950, host_name="derp.example.com", ipv4="203.0.113.5")
        assert region.region_id == 950
        assert region.nodes is not None
        node = region.nodes[0]
        assert (node.host_name, node.ipv4, node.region_id) == (
            "derp.example.com",
            "203.0.113.5",
            950,
        )
        assert node.derp_port == relay.derp_port
        assert relay.stun is not None
        assert node.stun_port == relay.stun.port
        assert node.cert_name == relay.cert_name


async def test_tls_handshakes_given_up_by_the_client_are_not_failures(tmp_path: Path) -> None:
    """A client that hangs up mid-handshake (a probe it no longer needs) is counted
    apart from a handshake that fails; neither disturbs a later client."""
    async with running_relay(tmp_path, tls="self-signed", data_dir=str(tmp_path / "relay")) as relay:
        quitter = await trio.open_tcp_stream("127.0.0.1", relay.derp_port)
        await quitter.aclose()  # connected, then gone before a ClientHello
        garbage = await trio.open_tcp_stream("127.0.0.1", relay.derp_port)
        await garbage.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not TLS
        with trio.fail_after(5):
            await garbage.receive_some(1024)  # the relay closes it
            await garbage.aclose()
        await wait_until(
            lambda: relay.http_stats().tls_failures + relay.http_stats().tls_abandoned == 2, what="both handshakes counted"
        )
        stats = relay.http_stats()
        assert (stats.tls_abandoned, stats.tls_failures) == (1, 1)
        a, b = await pair(relay.url, cert_name=relay.cert_name)
        async with a, b:
            await a.send(b.public_key, b"still fine")
            assert (await recv_packet(b)).data == b"still fine"


async def test_key_cap_closes_the_oldest_connection_of_a_key(tmp_path: Path) -> None:
    async with running_relay(tmp_path, max_conns_per_key=2) as relay:
        key = generate_private_key()
        conns = [await connect_derp(relay.url, key) for _ in range(3)]
        other = await connect_derp(relay.url, generate_private_key())
        async with conns[0], conns[1], conns[2], other:
            # The oldest was closed to admit the newest; the newest gets the packets.
            with pytest.raises(ConnectionClosedError):
                await recv_until(conns[0], lambda e: False)
            await other.send(public_key_of(key), b"to the newest")
            assert (await recv_packet(conns[2])).data == b"to the newest"
        stats = relay.stats()
        assert (stats.closed_key_limit, stats.refused_key_limit) == (1, 0)


async def test_relay_limits_out_of_range_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ExceptionGroup) as caught:  # running_relay's nursery wraps it
        async with running_relay(tmp_path, rate_limit=1000, rate_burst=1000):
            pass
    assert caught.group_contains(ConfigError, match="rate_burst must be at least 65573 bytes")


async def test_a_websocket_text_message_is_a_protocol_violation(tmp_path: Path) -> None:
    # DERP over WebSocket is binary messages only (Tailscale's derper reads with
    # MessageBinary and closes on anything else); a text message must not be taken
    # as DERP bytes. Taken as bytes, this one (the first byte of a ClientInfo frame's
    # header) would leave the relay waiting for the rest until its login timeout.
    async with running_relay(tmp_path, handshake_timeout=60.0) as relay:
        port = relay.derp_port
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        await tcp.send_all(ws.send(Request(host="127.0.0.1", target="/derp", subprotocols=["derp"])))
        accepted = False
        with trio.fail_after(10):
            while not accepted:
                ws.receive_data(await tcp.receive_some(65536))
                accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
            await tcp.send_all(ws.send(TextMessage(data="\x02")))
            while data := await tcp.receive_some(65536):  # the relay ends the connection
                ws.receive_data(data)
        await tcp.aclose()
        assert relay.stats().refused_protocol == 1
        assert relay.http_stats().websocket_upgrades == 1
