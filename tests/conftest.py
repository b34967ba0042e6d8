"""Fixtures shared by every test package."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from eventlog import Actor, ActorKind, SQLiteEventStore

ADMIN = Actor(kind=ActorKind.ADMIN, id="tester")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class StepClock:
    """A clock that advances one second per reading (deterministic recorded times)."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def fresh_store() -> Iterator[SQLiteEventStore]:
    store = SQLiteEventStore(":memory:")
    yield store
    store.close()


@pytest.fixture
def step_clock() -> StepClock:
    return StepClock()
