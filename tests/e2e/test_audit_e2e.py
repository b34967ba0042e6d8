"""End to end, audit: a real client joins; an operator working from a second Unix
account, through the group admin socket, tags it with a reason; the log names that
account and that reason, and the client's login is one request (one correlation id).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.accounts import NOBODY, NOGROUP, as_other_account

from .caddy import CaddyNodeSpec
from .harness import E2EHarness

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second account"),
]


def test_an_operator_of_the_admin_group_tags_a_real_node_with_a_reason(caddy_e2e: E2EHarness) -> None:
    base = Path(tempfile.mkdtemp(prefix="tl-e2e-admin-"))
    base.chmod(0o711)  # the operator's account must reach the socket's directory
    sock = base / "run" / "admin.sock"
    try:
        server = caddy_e2e.start_control_server(
            env_extra={"TAILLEDGER_ADMIN_SOCKET": str(sock), "TAILLEDGER_ADMIN__SOCKET_GROUP": "nogroup"}
        )
        key = caddy_e2e.preauth_key(server)
        policy = base / "policy.hujson"
        policy.write_text(
            '{"tagOwners": {"tag:web": ["autogroup:admin"]}, '
            '"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
        )
        caddy_e2e.run_tailledger(["policy", "set", str(policy)], env=server.env)
        node = caddy_e2e.start_caddy_node(CaddyNodeSpec("webnode", control_url=server.control_url, auth_key=key))
        node.wait_running(timeout=60)

        operator_env = {"TAILLEDGER_ADMIN_SOCKET": str(sock), "TAILLEDGER_DATA": server.env["TAILLEDGER_DATA"]}
        code, out, err = as_other_account(
            ["nodes", "tag", "webnode", "--tags", "tag:web", "--reason", "OPS-42: web tier", "-o", "json"],
            operator_env, NOBODY, NOGROUP,
        )
        assert code == 0, err
        assert json.loads(out)["tags"] == ["tag:web"]

        shown = json.loads(caddy_e2e.run_tailledger(["log", "show", "-o", "json"], env=server.env).stdout)
        [tagged] = [e for e in shown if e["type"] == "node.tags_set"]
        assert tagged["actor"] == "admin:nobody"
        assert tagged["reason"] == "OPS-42: web tier"
        table = caddy_e2e.run_tailledger(["log", "show", "--type", "node.tags_set"], env=server.env).stdout
        assert "admin:nobody" in table and 'reason="OPS-42: web tier"' in table
        # The client's login was one request: its events share one correlation id.
        login = [e for e in shown if e["actor"].startswith("node:") and e["type"] in ("node.registered", "preauthkey.used")]
        assert len(login) == 2 and len({e["correlation_id"] for e in login}) == 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
