"""End to end: HA subnet routers fail over, as a real tsnet client sees it.

``tailledger serve`` runs in the test namespace with no failover grace. Two
routers (``simrouter.py`` processes: our protocol client, since neither real
client can advertise routes; see its docstring) advertise one prefix, the
operator approves it on both with ``tailledger routes approve``, and a real
Caddy/tsnet node watches its own map responses (``TS_DEBUG_MAP``):

1. the first router is primary: its ``PrimaryRoutes`` and ``AllowedIPs`` carry
   the prefix, the second's do not;
2. the primary is killed (SIGKILL: its stream ends without a goodbye); the
   client's map moves the prefix to the second router;
3. the first router comes back (same keys: a daemon restart) and is online in
   the client's map, but the prefix stays with the second (no flapping);
4. ``tailledger routes list`` agrees, and the log holds both primary changes
   by ``system:ha``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.waits import wait_until_sync

from .caddy import CaddyNode, CaddyNodeSpec
from .harness import E2EHarness, TailledgerServer
from .processes import ManagedProcess
from .tsnet_log import TailnetView

pytestmark = pytest.mark.e2e

NET = "10.77.0.0/24"
ROUTER = Path(__file__).with_name("simrouter.py")


def _start_router(
    harness: E2EHarness, server: TailledgerServer, key: str, name: str
) -> ManagedProcess:
    argv = [
        sys.executable, str(ROUTER), "--port", str(server.port), "--auth-key", key,
        "--hostname", name, "--route", NET, "--state", str(harness.root / f"{name}-state"),
    ]  # fmt: skip
    process = harness.start_process(f"{name}-{len(harness.processes)}", argv, env=server.env)
    process.wait_for_log("streaming nodekey:", timeout=60)
    return process


def _carries(view: TailnetView, name: str) -> bool:
    peer = view.peer(name)
    return NET in (peer.get("PrimaryRoutes") or []) and NET in (peer.get("AllowedIPs") or [])


def _watch(
    node: CaddyNode, condition: Callable[[TailnetView], bool], what: str, timeout: float = 60
) -> TailnetView:

    def seen() -> TailnetView | None:
        view = node.view()
        try:
            return view if condition(view) else None
        except KeyError:
            return None  # a peer not seen yet

    return wait_until_sync(seen, what=what, seconds=timeout, detail=lambda: f"peers: {node.view().peers}")


def _primaries(harness: E2EHarness, server: TailledgerServer) -> dict[str, list[str]]:
    """``tailledger routes list``: node name -> the prefixes it is primary for."""
    rows: list[dict[str, Any]] = json.loads(
        harness.run_tailledger(["routes", "list", "-o", "json"], env=server.env).stdout
    )
    return {row["node"]: row["primary"] for row in rows}


def test_primary_router_dies_and_a_real_client_moves_the_subnet(caddy_e2e: E2EHarness) -> None:
    server = caddy_e2e.start_control_server(
        env_extra={"TAILLEDGER_TUNING__ROUTE_FAILOVER_GRACE": "0s"}
    )
    key = caddy_e2e.preauth_key(server)
    first = _start_router(caddy_e2e, server, key, "router1")
    second = _start_router(caddy_e2e, server, key, "router2")
    for name in ("router1", "router2"):
        caddy_e2e.run_tailledger(["routes", "approve", name, NET], env=server.env)

    client = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("client", control_url=server.control_url, auth_key=key)
    )
    client.wait_running(timeout=60)
    view = _watch(client, lambda v: _carries(v, "router1"), "router1 primary")
    assert not _carries(view, "router2")
    assert NET not in (view.peer("router2").get("AllowedIPs") or [])

    first.signal(9)
    first.wait_exit(timeout=10)
    view = _watch(
        client,
        lambda v: _carries(v, "router2") and not _carries(v, "router1"),
        "failover to router2",
    )
    assert NET not in (view.peer("router1").get("AllowedIPs") or [])

    _start_router(caddy_e2e, server, key, "router1")  # the same machine and node, back online
    view = _watch(client, lambda v: v.peer("router1").get("Online") is True, "router1 back online")
    assert _carries(view, "router2") and not _carries(view, "router1")
    assert second.running

    assert _primaries(caddy_e2e, server) == {"router1": [], "router2": [NET]}
    log = json.loads(caddy_e2e.run_tailledger(["log", "show", "-o", "json"], env=server.env).stdout)
    changes = [
        (e["event"]["reason"], e["actor"]) for e in log if e["type"] == "route.primary_changed"
    ]
    assert changes == [("elected", "system:ha"), ("offline", "system:ha")]
