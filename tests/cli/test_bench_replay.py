"""``tailledger bench replay`` runs end to end on a small log and prints every figure
(the figures themselves are never asserted: timing depends on the machine)."""

from __future__ import annotations

import pytest

from cli.bench.replay import synthetic_events
from cli.main import main
from projections import TailnetState, fold


def test_bench_replay_prints_every_figure(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "replay", "--events", "3000", "--points", "2", "--snapshot-every", "500"]) == 0
    out = capfd.readouterr().out
    for measure in ("full fold from zero", "state at a random point", "netmap at a random point",
                    "reach for one pair", "log export"):
        assert measure in out


def test_the_synthetic_history_is_valid_and_changes_policy_every_1000_events() -> None:
    from datetime import UTC, datetime

    from eventlog import Actor, ActorKind, RecordedEvent
    from eventlog.events import PolicySet

    events = list(synthetic_events(5000, nodes=200, users=20))
    assert len(events) == 5000
    assert [i + 1 for i, e in enumerate(events) if isinstance(e, PolicySet)] == [1000, 2000, 3000, 4000, 5000]
    actor = Actor(kind=ActorKind.SYSTEM, id="t")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    recorded = [RecordedEvent(seq=i, recorded_at=at, actor=actor, type=e.type_name(), schema=1, event=e,
                              prev_hash="", hash="") for i, e in enumerate(events, 1)]
    state, _ = fold(TailnetState(), recorded)
    assert len(state.nodes) == 200 and len(state.users) == 20 and state.policy_text is not None
