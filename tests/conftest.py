"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from eventlog import Actor, ActorKind, SQLiteEventStore
from tests.pgserver import PgServer, find_bin_dir

ADMIN = Actor(kind=ActorKind.ADMIN, id="tester")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class StepClock:
    """A clock that advances one second per reading (deterministic recorded times)."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture(scope="session", autouse=True)
def _signing_key_outside_the_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every server and CLI the tests start signs with a key of this session.

    Without it, a server started by a test would create (and a `log verify` would read)
    the machine's default key (`/etc/tailledger/signing.key` as root), so one test's
    key would make another test's log fail verification, depending on the order.
    """
    name = "TAILLEDGER_AUDIT__SIGNING_KEY_FILE"
    before = os.environ.get(name)
    if before is None:
        os.environ[name] = str(tmp_path_factory.mktemp("audit") / "signing.key")
    yield
    if before is None:
        os.environ.pop(name, None)


@pytest.fixture
def fresh_store() -> Iterator[SQLiteEventStore]:
    store = SQLiteEventStore(":memory:")
    yield store
    store.close()


@pytest.fixture
def step_clock() -> StepClock:
    return StepClock()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session (skipped where none is installed, except
    under ``CI=true``: there a missing server fails)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed (tests/install-deps.sh installs it)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PgServer(bin_dir)
    server.start()
    yield server
    server.close()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """The connection string of a fresh, empty database."""
    return pg_server.create_database()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-smoke",
        action="store_true",
        help="run the `slow` benchmarks in their short smoke mode (the README's test "
        "command and CI run `python -m pytest -m slow --bench-smoke` after the default run)",
    )


@pytest.fixture
def bench_smoke(request: pytest.FixtureRequest) -> bool:
    """Whether the benchmarks run in smoke mode: the same checks of their figures, on
    the smallest sizes and shortest runs that still exercise every part."""
    return bool(request.config.getoption("--bench-smoke"))


#: Markers of tests that must run in the default run (and so in CI): never `slow`.
_NEVER_SLOW = ("e2e", "browser", "reliability")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that is both `slow` and end-to-end (or browser, reliability): the
    default run deselects `slow`, and these must run there."""
    wrong = [
        item.nodeid for item in items
        if item.get_closest_marker("slow") and any(item.get_closest_marker(m) for m in _NEVER_SLOW)
    ]
    if wrong:
        raise pytest.UsageError(
            f"marked slow (benchmarks only, deselected by default) but also {'/'.join(_NEVER_SLOW)}, "
            f"which must run by default: {', '.join(wrong[:5])}"
        )
