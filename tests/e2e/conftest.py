"""Fixtures for the end-to-end tests.

* ``netns``: a bare private network namespace (lo + veth + default route).
* ``e2e``: an `E2EHarness` (namespace, process helpers, teardown) whose
  process logs are appended to the report of a failing test.
* ``caddy_e2e`` / ``tailcat_e2e``: the same harness, after checking that the
  client binary is there (skip outside CI, fail under ``CI=true``).

All fixtures are synchronous and function-scoped, so they serve plain and
trio (``async def``) tests alike.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from .harness import E2EHarness, require
from .netns import NetNamespace, open_netns

_HARNESS = pytest.StashKey[E2EHarness]()


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    """A fresh private network namespace, destroyed after the test."""
    require()
    with open_netns() as ns:
        yield ns


def _harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[E2EHarness]:
    with open_netns() as ns:
        harness = E2EHarness(ns, tmp_path)
        request.node.stash[_HARNESS] = harness
        try:
            yield harness
        finally:
            harness.close()


@pytest.fixture
def e2e(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[E2EHarness]:
    """The e2e harness (namespace + processes), torn down after the test."""
    require()
    yield from _harness(request, tmp_path)


@pytest.fixture
def caddy_e2e(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[E2EHarness]:
    """The e2e harness, for tests that run Caddy/tsnet nodes."""
    require(caddy=True)
    yield from _harness(request, tmp_path)


@pytest.fixture
def tailcat_e2e(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[E2EHarness]:
    """The e2e harness, for tests that run tailcat."""
    require(tailcat=True)
    yield from _harness(request, tmp_path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tails of all process logs to the report of a failed phase."""
    report = yield
    harness = item.stash.get(_HARNESS, None)
    if report.failed and harness is not None and harness.processes:
        report.sections.append((f"e2e process logs ({call.when})", harness.log_report()))
    return report
