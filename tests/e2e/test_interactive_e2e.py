"""End to end: a real tsnet client logs in without a key; an admin approves one
machine and rejects another with the CLI (``nodes pending``, ``register``, ``reject``).

The client's follow-up register request is a long poll answered only when the
request is decided (a streamed body); this checks that the Go client accepts it,
comes up Running when approved, and shows the reason when rejected.
"""

from __future__ import annotations

import json
import re

import pytest

from .caddy import RUNNING_PATTERN, CaddyNodeSpec
from .harness import E2EHarness

pytestmark = pytest.mark.e2e

AUTH_URL = r"https?://[^\s\"]+/register/([A-Za-z0-9_-]+)"


def test_interactive_login_approved_and_rejected_from_the_cli(caddy_e2e: E2EHarness) -> None:
    server = caddy_e2e.start_control_server()
    caddy_e2e.run_tailledger(["users", "create", "e2e"], env=server.env)
    good = caddy_e2e.start_caddy_node(CaddyNodeSpec("goodnode", control_url=server.control_url))
    bad = caddy_e2e.start_caddy_node(CaddyNodeSpec("badnode", control_url=server.control_url))
    good_id = good.process.wait_for_log(AUTH_URL, timeout=60).group(1)
    bad_id = bad.process.wait_for_log(AUTH_URL, timeout=60).group(1)

    listed = json.loads(caddy_e2e.run_tailledger(["nodes", "pending", "-o", "json"], env=server.env).stdout)
    assert {p["key"]: p["hostname"] for p in listed} == {good_id: "goodnode", bad_id: "badnode"}

    caddy_e2e.run_tailledger(
        ["nodes", "reject", "--key", bad_id, "--reason", "unknown machine"], env=server.env
    )
    caddy_e2e.run_tailledger(["nodes", "register", "--key", good_id, "--user", "e2e"], env=server.env)

    good.wait_running(timeout=60)
    bad.process.wait_for_log(r"rejected this machine's registration: unknown machine", timeout=60)
    assert re.search(RUNNING_PATTERN, bad.process.log_text()) is None

    events = json.loads(
        caddy_e2e.run_tailledger(["log", "show", "--type", "node.", "-o", "json"], env=server.env).stdout
    )
    kinds = [(e["type"], e["reason"]) for e in events if e["type"] in ("node.registered", "node.registration_rejected")]
    assert kinds == [("node.registration_rejected", "unknown machine"), ("node.registered", "")]
