"""End to end: two ``tailledger serve`` replicas on one PostgreSQL log, a real client
(Caddy/tsnet) on each: they see each other and talk, and a tag set through replica A
reaches the client of replica B."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .caddy import CaddyNodeSpec
from .harness import E2EHarness

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_client_on_each_replica_one_tailnet(caddy_e2e: E2EHarness, pg_dsn: str, tmp_path: Path) -> None:
    shared = {
        "TAILLEDGER_DATABASE__TYPE": "postgres",
        "TAILLEDGER_DATABASE__DSN": pg_dsn,
        "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(tmp_path / "signing.key"),
    }
    replica_a = caddy_e2e.start_control_server(name="replica-a", env_extra=shared)
    replica_b = caddy_e2e.start_control_server(name="replica-b", env_extra=shared)
    policy = tmp_path / "policy.hujson"
    policy.write_text(
        '{"tagOwners": {"tag:web": ["autogroup:admin"]}, '
        '"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    )
    caddy_e2e.run_tailledger(["policy", "set", str(policy)], env=replica_a.env)
    key = caddy_e2e.preauth_key(replica_a)  # made on A, used on B too: one log
    a = caddy_e2e.start_caddy_node(CaddyNodeSpec("nodea", control_url=replica_a.control_url, auth_key=key))
    b = caddy_e2e.start_caddy_node(CaddyNodeSpec("nodeb", control_url=replica_b.control_url, auth_key=key))
    a.wait_running(timeout=90)
    b.wait_running(timeout=90)
    view_a = a.wait_for_peers({"nodeb"}, timeout=90)
    view_b = b.wait_for_peers({"nodea"}, timeout=90)
    assert view_a.peer("nodeb")["Key"] == (view_b.self_node or {})["Key"]

    resp = a.fetch(f"{view_a.ipv4('nodeb')}:80", timeout=60)
    assert (resp.status, resp.text) == (200, "hello from nodeb")

    caddy_e2e.run_tailledger(["nodes", "tag", "nodeb", "--tags", "tag:web"], env=replica_a.env)
    deadline = time.monotonic() + 60  # a guard against hanging, not a timing assertion
    while "tag:web" not in ((b.view().self_node or {}).get("Tags") or []):
        assert time.monotonic() < deadline, "the tag set through replica A never reached the client of B"
        time.sleep(0.2)
