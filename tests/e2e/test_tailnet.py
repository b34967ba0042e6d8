"""End to end: ``tailledger serve`` plus two real tsnet nodes form a working tailnet.

The scenario: our server (control port + embedded DERP relay and STUN) runs in
the test namespace; two Caddy/tsnet nodes (tailscale.com v1.90.9) register
with one reusable pre-auth key; each sees the other as a peer in the map
responses it received; an HTTP request made *from* node A's tsnet stack
reaches node B's tailnet site, by tailnet IP and by MagicDNS name, and back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from .caddy import CaddyNodeSpec
from .harness import E2EHarness, TailledgerServer

pytestmark = pytest.mark.e2e


def test_two_nodes_register_see_each_other_and_talk(caddy_e2e: E2EHarness) -> None:
    server = caddy_e2e.start_control_server()
    key = caddy_e2e.preauth_key(server)
    a = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("nodea", control_url=server.control_url, auth_key=key)
    )
    b = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("nodeb", control_url=server.control_url, auth_key=key)
    )

    a.wait_running(timeout=60)
    b.wait_running(timeout=60)
    view_a = a.wait_for_peers({"nodeb"}, timeout=60)
    view_b = b.wait_for_peers({"nodea"}, timeout=60)

    # Both sides agree on who is who.
    assert view_a.self_node is not None
    assert view_b.self_node is not None
    assert view_a.peer("nodeb")["Key"] == view_b.self_node["Key"]
    assert view_b.peer("nodea")["Key"] == view_a.self_node["Key"]
    assert view_a.ipv4("nodeb") == view_b.ipv4()
    assert view_b.ipv4("nodea") == view_a.ipv4()
    assert view_a.ipv4() != view_b.ipv4()
    # The DERP map they got names our embedded relay.
    assert server.derp_port is not None
    (region,) = (view_a.derp_map or {})["Regions"].values()
    assert [n["DERPPort"] for n in region["Nodes"]] == [server.derp_port]

    resp = a.fetch(f"{view_a.ipv4('nodeb')}:80", timeout=30)
    assert (resp.status, resp.text, resp.headers["x-served-by"]) == (
        200,
        "hello from nodeb",
        "nodeb",
    )
    resp = b.fetch("nodea:80", timeout=30)  # MagicDNS short name, resolved from the netmap
    assert (resp.status, resp.text, resp.headers["x-served-by"]) == (
        200,
        "hello from nodea",
        "nodea",
    )


async def test_two_nodes_talk_trio_flavour(caddy_e2e: E2EHarness) -> None:
    server = caddy_e2e.start_control_server()
    key = caddy_e2e.preauth_key(server)
    a = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("nodea", control_url=server.control_url, auth_key=key)
    )
    b = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("nodeb", control_url=server.control_url, auth_key=key)
    )
    with trio.fail_after(90):
        await a.wait_running_async()
        await b.wait_running_async()
        view = await a.wait_for_peers_async({"nodeb"})
        await b.wait_for_peers_async({"nodea"})
        resp = await a.fetch_async(f"{view.ipv4('nodeb')}:80")
    assert (resp.status, resp.text) == (200, "hello from nodeb")


def test_zero_configuration_tailnet_passes_traffic(caddy_e2e: E2EHarness) -> None:
    """The README's first command, then two clients with a pre-auth key: traffic flows.

    With no configuration a server run as root keeps its log signing key in
    ``/etc/tailledger``; whatever this test made there is removed afterwards, so the
    suite leaves the machine as it found it.
    """
    system_dir = Path("/etc/tailledger")
    before = set(system_dir.iterdir()) if system_dir.is_dir() else None
    try:
        _zero_configuration_run(caddy_e2e)
    finally:
        if before is None:
            shutil.rmtree(system_dir, ignore_errors=True)
        elif system_dir.is_dir():
            for made in set(system_dir.iterdir()) - before:
                made.unlink(missing_ok=True)


def _zero_configuration_run(caddy_e2e: E2EHarness) -> None:
    """The README's first command, then two clients with a pre-auth key: traffic flows.

    ``tailledger serve`` runs with no configuration file and no ``TAILLEDGER_*``
    variable (its own namespace, so the default ports are free). The clients dial DERP
    as stock clients do, over https (no ``TS_DEBUG_USE_DERP_HTTP``): the embedded relay
    on the control port, pinned by the DERP map's CertName.
    """
    process = caddy_e2e.start_tailledger(["serve"], name="zero")
    caddy_e2e.wait_listening(process, 8080)
    # Admin commands find the server through its data directory (./tailledger-data).
    admin_env = {"TAILLEDGER_DATA": str(caddy_e2e.work_dir / "zero" / "tailledger-data")}
    server = TailledgerServer(process, admin_env, 8080, None, None, 9090)
    key = caddy_e2e.preauth_key(server)
    a = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("nodea", control_url="http://127.0.0.1:8080", auth_key=key), derp_over_http=False
    )
    b = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("nodeb", control_url="http://127.0.0.1:8080", auth_key=key), derp_over_http=False
    )
    a.wait_running(timeout=60)
    b.wait_running(timeout=60)
    view_a = a.wait_for_peers({"nodeb"}, timeout=60)
    b.wait_for_peers({"nodea"}, timeout=60)
    (region,) = (view_a.derp_map or {})["Regions"].values()
    (node,) = region["Nodes"]
    assert (node["HostName"], node["DERPPort"], node.get("STUNPort", 0)) == ("127.0.0.1", 8080, 0)  # 0: 3478
    assert node["CertName"].startswith("sha256-raw:")
    resp = a.fetch(f"{view_a.ipv4('nodeb')}:80", timeout=30)
    assert (resp.status, resp.text) == (200, "hello from nodeb")
    resp = b.fetch("nodea:80", timeout=30)
    assert (resp.status, resp.text) == (200, "hello from nodea")
    # The DNS configuration the client received: MagicDNS with the tailnet's domain and
    # its reverse zones answered by 100.100.100.100.
    dns = view_a.dns_config or {}
    assert dns.get("Proxied") is True and dns.get("Domains") == ["tailnet.internal"]
    assert dns["Routes"]["64.100.in-addr.arpa."] in (None, [])
    assert "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa." in dns["Routes"]


def test_a_client_receives_the_dns_configuration(caddy_e2e: E2EHarness) -> None:
    """Extra records and override_local_dns, as a real client receives them."""
    env = {
        "TAILLEDGER_DNS__EXTRA_RECORDS": '[{name = "wiki.corp", type = "A", value = "100.64.0.7"}]',
        "TAILLEDGER_DNS__NAMESERVERS": '["192.0.2.53"]',
        "TAILLEDGER_DNS__OVERRIDE_LOCAL_DNS": "true",
    }
    server = caddy_e2e.start_control_server(env_extra=env)
    key = caddy_e2e.preauth_key(server)
    a = caddy_e2e.start_caddy_node(CaddyNodeSpec("nodea", control_url=server.control_url, auth_key=key))
    a.wait_running(timeout=60)
    view = a.view()
    dns = view.dns_config or {}
    assert dns.get("ExtraRecords") == [{"Name": "wiki.corp", "Type": "A", "Value": "100.64.0.7"}]
    assert [r["Addr"] for r in dns.get("Resolvers") or []] == ["192.0.2.53"]
    assert not dns.get("FallbackResolvers")


def test_advertised_tags_of_a_real_client(caddy_e2e: E2EHarness) -> None:
    """``AdvertiseTags`` of a real tsnet client: applied when its user owns the tag,
    refused with Tailscale's message otherwise."""
    server = caddy_e2e.start_control_server()
    key = caddy_e2e.preauth_key(server)
    policy = caddy_e2e.root / "policy.hujson"
    policy.write_text(
        '{"groups": {"group:dba": ["other@"]}, "tagOwners": {"tag:web": ["e2e@"], "tag:db": ["group:dba"]},'
        ' "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    )
    caddy_e2e.run_tailledger(["users", "create", "other"], env=server.env)
    caddy_e2e.run_tailledger(["policy", "set", str(policy)], env=server.env)
    web = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("web", control_url=server.control_url, auth_key=key, tags=("tag:web",))
    )
    web.wait_running(timeout=60)
    view = web.view()
    assert view.self_node is not None and view.self_node.get("Tags") == ["tag:web"]
    db = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("db", control_url=server.control_url, auth_key=key, tags=("tag:db",))
    )
    db.process.wait_for_log("requested tags \\[tag:db\\] are invalid or not permitted", timeout=60)
