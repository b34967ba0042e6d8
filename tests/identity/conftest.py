"""Fixtures of the identity tests: a real OIDC provider process and a real browser.

The provider is ``django-oidc-provider`` (``tests/identity/provider.py``); the browser is
Debian's Chromium driven through its ``chromedriver`` by Selenium. Both come from
``tests/install-deps.sh`` (run by ``.ci/run``). When one is missing the tests skip,
except under ``CI=true``, where they fail.

A failing test leaves a screenshot and the page's HTML of every open browser in
``test-artifacts/<test name>/`` (``$TAILLEDGER_ARTIFACTS`` moves it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import wait_listening

from .browser import artifacts_dir, chrome, save_artifacts
from .provider import ProviderProject, build_template, prepare, seed

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing() -> list[str]:
    out = [f"{m} (pip)" for m in ("django", "oidc_provider", "selenium") if importlib.util.find_spec(m) is None]
    out += [f"{b} (apt)" for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    return out


def require() -> None:
    lacking = missing()
    if lacking:
        message = f"missing {', '.join(lacking)}: run tests/install-deps.sh"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    wait_listening(port, seconds=timeout, process=proc, detail=lambda: log.read_text()[-3000:])


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("TAILLEDGER_")}


@pytest.fixture(scope="session")
def provider_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require()
    return build_template(tmp_path_factory.mktemp("oidc-template"), _base_env())


@pytest.fixture
def start_provider(provider_template: Path, tmp_path: Path) -> Iterator[Callable[[list[str]], ProviderProject]]:
    """Start a provider whose client accepts these redirect URIs."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(redirect_uris: list[str]) -> ProviderProject:
        project = prepare(provider_template, tmp_path / "provider", free_port())
        seed(project, redirect_uris, _base_env())
        log = tmp_path / "provider.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                project.command(), cwd=project.root, env=project.env(_base_env()), stdout=out, stderr=subprocess.STDOUT
            )
        procs.append(proc)
        wait_port(project.port, proc, log)
        return project

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browsers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Open real browsers; each is closed after the test, with a screenshot on failure."""
    opened: list[Any] = []

    def open_browser() -> Any:
        require()
        driver = chrome(tmp_path / f"chrome-profile-{len(opened)}")
        opened.append(driver)
        return driver

    yield open_browser
    reports = request.node.stash.get(_REPORTS, {})
    failed = any(r.failed for r in reports.values())
    artifacts = artifacts_dir(request.node.name)
    for i, driver in enumerate(opened):
        try:
            if failed:
                save_artifacts(driver, artifacts, f"browser-{i}")
        finally:
            driver.quit()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report
