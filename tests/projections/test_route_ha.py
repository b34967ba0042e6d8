"""Route HA decisions (``decide_route_primaries``) and their fold: pure, no server."""

from __future__ import annotations

from datetime import UTC, datetime

from eventlog import Actor, ActorKind, RecordedEvent
from eventlog.events import RoutePrimaryChanged
from projections import TailnetState, apply
from projections import commands as c
from projections.policystate import recorded_primaries

NET = "10.0.0.0/24"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _apply(state: TailnetState, decision: c.Decision[int]) -> TailnetState:
    for event in decision.events:
        rec = RecordedEvent(
            seq=state.seq + 1, event=event, actor=Actor(kind=ActorKind.SYSTEM, id="ha"), recorded_at=T0,
            type=event.type_name(), schema=1, prev_hash="", hash="",
        )
        state, _ = apply(state, rec)
    return state


def _decide(state: TailnetState, routers: list[int], online: set[int], **kw: bool) -> c.Decision[int]:
    # The election in force keeps the recorded primary while it serves, else the lowest id.
    recorded = state.route_primaries.get(NET)
    elected = {NET: recorded if recorded in routers else min(routers)} if routers else {}
    return c.decide_route_primaries(state, elected, {NET: routers} if routers else {}, online.__contains__, **kw)


def test_first_router_is_recorded_then_nothing_changes() -> None:
    d = _decide(TailnetState(), [1, 2], {1, 2})
    assert d.events == (RoutePrimaryChanged(prefix=NET, node_id=1, previous_node_id=None, reason="elected"),)
    state = _apply(TailnetState(), d)
    assert dict(state.route_primaries) == {NET: 1}
    assert _decide(state, [1, 2], {1, 2}).events == ()


def test_offline_primary_fails_over_and_does_not_flap_back() -> None:
    state = _apply(TailnetState(), _decide(TailnetState(), [1, 2], {1, 2}))
    d = _decide(state, [1, 2], {2})
    assert d.events == (RoutePrimaryChanged(prefix=NET, node_id=2, previous_node_id=1, reason="offline"),)
    state = _apply(state, d)
    # Node 1 is back: it stays secondary.
    assert _decide(state, [1, 2], {1, 2}).events == ()
    # Now 2 goes away: back to 1.
    assert _decide(state, [1, 2], {1}).events == (
        RoutePrimaryChanged(prefix=NET, node_id=1, previous_node_id=2, reason="offline"),
    )


def test_no_online_standby_keeps_the_primary() -> None:
    state = _apply(TailnetState(), _decide(TailnetState(), [1, 2], {1, 2}))
    assert _decide(state, [1, 2], set()).events == ()


def test_no_failover_during_the_grace_period() -> None:
    state = _apply(TailnetState(), _decide(TailnetState(), [1, 2], set(), failover=False))
    assert dict(state.route_primaries) == {NET: 1}
    assert _decide(state, [1, 2], {2}, failover=False).events == ()


def test_a_primary_that_stops_serving_and_a_prefix_nobody_serves() -> None:
    state = _apply(TailnetState(), _decide(TailnetState(), [1, 2], {1, 2}))
    d = _decide(state, [2], {1, 2})
    assert d.events == (RoutePrimaryChanged(prefix=NET, node_id=2, previous_node_id=1, reason="no longer serves"),)
    state = _apply(state, d)
    d = _decide(state, [], {1, 2})
    assert d.events == (RoutePrimaryChanged(prefix=NET, node_id=None, previous_node_id=2, reason="no router"),)
    assert dict(_apply(state, d).route_primaries) == {}


def test_recorded_primaries_seed_the_election() -> None:
    state = _apply(TailnetState(), _decide(TailnetState(), [1, 2], {1, 2}))
    state = _apply(state, _decide(state, [1, 2], {2}))
    ((prefix, node_id),) = recorded_primaries(state).items()
    assert node_id == 2 and str(prefix) != ""
