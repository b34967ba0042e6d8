"""OIDC sign-in on the registration page, in a real browser against a real provider.

The server runs in this process (a simulated client makes the pending registration
over the real control protocol); the provider is ``django-oidc-provider`` in its own
process, over TLS that the server verifies with ``oidc.ca_file``; the browser is
Chromium. Browser calls run in a thread: the server shares this trio loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
import trio

from cli.server import Services
from eventlog import RecordedEvent
from eventlog.events import NodeRegistered, UserCreated
from projections.tailcfg import RegisterResponse
from protocol import ControlClient
from tests.protocol.control_harness import ADMIN, SimNode, running
from tests.support.waits import wait_until

from .conftest import free_port
from .provider import CLIENT_ID, CLIENT_SECRET, ProviderProject

pytestmark = pytest.mark.browser


async def _t(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(partial(fn, *args))


@dataclass
class Setup:
    server: Services
    project: ProviderProject

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def events(self) -> list[RecordedEvent]:
        return list(self.server.store.read())


@asynccontextmanager
async def serving(
    tmp_path: Path, start_provider: Callable[[list[str]], ProviderProject], **overrides: object
) -> AsyncIterator[Setup]:
    port = free_port()
    project = await _t(start_provider, [f"http://127.0.0.1:{port}/oidc/callback"])
    secret = tmp_path / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    oidc: dict[str, object] = {
        "issuer": project.issuer,
        "client_id": CLIENT_ID,
        "client_secret_path": str(secret),
        "ca_file": str(project.cert),
        "allowed_domains": ["example.com"],
        "admin_groups": ["tailnet-admins"],
        "scope": ["openid", "profile", "email", "groups"],
    }
    oidc.update(overrides.pop("oidc", {}))  # type: ignore[call-overload]
    async with running(tmp_path / "server", listen_addr=f"127.0.0.1:{port}", oidc=oidc, **overrides) as server:
        yield Setup(server, project)


@asynccontextmanager
async def pending_machine(setup: Setup, hostname: str = "laptop") -> AsyncIterator[tuple[str, list[RegisterResponse]]]:
    """A machine waiting for approval: its AuthURL and (once decided) the answer of its
    follow-up request."""
    node = SimNode.new(hostname)
    async with node.connect(setup.server) as client:
        first = await client.register(node.register_request())
        assert first.auth_url
        answers: list[RegisterResponse] = []

        async def follow(c: ControlClient) -> None:
            answers.append(await c.register(node.register_request(followup=first.auth_url)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, client)
            yield first.auth_url, answers
            nursery.cancel_scope.deadline = trio.current_time() + 30


async def provider_login(driver: Any, user: str, server_url: str) -> None:
    """At the provider's login form: log in as ``user``; wait until back at the server."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def fill() -> None:
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "id_username"))
        driver.find_element(By.ID, "id_username").send_keys(user)
        driver.find_element(By.ID, "id_password").send_keys("pw-" + user)
        driver.find_element(By.ID, "login").click()
        WebDriverWait(driver, 30).until(lambda d: d.current_url.startswith(server_url))
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")

    await _t(fill)


async def click(driver: Any, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    await _t(lambda: driver.find_element(By.ID, element_id).click())


async def see(driver: Any, needle: str) -> None:
    """Wait until the page shows ``needle`` (a navigation may still be under way: the
    body read a moment ago may be gone, so a stale element is read again)."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def wait() -> None:
        waiting = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException, NoSuchElementException))
        try:
            waiting.until(lambda d: needle in d.find_element(By.TAG_NAME, "body").text)
        except TimeoutException:
            body = driver.find_element(By.TAG_NAME, "body").text
            raise AssertionError(f"{needle!r} not on the page {driver.current_url}:\n{body}") from None

    await _t(wait)


async def text(driver: Any) -> str:
    """The page's text, read from a thread: the server answering the browser runs on
    this trio loop, which must not block."""
    from selenium.webdriver.common.by import By

    return str(await _t(lambda: driver.find_element(By.TAG_NAME, "body").text))


def callback_urls(driver: Any) -> list[str]:
    """The /oidc/callback URLs the browser requested (from Chromium's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if "/oidc/callback" in url:
                urls.append(url)
    return urls


async def test_sign_in_registers_the_machine_to_the_token_user(
    tmp_path: Path, start_provider: Any, browsers: Callable[[], Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(tmp_path, start_provider, oidc={"expiry": "7d"}) as setup:
        driver = await _t(browsers)
        async with pending_machine(setup, "alices-laptop") as (auth_url, answers):
            await _t(driver.get, auth_url)
            page = await text(driver)
            assert "alices-laptop" in page and "linux" in page
            await click(driver, "signin")
            await provider_login(driver, "alice", setup.url)
            await see(driver, "is now in the tailnet as alice@example.com")
            await wait_until(lambda: answers, what="the machine's answer", seconds=30)
        [answer] = answers
        assert answer.machine_authorized and answer.login.login_name == "alice@example.com"

        events = setup.events()
        created = [e for e in events if e.type == "user.created"]
        registered = [e for e in events if e.type == "node.registered"]
        assert len(created) == 1 and len(registered) == 1
        actor = str(registered[0].actor)
        assert actor.startswith(f"oidc:{setup.project.issuer}#") and created[0].actor == registered[0].actor
        assert isinstance(created[0].event, UserCreated) and isinstance(registered[0].event, NodeRegistered)
        user = setup.server.runner.state.users[created[0].event.user_id]
        assert (user.email, user.display_name, user.provider) == ("alice@example.com", "Alice Example", "oidc")
        assert user.role == "owner"  # the first user of the tailnet
        node = setup.server.runner.state.nodes[registered[0].event.node_id]
        assert node.user_id == user.id and registered[0].event.auth == "oidc"
        assert node.expiry is not None  # oidc.expiry = 7d

        # The provider's answer used once is refused when replayed, and appends nothing.
        [callback] = await _t(callback_urls, driver)
        await _t(driver.get, callback)
        await see(driver, "not valid")
        assert len(setup.events()) == len(events)
    # The client secret reaches the provider, never the logs.
    assert CLIENT_SECRET not in caplog.text
    assert any("registered to alice@example.com by sign-in" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("user", "shown", "logged"),
    [
        ("bob", "Accounts of your e-mail domain may not join", "e-mail domain other.org"),
        ("carol", "has not verified your e-mail address", "is not verified"),
    ],
)
async def test_a_refused_sign_in_shows_why_logs_it_and_appends_nothing(
    tmp_path: Path, start_provider: Any, browsers: Callable[[], Any], caplog: pytest.LogCaptureFixture,
    user: str, shown: str, logged: str,
) -> None:
    async with serving(tmp_path, start_provider) as setup:
        driver = await _t(browsers)
        before = len(setup.events())
        async with pending_machine(setup) as (auth_url, answers):
            await _t(driver.get, auth_url)
            await click(driver, "signin")
            await provider_login(driver, user, setup.url)
            await see(driver, shown)
            assert not answers  # still waiting
            assert await setup.server.control.pending.get(auth_url.rsplit("/", 1)[1]) is not None
        assert len(setup.events()) == before
        assert not setup.server.runner.state.users
        assert any(logged in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_a_tampered_state_is_refused(
    tmp_path: Path, start_provider: Any, browsers: Callable[[], Any]
) -> None:
    async with serving(tmp_path, start_provider) as setup:
        driver = await _t(browsers)
        async with pending_machine(setup) as (auth_url, answers):
            await _t(driver.get, auth_url)
            await click(driver, "signin")
            # At the provider: the authorization request comes back with another state.
            parts = urlsplit(await _t(lambda: driver.current_url))
            query = dict(parse_qsl(parts.query))
            if "state" not in query:  # the login page carries the request in ?next=
                inner = urlsplit(query["next"])
                inner_q = dict(parse_qsl(inner.query))
                inner_q["state"] = inner_q["state"][:-4] + "AAAA"
                query["next"] = urlunsplit(inner._replace(query=urlencode(inner_q)))
            else:
                query["state"] = query["state"][:-4] + "AAAA"
            await _t(driver.get, urlunsplit(parts._replace(query=urlencode(query))))
            await provider_login(driver, "alice", setup.url)
            await see(driver, "not valid")
            assert not answers
        assert not setup.events() or all(e.type.startswith("policy") for e in setup.events())


async def test_an_expired_request_cannot_be_completed(
    tmp_path: Path, start_provider: Any, browsers: Callable[[], Any]
) -> None:
    async with serving(tmp_path, start_provider, limits={"pending_registration_ttl": "3s"}) as setup:
        driver = await _t(browsers)
        async with pending_machine(setup) as (auth_url, _answers):
            await _t(driver.get, auth_url)
            await click(driver, "signin")
            pending = setup.server.control.pending

            async def expired() -> bool:
                return await pending.get(auth_url.rsplit("/", 1)[1]) is None

            await wait_until(expired, what="the request to expire", seconds=30)
            await provider_login(driver, "alice", setup.url)
            await see(driver, "expired")
        assert not setup.server.runner.state.users and not setup.server.runner.state.nodes


async def test_an_admin_approves_for_a_chosen_user_with_csrf_protected_forms(
    tmp_path: Path, start_provider: Any, browsers: Callable[[], Any]
) -> None:
    async with serving(tmp_path, start_provider) as setup:
        await setup.server.ops.dispatch("users.create", {"name": "owner"}, ADMIN)
        await setup.server.ops.dispatch("users.create", {"name": "erin"}, ADMIN)
        driver = await _t(browsers)
        async with pending_machine(setup, "build-box") as (auth_url, answers):
            auth_id = auth_url.rsplit("/", 1)[1]
            # A member signing in as admin is refused, and nothing is appended.
            before = len(setup.events())
            await _t(driver.get, f"{setup.url}/oidc/login/{auth_id}?purpose=admin")
            await provider_login(driver, "alice", setup.url)
            await see(driver, "not an administrator")
            assert len(setup.events()) == before
            await _t(driver.delete_all_cookies)

            # dave is in oidc.admin_groups: he becomes an admin and may approve.
            admin_browser = await _t(browsers)
            await _t(admin_browser.get, auth_url)
            await click(admin_browser, "admin-signin")
            await provider_login(admin_browser, "dave", setup.url)
            await see(admin_browser, "Signed in as dave@example.com (admin)")
            cookies = {c["name"]: c for c in await _t(admin_browser.get_cookies)}
            session = cookies["tailledger_session"]
            assert session["httpOnly"] and session["sameSite"] == "Lax" and not session["secure"]  # http server

            # A forged form (no or wrong CSRF token, or from another site) changes nothing.
            async with httpx.AsyncClient(cookies={"tailledger_session": session["value"]}) as http:
                forged = await http.post(f"{setup.url}/register/{auth_id}/approve", data={"user": "2", "csrf": "x"})
                assert forged.status_code == 403
                other_site = await http.post(
                    f"{setup.url}/register/{auth_id}/approve", data={"user": "2"},
                    headers={"Origin": "https://evil.example"},
                )
                assert other_site.status_code == 403
            assert not setup.server.runner.state.nodes

            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import Select

            erin = setup.server.runner.state.user_named("erin")
            assert erin is not None
            await _t(lambda: Select(admin_browser.find_element(By.ID, "user")).select_by_value(str(erin.id)))
            await _t(lambda: admin_browser.find_element(By.CSS_SELECTOR, "#approve button").click())
            await see(admin_browser, "is now in the tailnet as erin")
            await wait_until(lambda: answers, what="the machine's answer", seconds=30)
        [registered] = [e for e in setup.events() if e.type == "node.registered"]
        assert registered.event.user_id == erin.id and registered.event.auth == "web"  # type: ignore[union-attr]
        dave = setup.server.runner.state.user_named("dave@example.com")
        assert dave is not None and dave.role == "admin"
        assert str(registered.actor) == f"oidc:{setup.project.issuer}#{dave.provider_id}"
        role_set = [e for e in setup.events() if e.type in ("user.created",) and e.event.user_id == dave.id]  # type: ignore[union-attr]
        assert str(role_set[0].actor) == str(registered.actor)


async def test_secure_cookies_under_an_https_server_url(tmp_path: Path, start_provider: Any) -> None:
    async with serving(tmp_path, start_provider) as setup:
        setup.server.control.public_url = "https://ledger.example"
        async with pending_machine(setup) as (auth_url, _answers):
            auth_id = auth_url.rsplit("/", 1)[1]
            async with httpx.AsyncClient() as http:
                r = await http.get(f"{setup.url}/oidc/login/{auth_id}")
        assert r.status_code == 302 and r.headers["location"].startswith(setup.project.issuer)
        query = dict(parse_qsl(urlsplit(r.headers["location"]).query))
        assert query["code_challenge_method"] == "S256" and query["redirect_uri"] == "https://ledger.example/oidc/callback"
        cookie = r.headers["set-cookie"]
        for flag in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/oidc/callback"):
            assert flag in cookie


async def test_the_provider_certificate_is_verified(
    tmp_path: Path, start_provider: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the provider's CA (and without tls_insecure_skip_verify) sign-in refuses."""
    async with serving(tmp_path, start_provider, oidc={"ca_file": ""}) as setup:
        async with pending_machine(setup) as (auth_url, _answers):
            auth_id = auth_url.rsplit("/", 1)[1]
            async with httpx.AsyncClient() as http:
                r = await http.get(f"{setup.url}/oidc/login/{auth_id}")
        assert r.status_code == 502 and "cannot be reached" in r.text
        assert any("CERTIFICATE_VERIFY_FAILED" in rec.getMessage() for rec in caplog.records)


async def test_the_callback_refuses_other_browsers_replays_mix_ups_and_swapped_codes(
    tmp_path: Path, start_provider: Any, browsers: Callable[[], Any]
) -> None:
    """OIDCLogin.finish on its own, against the real provider. The redirect URI points
    where nothing listens: the browser stops there, and the test reads the code."""
    from cli.config import OIDCConfig
    from cli.oidc import LoginRefused, OIDCLogin

    redirect = f"http://127.0.0.1:{free_port()}/oidc/callback"
    project = await _t(start_provider, [redirect])
    config = OIDCConfig(
        issuer=project.issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, ca_file=str(project.cert)
    )
    login = OIDCLogin(config, redirect)

    def state_of(url: str) -> str:
        return dict(parse_qsl(urlsplit(url).query))["state"]

    url, browser = await login.begin("req-1", "register")
    with pytest.raises(LoginRefused, match="another browser"):
        await login.finish({"state": state_of(url), "code": "c"}, "not-the-cookie")
    with pytest.raises(LoginRefused, match="already used"):  # one try per state
        await login.finish({"state": state_of(url), "code": "c"}, browser)

    url, browser = await login.begin("req-1", "register")
    with pytest.raises(LoginRefused, match="names issuer"):
        await login.finish({"state": state_of(url), "code": "c", "iss": "https://evil.example"}, browser)

    # A real code of one login, presented with another login's state (and so its PKCE
    # verifier and nonce), is refused by the provider's PKCE check.
    driver = await _t(browsers)
    first_url, first_browser = await login.begin("req-1", "register")
    second_url, _ = await login.begin("req-2", "register")
    await _t(driver.get, second_url)
    await provider_login(driver, "alice", redirect)
    answer = dict(parse_qsl(urlsplit(await _t(lambda: driver.current_url)).query))
    assert answer["state"] == state_of(second_url) and answer["code"]
    with pytest.raises(LoginRefused, match="refused the code"):
        await login.finish({"state": state_of(first_url), "code": answer["code"]}, first_browser)
