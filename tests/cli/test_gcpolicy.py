"""The server process keeps its long-lived heap out of collections, and still
collects cycles (young ones at every step, frozen ones at the full step)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import trio

from cli.gcpolicy import manage_gc


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def _unfreeze_after() -> Iterator[None]:
    yield
    gc.unfreeze()


def _cycle() -> weakref.ref[_Cycle]:
    obj = _Cycle()
    return weakref.ref(obj)


async def test_freezes_then_collects_young_and_later_frozen_cycles() -> None:
    gc.unfreeze()
    kept = [_Cycle() for _ in range(10)]  # alive: frozen, never freed
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: manage_gc(interval=0.2, full_interval=1.0, task_status=task_status))
        assert gc.get_freeze_count() > 0
        frozen_before = gc.get_freeze_count()
        # A cycle that became garbage while frozen is only collected by the full step.
        old = kept.pop()
        old_ref = weakref.ref(old)
        del old
        # A young cycle goes at the next step (as it would without the policy).
        young = _cycle()
        await trio.sleep(0.5)
        assert young() is None
        assert old_ref() is not None, "a frozen cycle was scanned before the full step"
        await trio.sleep(1.0)
        assert old_ref() is None
        assert gc.get_freeze_count() > 0 and abs(gc.get_freeze_count() - frozen_before) < frozen_before
        nursery.cancel_scope.cancel()
    assert all(k.me is k for k in kept)
