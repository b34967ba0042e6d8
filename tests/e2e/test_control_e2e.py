"""End to end, control side: what the operator and the real client see.

* two tsnet nodes that registered with a pre-auth key appear *online* in
  ``tailledger nodes list``, with their hostnames and addresses, and their
  registrations are in the log with the node as actor;
* a wrong, a used and an expired key each get a clear error *on the client side*
  (the tsnet client logs the server's ``Error`` text) and no node is created.
"""

from __future__ import annotations

import json

import pytest

from tests.support.waits import wait_until_sync

from .caddy import CaddyNodeSpec
from .harness import E2EHarness

pytestmark = pytest.mark.e2e


def _nodes(e2e: E2EHarness, server: object) -> list[dict[str, object]]:
    out = e2e.run_tailledger(["nodes", "list", "-o", "json"], env=server.env).stdout  # type: ignore[attr-defined]
    result: list[dict[str, object]] = json.loads(out)
    return result


def test_registered_nodes_are_listed_online_with_names_and_ips(caddy_e2e: E2EHarness) -> None:
    server = caddy_e2e.start_control_server()
    key = caddy_e2e.preauth_key(server)
    a = caddy_e2e.start_caddy_node(CaddyNodeSpec("nodea", control_url=server.control_url, auth_key=key))
    b = caddy_e2e.start_caddy_node(CaddyNodeSpec("nodeb", control_url=server.control_url, auth_key=key))
    a.wait_running(timeout=60)
    b.wait_running(timeout=60)
    view_a = a.wait_for_peers({"nodeb"}, timeout=60)

    def both_online() -> list[dict[str, object]] | None:
        nodes = _nodes(caddy_e2e, server)
        return nodes if len(nodes) == 2 and all(n["online"] for n in nodes) else None

    nodes = wait_until_sync(
        both_online, what="both nodes listed online", seconds=30, detail=lambda: str(_nodes(caddy_e2e, server))
    )
    by_name = {n["hostname"]: n for n in nodes}
    assert set(by_name) == {"nodea", "nodeb"}
    assert all(n["online"] is True for n in nodes), nodes
    assert by_name["nodeb"]["ipv4"] == view_a.ipv4("nodeb")
    assert by_name["nodea"]["ipv4"] == view_a.ipv4()
    table = caddy_e2e.run_tailledger(["nodes", "list"], env=server.env).stdout
    for name in ("nodea", "nodeb"):
        assert name in table
        assert str(by_name[name]["ipv4"]) in table
    log = json.loads(
        caddy_e2e.run_tailledger(["log", "show", "--type", "node.registered", "-o", "json"], env=server.env).stdout
    )
    assert sorted(e["event"]["hostname"] for e in log) == ["nodea", "nodeb"]
    assert all(e["actor"].startswith("node:") for e in log)
    # Stopping a node takes it offline (after the grace period) without removing it.
    b.stop()

    def online() -> dict[object, object]:
        return {n["hostname"]: n["online"] for n in _nodes(caddy_e2e, server)}

    wait_until_sync(lambda: online().get("nodeb") is False, what="nodeb offline", seconds=40, detail=lambda: str(online()))
    assert online() == {"nodea": True, "nodeb": False}


def test_bad_keys_are_refused_on_the_client_and_create_nothing(caddy_e2e: E2EHarness) -> None:
    server = caddy_e2e.start_control_server()
    good = caddy_e2e.preauth_key(server, reusable=False)
    # A single-use key, spent by a first node.
    first = caddy_e2e.start_caddy_node(CaddyNodeSpec("first", control_url=server.control_url, auth_key=good))
    first.wait_running(timeout=60)
    expired = caddy_e2e.preauth_key(server, reusable=True)
    caddy_e2e.run_tailledger(["preauthkeys", "expire", expired], env=server.env)
    prefix, _, secret = good.rpartition("-")
    cases = {
        "wrong": (f"{prefix}-{'0' * len(secret)}", "invalid pre-auth key"),
        "used": (good, "the pre-auth key has already been used"),
        "expired": (expired, "expired"),
    }
    for name, (key, message) in cases.items():
        node = caddy_e2e.start_caddy_node(
            CaddyNodeSpec(f"bad-{name}", control_url=server.control_url, auth_key=key)
        )
        node.wait_started(timeout=30)
        node.process.wait_for_log(message, timeout=60)
        node.stop()
    nodes = _nodes(caddy_e2e, server)
    assert [n["hostname"] for n in nodes] == ["first"]
