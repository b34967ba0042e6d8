"""End to end, relay side: our DERP relay and STUN server carrying real clients.

What each test proves (all in a private network namespace, real processes):

* tsnet nodes registered with ``tailledger serve`` get a DERP map naming only
  the embedded relay (TLS, self-signed, pinned by ``CertName``); with
  ``TS_DEBUG_ALWAYS_USE_DERP=1`` an HTTP request between them crosses the
  relay, byte for byte (the relay's ``/metrics`` counters grow by more than
  the response body), and both nodes' DERP logins were admitted;
* the relay's authorization comes from the event log: a DERP client with an
  unregistered key is refused while a registered key is admitted and the
  nodes keep talking; ``nodes delete`` / ``nodes expire`` closes the node's
  relay connection (revoked), refuses its reconnections, and cuts it off;
* ``tailledger relay`` as a separate process follows the log live (a key
  refused before its registration is admitted after it), serves tailcat
  over TLS pinned by CertName, ``tailcat ping`` reports the DERP path, and an
  unregistered tailcat key gets no pong; the same works on the embedded
  relay with the DERP map our control server hands out;
* the operator's path for a separate relay: the DERP map ``tailledger relay``
  prints goes into ``derp.paths`` (plus a ``derp.urls`` source), the control
  server hands the merged map to tsnet nodes, and they talk through that relay;
* STUN answers each sender with its own address as XOR-MAPPED-ADDRESS;
* two ``tailledger relay`` processes meshed through the ``derp.server``
  mesh keys forward a packet between clients connected to different relays.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import trio

from projections.tailcfg import encode
from relay import (
    ConnectionClosedError,
    DerpClient,
    UnauthorizedError,
    connect_derp,
    generate_private_key,
    public_key_of,
)
from relay.derp.client import PacketReceived
from relay.keys import short_key
from tests.support.waits import wait_until_sync

from .caddy import CaddyNode, CaddyNodeSpec
from .harness import E2EHarness, LedgerRelay, TailledgerServer
from .netns import LOOPBACK, NS_ADDR, PEER_ADDR
from .nsclients import (
    fetch_derp_map,
    namespace_sockets,
    parse_metrics,
    register_node_key,
    stun_binding,
)

pytestmark = pytest.mark.e2e

#: Makes magicsock disable its UDP sockets: every packet goes through DERP.
ALWAYS_DERP = {"TS_DEBUG_ALWAYS_USE_DERP": "1"}

#: Body of nodeb's tailnet site: far more bytes than idle DERP traffic (disco,
#: keep-alives) could ever account for during one request.
BIG_BODY = "relayed " * 25_000  # 200 000 bytes


def relay_metrics(e2e: E2EHarness, server: TailledgerServer) -> dict[str, float]:
    """``tailledger_relay_*`` samples from the server's ``/metrics``, prefix stripped."""
    resp = e2e.ns.http_request(f"http://{LOOPBACK}:{server.metrics_port}/metrics", timeout=10)
    assert resp.status == 200, resp
    return {
        name.removeprefix("tailledger_relay_"): value
        for name, value in parse_metrics(resp.body.decode()).items()
        if name.startswith("tailledger_relay_")
    }


def wait_metrics(
    e2e: E2EHarness,
    server: TailledgerServer,
    ok: Callable[[dict[str, float]], bool],
    *,
    timeout: float = 30.0,
) -> dict[str, float]:
    """Poll the relay counters until ``ok(counters)`` holds; return them."""

    def satisfied() -> dict[str, float] | None:
        counters = relay_metrics(e2e, server)
        return counters if ok(counters) else None

    return wait_until_sync(
        satisfied, what="the relay counters to satisfy the check", seconds=timeout,
        detail=lambda: str(relay_metrics(e2e, server)),
    )


def start_relayed_pair(
    e2e: E2EHarness,
    server: TailledgerServer,
    *,
    derp_over_http: bool = True,
    body_b: str | None = None,
) -> tuple[CaddyNode, CaddyNode, str]:
    """Two tsnet nodes forced onto DERP, Running and routable to each other.

    Returns:
        ``(nodea, nodeb, nodeb's tailnet IPv4)``.
    """
    key = e2e.preauth_key(server)
    a = e2e.start_caddy_node(
        CaddyNodeSpec("nodea", control_url=server.control_url, auth_key=key),
        env_extra=ALWAYS_DERP,
        derp_over_http=derp_over_http,
    )
    b = e2e.start_caddy_node(
        CaddyNodeSpec("nodeb", control_url=server.control_url, auth_key=key, body=body_b),
        env_extra=ALWAYS_DERP,
        derp_over_http=derp_over_http,
    )
    a.wait_running(timeout=60)
    b.wait_running(timeout=60)
    view_a = a.wait_for_peers({"nodeb"}, timeout=60)
    b.wait_for_peers({"nodea"}, timeout=60)
    ip_b = view_a.ipv4("nodeb")
    assert ip_b is not None
    return a, b, ip_b


async def drain(client: DerpClient) -> None:
    """Read events until the connection ends (raises then)."""
    while True:
        await client.recv()


def node_key_of(node: CaddyNode) -> bytes:
    """The node key the tsnet node registered (from its ``TS_DEBUG_REGISTER`` dump)."""
    requests = node.register_requests()
    assert requests, f"{node.name} logged no RegisterRequest"
    key: str = requests[-1]["NodeKey"]
    return bytes.fromhex(key.removeprefix("nodekey:"))


# -- 1. real traffic through the embedded relay ---------------------------------


def test_tsnet_traffic_crosses_the_embedded_relay(caddy_e2e: E2EHarness) -> None:
    # TLS with the relay's self-signed certificate: the nodes dial https and
    # check the certificate against the CertName pin in our DERP map.
    server = caddy_e2e.start_control_server(env_extra={"TAILLEDGER_DERP__SERVER__TLS": "true"})
    a, b, ip_b = start_relayed_pair(caddy_e2e, server, derp_over_http=False, body_b=BIG_BODY)

    # The DERP map from our server: one region, one node, our relay, pinned.
    derp_map = a.view().derp_map
    assert derp_map is not None
    assert list(derp_map["Regions"]) == ["999"], derp_map
    (node,) = derp_map["Regions"]["999"]["Nodes"]
    assert (node["HostName"], node["DERPPort"]) == (LOOPBACK, server.derp_port), node
    assert node["CertName"].startswith("sha256-raw:"), node
    for n in (a, b):
        log = n.process.log_text()
        # tsnet 1.90 honours the knob: magicsock gives up UDP entirely.
        assert "disabled udp4 per TS_DEBUG_ALWAYS_USE_DERP" in log
        assert "magicsock: derp-999 connected" in log
        assert not re.search(r"disco: node \S+ \S+ now using \d", log), "a direct path was used"

    # Both logins were admitted by the log-fed authorizer (and none refused).
    before = wait_metrics(caddy_e2e, server, lambda m: m["current_keys"] == 2)
    assert before["refused_unauthorized"] == 0, before
    # Their DERP connections are TLS streams upgraded to DERP (with the meta
    # certificate, Go clients use fast start and skip the 101).
    assert before["http_derp_fast_start"] + before["http_derp_upgrades"] >= 2, before

    resp = a.fetch(f"{ip_b}:80", timeout=30)
    assert (resp.status, resp.headers.get("x-served-by")) == (200, "nodeb")
    assert resp.body == BIG_BODY.encode()

    after = relay_metrics(caddy_e2e, server)
    delta = {k: after[k] - before[k] for k in ("packets_received", "packets_sent", "bytes_received", "bytes_sent")}
    print(f"relay counters during one {len(BIG_BODY)}-byte response: {delta}")
    # The whole response (plus WireGuard and TCP overhead) went in and out of the relay.
    assert delta["bytes_received"] >= len(BIG_BODY), delta
    assert delta["bytes_sent"] >= len(BIG_BODY), delta
    assert delta["packets_received"] >= len(BIG_BODY) // 1500, delta
    assert delta["packets_sent"] >= len(BIG_BODY) // 1500, delta
    assert after["drops{reason=\"queue_full\"}"] == 0, after
    assert (after["current_keys"], after["refused_unauthorized"]) == (2, 0), after


# -- 2. authorization from the log -------------------------------------------------


async def test_unregistered_derp_key_is_refused_while_nodes_keep_working(
    caddy_e2e: E2EHarness,
) -> None:
    e2e = caddy_e2e
    server = e2e.start_control_server()  # plain-HTTP relay
    a, _b, ip_b = start_relayed_pair(e2e, server)
    assert server.derp_port is not None
    url = f"http://{LOOPBACK}:{server.derp_port}/derp"
    key = e2e.preauth_key(server)
    before = wait_metrics(e2e, server, lambda m: m["current_keys"] == 2)

    stranger = generate_private_key()
    member = generate_private_key()
    with namespace_sockets(e2e.ns), trio.fail_after(60):
        with pytest.raises(UnauthorizedError):
            await connect_derp(url, stranger)
        # The same client with a key registered in the log is admitted: the
        # refusal above is the authorizer's, not a protocol problem.
        registered = await register_node_key(
            server.port, public_key_of(member), auth_key=key, hostname="probe"
        )
        assert registered.response.machine_authorized, registered.response
        while True:
            try:
                client = await connect_derp(url, member)
                break
            except UnauthorizedError:  # the relay's consumer not caught up yet
                await trio.sleep(0.1)
        async with client:
            assert client.logged_in
            assert await client.ping_rtt() < 5

    after = relay_metrics(e2e, server)
    assert after["refused_unauthorized"] - before["refused_unauthorized"] >= 1, after
    assert f"{short_key(public_key_of(stranger))}: not authorized" in server.process.log_text()
    # The registered nodes were not disturbed and still talk through the relay.
    resp = a.fetch(f"{ip_b}:80", timeout=30)
    assert (resp.status, resp.text) == (200, "hello from nodeb")
    final = relay_metrics(e2e, server)
    assert final["packets_sent"] > after["packets_sent"], final
    assert final["current_keys"] == 2, final  # nodea and nodeb (the probe left)
    assert final["revoked"] == 0, final


@pytest.mark.parametrize("action", ["delete", "expire"])
async def test_removed_node_loses_its_relay_connection(caddy_e2e: E2EHarness, action: str) -> None:
    e2e = caddy_e2e
    server = e2e.start_control_server()
    a, b, ip_b = start_relayed_pair(e2e, server)
    assert server.derp_port is not None
    url = f"http://{LOOPBACK}:{server.derp_port}/derp"
    assert a.fetch(f"{ip_b}:80", timeout=30).text == "hello from nodeb"
    key_b = node_key_of(b)
    before = wait_metrics(e2e, server, lambda m: m["current_keys"] == 2)
    assert before["revoked"] == 0, before

    def remove(name: str) -> None:
        e2e.run_tailledger(["nodes", action, name], env=server.env)

    # A DERP client of ours, registered as its own node, to see the close from
    # the client side too.
    probe_private = generate_private_key()
    with namespace_sockets(e2e.ns), trio.fail_after(60):
        probe = await register_node_key(
            server.port, public_key_of(probe_private), auth_key=e2e.preauth_key(server), hostname="probe"
        )
        while True:
            try:
                client = await connect_derp(url, probe_private)
                break
            except UnauthorizedError:
                await trio.sleep(0.1)
        async with client:
            await client.ping_rtt()
            for name in ("nodeb", probe.hostname):
                await trio.to_thread.run_sync(remove, name)
            # Our connection is closed by the relay: reading ends in an error.
            with pytest.raises(ConnectionClosedError):
                await drain(client)

    after = wait_metrics(e2e, server, lambda m: m["revoked"] >= 2 and m["current_keys"] == 1)
    log = server.process.log_text()
    assert f"relay: revoked {key_b.hex()[:16]}" in log, "nodeb's key was not revoked"
    assert f"relay: revoked {public_key_of(probe_private).hex()[:16]}" in log
    if action == "delete":
        # nodeb keeps trying to reconnect to DERP with its dead key and is refused.
        # (An expired node may learn of its expiry first and stop trying.)
        server.process.wait_for_log(re.escape(f"{short_key(key_b)}: not authorized"), timeout=30)
    assert after["current_keys"] == 1, after  # only nodea is left
    # And nodea can no longer reach nodeb.
    try:
        unreachable = a.fetch(f"{ip_b}:80", timeout=8)
    except (TimeoutError, OSError):
        unreachable = None
    assert unreachable is None or unreachable.status != 200, unreachable


# -- 3. tailcat on our relay, separate process or embedded ------------------------


async def _admitted_after_registration(
    port: int, url: str, cert_name: str | None, auth_key: str
) -> float:
    """Register a fresh key; time until the relay admits it (refused before)."""
    private = generate_private_key()
    with pytest.raises(UnauthorizedError):
        await connect_derp(url, private, cert_name=cert_name)
    await register_node_key(port, public_key_of(private), auth_key=auth_key, hostname="probe")
    start = trio.current_time()
    while True:
        try:
            client = await connect_derp(url, private, cert_name=cert_name)
        except UnauthorizedError:
            await trio.sleep(0.1)
            continue
        async with client:
            return trio.current_time() - start


@pytest.mark.parametrize("where", ["separate", "embedded"])
async def test_tailcat_pings_over_our_relay_only_with_registered_keys(
    tailcat_e2e: E2EHarness, where: str
) -> None:
    e2e = tailcat_e2e
    tls = {"TAILLEDGER_DERP__SERVER__TLS": "true"}
    server = e2e.start_control_server(embedded_derp=where == "embedded", env_extra=tls)
    auth_key = e2e.preauth_key(server)
    relay: LedgerRelay | None = None
    if where == "separate":
        relay = e2e.start_ledger_relay(server, tls=True)
    server_key = e2e.tailcat_genkey("server")
    client_key = e2e.tailcat_genkey("client", client=True)
    stranger_key = e2e.tailcat_genkey("stranger", client=True)

    with namespace_sockets(e2e.ns), trio.fail_after(60):
        registered = [
            await register_node_key(server.port, k.node_public, auth_key=auth_key, hostname=name)
            for name, k in (("tailcat-server", server_key), ("tailcat-client", client_key))
        ]
        assert all(r.response.machine_authorized for r in registered), registered
        if relay is not None:
            derp_map: Mapping[str, Any] = relay.derp_map
            url = relay.url
        else:
            # The map our control server hands its nodes (fetched as a node would).
            assert server.derp_port is not None
            dm = await fetch_derp_map(server.port, registered[1])
            derp_map = json.loads(encode(dm))
            url = f"https://{LOOPBACK}:{server.derp_port}/derp"
        (region,) = derp_map["Regions"].values()
        (node,) = region["Nodes"]
        assert node["CertName"].startswith("sha256-raw:"), node
        # The relay follows the log: a key registered now is admitted within a poll or two.
        delay = await _admitted_after_registration(server.port, url, node["CertName"], auth_key)
        print(f"{where} relay admitted a newly registered key after {delay:.2f}s")

    maps = e2e.serve_static({"/derpmap.json": ("application/json", json.dumps(derp_map).encode())})
    map_url = maps.url("/derpmap.json")
    # No TS_DEBUG_USE_DERP_HTTP: tailcat speaks TLS and checks the pin.
    tc = e2e.start_tailcat_server(
        derpmap_url=map_url, key=str(server_key.path), derp_over_http=False, env_extra=ALWAYS_DERP
    )
    address = tc.wait_address(timeout=60)
    parsed = json.loads(e2e.run_tailcat(["parse", address]).stdout)
    assert parsed["ServerPublic"] == server_key.node_key
    assert parsed["RegionID"] == region["RegionID"]

    code = region["RegionCode"]
    ping = e2e.run_tailcat(
        ["ping", f"--derpmap-url={map_url}", f"--key={client_key.path}", "--timeout=30s", address],
        derp_over_http=False,
        env_extra=ALWAYS_DERP,
    )
    assert ping.returncode == 0, (ping.stdout, ping.stderr[-3000:])
    assert f"via DERP({code})" in ping.stdout, ping.stdout

    refused = e2e.run_tailcat(
        ["ping", f"--derpmap-url={map_url}", f"--key={stranger_key.path}", "--timeout=6s", address],
        home="tailcat-stranger",
        derp_over_http=False,
        env_extra=ALWAYS_DERP,
    )
    assert refused.returncode != 0, refused.stdout
    assert "pong" not in refused.stdout, refused.stdout
    relay_log = (relay.process if relay is not None else server.process).log_text()
    assert f"{short_key(stranger_key.node_public)}: not authorized" in relay_log
    for k in (server_key, client_key):
        assert f"{short_key(k.node_public)}: not authorized" not in relay_log
    assert tc.process.running


def test_separate_relay_from_derp_map_sources_carries_tsnet_traffic(caddy_e2e: E2EHarness) -> None:
    e2e = caddy_e2e
    # The operator's path: run the control server, start ``tailledger relay`` on
    # its log, put the DERP map the relay prints into ``derp.paths`` (and, here,
    # the same relay under a second region ID behind ``derp.urls``), restart.
    first = e2e.start_control_server(embedded_derp=False)
    key = e2e.preauth_key(first)
    relay = e2e.start_ledger_relay(first, tls=True, region_id=900)
    map_file = e2e.root / "derpmap.json"
    map_file.write_text(json.dumps(relay.derp_map))
    region_900 = relay.derp_map["Regions"]["900"]
    region_901 = {
        **region_900,
        "RegionID": 901,
        "RegionCode": "r901",
        "Nodes": [{**relay.node, "Name": "901a", "RegionID": 901}],
    }
    maps = e2e.serve_static(
        {"/derp.json": ("application/json", json.dumps({"Regions": {"901": region_901}}).encode())}
    )
    first.process.stop()
    server = e2e.start_control_server(
        name="tailledger-restarted",
        embedded_derp=False,
        env_extra={
            "TAILLEDGER_DATA": first.env["TAILLEDGER_DATA"],
            # Same log, so the same signing key: its checkpoints must verify.
            "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": first.env["TAILLEDGER_AUDIT__SIGNING_KEY_FILE"],
            "TAILLEDGER_DERP__PATHS": json.dumps([str(map_file)]),
            "TAILLEDGER_DERP__URLS": json.dumps([maps.url("/derp.json")]),
        },
    )
    assert [r.target for r in maps.requests] == ["/derp.json"]  # fetched once, at start-up
    a = e2e.start_caddy_node(
        CaddyNodeSpec("nodea", control_url=server.control_url, auth_key=key),
        env_extra=ALWAYS_DERP,
        derp_over_http=False,
    )
    b = e2e.start_caddy_node(
        CaddyNodeSpec("nodeb", control_url=server.control_url, auth_key=key),
        env_extra=ALWAYS_DERP,
        derp_over_http=False,
    )
    a.wait_running(timeout=60)
    b.wait_running(timeout=60)
    view = a.wait_for_peers({"nodeb"}, timeout=60)
    assert view.derp_map is not None
    assert sorted(view.derp_map["Regions"]) == ["900", "901"], view.derp_map
    for rid in ("900", "901"):
        (node,) = view.derp_map["Regions"][rid]["Nodes"]
        assert (node["HostName"], node["DERPPort"], node["CertName"]) == (
            LOOPBACK,
            relay.derp_port,
            relay.node["CertName"],
        )
    ip_b = view.ipv4("nodeb")
    resp = a.fetch(f"{ip_b}:80", timeout=30)
    assert (resp.status, resp.text) == (200, "hello from nodeb")
    # UDP is off and the control server runs no relay: the separate relay
    # carried it. It admitted both nodes (no refusals) and sees them leave.
    relay_log = relay.process.log_text()
    assert "not authorized" not in relay_log, relay_log
    key_b = node_key_of(b)
    b.stop()
    relay.process.wait_for_log(re.escape(f"{short_key(key_b)} closed"), timeout=30)


# -- 4. STUN ---------------------------------------------------------------------------


def test_stun_maps_each_sender_to_its_own_address(e2e: E2EHarness) -> None:
    stun_port = e2e.ns.free_port()
    server = e2e.start_control_server(
        env_extra={"TAILLEDGER_DERP__SERVER__STUN_LISTEN_ADDR": f"0.0.0.0:{stun_port}"}
    )
    before = relay_metrics(e2e, server)
    seen = []
    for source, target in ((LOOPBACK, LOOPBACK), (PEER_ADDR, NS_ADDR), (NS_ADDR, PEER_ADDR)):
        sender, mapped = stun_binding(e2e.ns, target, stun_port, source=source)
        assert sender[0] == source
        assert mapped == sender, (source, target, mapped)
        seen.append(mapped)
    assert len(set(seen)) == 3
    after = relay_metrics(e2e, server)
    assert after["stun_requests"] - before["stun_requests"] == 3, after
    assert after["stun_malformed"] == before["stun_malformed"]


# -- 5. meshing ---------------------------------------------------------------------


async def test_meshed_relays_forward_between_their_clients(e2e: E2EHarness) -> None:
    server = e2e.start_control_server(embedded_derp=False)
    auth_key = e2e.preauth_key(server)
    p1, p2 = e2e.ns.free_ports(2)
    urls = [f"http://{LOOPBACK}:{p}/derp" for p in (p1, p2)]
    mesh = {
        "TAILLEDGER_DERP__SERVER__MESH_KEY": secrets.token_hex(32),
        # Both relays get the whole list; each skips itself.
        "TAILLEDGER_DERP__SERVER__MESH_WITH": "[" + ", ".join(f'{{url = "{u}"}}' for u in urls) + "]",
    }
    relays = [
        e2e.start_ledger_relay(
            server,
            name=f"relay{i}",
            tls=False,
            env_extra={
                **mesh,
                "TAILLEDGER_DERP__SERVER__LISTEN_ADDR": f"{LOOPBACK}:{port}",
                "TAILLEDGER_DERP__SERVER__NODE_NAME": f"900{'ab'[i]}",
            },
        )
        for i, port in enumerate((p1, p2))
    ]
    # One region, two nodes: what the control server's map would list.
    assert [r.node["Name"] for r in relays] == ["900a", "900b"]
    assert {r.node["RegionID"] for r in relays} == {900}
    for r, own, other in ((relays[0], urls[0], urls[1]), (relays[1], urls[1], urls[0])):
        r.process.wait_for_log(re.escape(f"mesh link to {other} up"), timeout=30)
        # Its own entry in the shared list was skipped, not dialled.
        assert f"mesh {own}" not in r.process.log_text()
        assert f"mesh link to {own}" not in r.process.log_text()

    x, y = generate_private_key(), generate_private_key()
    with namespace_sockets(e2e.ns), trio.fail_after(60):
        for name, k in (("x", x), ("y", y)):
            await register_node_key(server.port, public_key_of(k), auth_key=auth_key, hostname=name)
        clients = []
        for private, url in ((x, urls[0]), (y, urls[1])):
            while True:
                try:
                    clients.append(await connect_derp(url, private))
                    break
                except UnauthorizedError:
                    await trio.sleep(0.1)
        cx, cy = clients
        async with cx, cy:
            payload = b"across the mesh " + secrets.token_bytes(8)
            received: PacketReceived | None = None
            while received is None:
                # Until relay0 has heard from relay1 that y is there, it drops
                # the packet (unknown destination); send again.
                await cx.send(public_key_of(y), payload)
                with trio.move_on_after(0.5):
                    while True:
                        event = await cy.recv()
                        if isinstance(event, PacketReceived):
                            received = event
                            break
            assert (received.source, received.data) == (public_key_of(x), payload)
