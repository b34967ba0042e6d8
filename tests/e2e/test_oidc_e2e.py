"""End to end: a real tailscale client (Caddy/tsnet) joins without a key; a real browser
follows its AuthURL, signs in at a real OIDC provider, and the node comes online for
that user.

Everything runs in the test's network namespace: our server, the provider
(django-oidc-provider over TLS, verified by the server through ``oidc.ca_file``), the
client, and Chromium with its chromedriver (started from a thread inside the
namespace; every browser call is made from inside it too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.identity.browser import artifacts_dir, chrome, save_artifacts
from tests.identity.conftest import require as require_browser
from tests.identity.provider import CLIENT_ID, CLIENT_SECRET, build_template, prepare, seed

from .caddy import CaddyNodeSpec
from .harness import E2EHarness

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

AUTH_URL = r"(https?://[^\s\"]+/register/[A-Za-z0-9_-]+)"


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("TAILLEDGER_")}


def _sign_in(driver: Any, auth_url: str, server_url: str, user: str) -> str:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(auth_url)
    assert "oidcnode" in driver.find_element(By.ID, "hostname").text
    driver.find_element(By.ID, "signin").click()
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "id_username"))
    driver.find_element(By.ID, "id_username").send_keys(user)
    driver.find_element(By.ID, "id_password").send_keys("pw-" + user)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.current_url.startswith(server_url) and d.find_elements(By.TAG_NAME, "h1")
    )
    return str(driver.find_element(By.TAG_NAME, "body").text)


def test_a_client_without_a_key_joins_through_a_browser_sign_in(
    caddy_e2e: E2EHarness, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    require_browser()
    e2e = caddy_e2e
    template = build_template(tmp_path / "provider-template", _base_env())
    [provider_port] = e2e.ns.free_ports(1)
    project = prepare(template, tmp_path / "provider", provider_port)
    secret = tmp_path / "oidc-secret"
    secret.write_text(CLIENT_SECRET)
    server = e2e.start_control_server(
        env_extra={
            "TAILLEDGER_OIDC__ISSUER": project.issuer,
            "TAILLEDGER_OIDC__CLIENT_ID": CLIENT_ID,
            "TAILLEDGER_OIDC__CLIENT_SECRET_PATH": str(secret),
            "TAILLEDGER_OIDC__CA_FILE": str(project.cert),
            "TAILLEDGER_OIDC__ALLOWED_DOMAINS": '["example.com"]',
            "TAILLEDGER_OIDC__SCOPE": '["openid", "profile", "email", "groups"]',
        }
    )
    seed(project, [f"{server.control_url}/oidc/callback"], _base_env())
    provider = e2e.start_process("oidc-provider", project.command(), env=project.env(_base_env()), cwd=project.root)
    e2e.wait_listening(provider, provider_port, timeout=60)
    issuer = project.issuer

    node = e2e.start_caddy_node(CaddyNodeSpec("oidcnode", control_url=server.control_url))
    auth_url = node.process.wait_for_log(AUTH_URL, timeout=60).group(1)

    with e2e.ns.entered():
        driver = chrome(tmp_path / "chrome-profile")
        try:
            page = _sign_in(driver, auth_url, server.control_url, "alice")
            assert "is now in the tailnet as alice@example.com" in page
        except BaseException:
            save_artifacts(driver, artifacts_dir(request.node.name), "browser")
            raise
        finally:
            driver.quit()

    node.wait_running(timeout=90)
    nodes = json.loads(e2e.run_tailledger(["nodes", "list", "-o", "json"], env=server.env).stdout)
    [listed] = nodes
    assert listed["user"] == "alice@example.com" and listed["online"] is True

    events = json.loads(e2e.run_tailledger(["log", "show", "-o", "json"], env=server.env).stdout)
    by_type = {e["type"]: e for e in events}
    actor = by_type["node.registered"]["actor"]
    assert actor.startswith(f"oidc:{issuer}#") and by_type["user.created"]["actor"] == actor
    assert CLIENT_SECRET not in e2e.log_report(lines=10_000)
