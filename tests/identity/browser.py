"""The real browser of the identity tests: Debian's Chromium through its chromedriver."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def chrome(profile: Path) -> Any:
    """A headless Chromium from Debian with its chromedriver (no download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        # The provider's certificate is the test's own; the server under test checks it
        # for real through oidc.ca_file, the browser need not.
        "--ignore-certificate-errors", f"--user-data-dir={profile}", "--no-first-run",
        "--disable-extensions", "--disable-background-networking",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver") or "chromedriver")
    return webdriver.Chrome(options=options, service=service)


def artifacts_dir(test_name: str) -> Path:
    """Where a failing test's screenshots go (``$TAILLEDGER_ARTIFACTS``, default
    ``test-artifacts/``)."""
    return Path(os.environ.get("TAILLEDGER_ARTIFACTS", "test-artifacts")) / test_name


def save_artifacts(driver: Any, where: Path, name: str) -> None:
    """A screenshot, the HTML and the URL of the browser's page."""
    where.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(where / f"{name}.png"))
    (where / f"{name}.html").write_text(driver.page_source)
    (where / f"{name}.url").write_text(driver.current_url)
