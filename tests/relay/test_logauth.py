"""The relay's log-fed authorizer: who may connect follows the log, node by node."""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from eventlog import EventLog, SQLiteEventStore
from projections import EMPTY, ProjectionRunner, TailnetState
from projections import commands as c
from relay.logauth import LogAuthorizer
from tests.support.builders import OPS, RandomHistory, Recorder

ops = st.lists(st.tuples(st.integers(0, OPS - 1), st.integers(0, 1000)), max_size=60)


def _authorizer(clock: list[datetime]) -> LogAuthorizer:
    runner = ProjectionRunner(EventLog(SQLiteEventStore(":memory:")))
    return LogAuthorizer(runner, clock=lambda: clock[0])


def _reference(state: TailnetState, now: datetime) -> set[bytes]:
    """Every node's key that has not expired: the whole-tailnet computation."""
    return {bytes.fromhex(n.node_key) for n in state.nodes.values() if not n.is_expired(now)}


def _allowed(auth: LogAuthorizer, state: TailnetState) -> set[bytes]:
    keys = {bytes.fromhex(n.node_key) for n in state.nodes.values()}
    return {k for k in keys if auth.is_authorized(k)}


@settings(max_examples=60, deadline=None)
@given(ops=ops, seed=st.integers(0, 3))
def test_each_batch_updates_exactly_the_whole_tailnet_answer(ops: list[tuple[int, int]], seed: int) -> None:
    # Between periodic re-checks the authorizer sees only what each batch changed; its
    # answer (allowed and denied keys) and the keys it revokes equal a recomputation
    # over every node, at the time it last looked.
    history = RandomHistory(seed=seed)
    r = history.recorder
    clock = [r.now]
    auth = _authorizer(clock)
    assert auth.refresh(r.state) == set()
    before = _reference(r.state, clock[0])
    for op, arg in ops:
        history.step(op, arg)
        if op == 16:  # time passed: the periodic re-check looks at every node
            clock[0] = r.now
            lost = auth.refresh(r.state)
        else:
            lost = auth.apply(r.state, r.delta)
        r.delta = EMPTY
        after = _reference(r.state, clock[0])
        assert _allowed(auth, r.state) == after
        assert lost == before - after
        before = after


def test_a_deleted_or_rotated_node_loses_its_key_and_the_others_keep_theirs() -> None:
    r = Recorder()
    alice = r.user("alice")
    clock = [r.now]
    auth = _authorizer(clock)
    auth.refresh(r.state)
    first = r.node(alice, "one", key="11" * 32)
    r.node(alice, "two", key="22" * 32)
    assert auth.apply(r.state, r.delta) == set()
    r.delta = EMPTY
    one, two = bytes.fromhex("11" * 32), bytes.fromhex("22" * 32)
    assert auth.is_authorized(one) and auth.is_authorized(two)
    assert not auth.is_authorized(bytes.fromhex("33" * 32))

    r.run(lambda s: c.decide_rotate_node_key(s, s.nodes[first], node_key="33" * 32, expiry=None))
    assert auth.apply(r.state, r.delta) == {one}
    r.delta = EMPTY
    assert not auth.is_authorized(one)
    assert auth.is_authorized(bytes.fromhex("33" * 32)) and auth.is_authorized(two)

    r.run(lambda s: c.decide_expire_node(s, str(first), now=r.now))
    clock[0] = r.now
    assert auth.apply(r.state, r.delta) == {bytes.fromhex("33" * 32)}
    r.delta = EMPTY
    assert auth.is_authorized(two)

    r.run(lambda s: c.decide_delete_node(s, "two"))
    assert auth.apply(r.state, r.delta) == {two}
    assert not auth.is_authorized(two)


def test_a_key_coming_due_is_revoked_by_the_periodic_recheck() -> None:
    r = Recorder()
    alice = r.user("alice")
    clock = [r.now]
    auth = _authorizer(clock)
    r.run(
        lambda s: c.decide_register_node(
            s, machine_key="aa" * 32, node_key="44" * 32, hostname="soon", user_id=alice, tags=(),
            ephemeral=False, expiry=r.now + timedelta(seconds=30), auth="cli", preauth_key=None,
            plan=c.AddressPlan(None, None),
        )
    )
    auth.apply(r.state, r.delta)
    key = bytes.fromhex("44" * 32)
    assert auth.is_authorized(key)
    clock[0] = r.now + timedelta(seconds=31)
    assert auth.refresh(r.state) == {key}
    assert not auth.is_authorized(key)


def test_the_authorized_set_keeps_the_states_key_strings_not_copies() -> None:
    # Issue 19: an idle node costs the relay its set entries only, not a bytes copy
    # of its key made from the state's hex string (and re-made at every re-check).
    r = Recorder()
    alice = r.user("alice")
    clock = [r.now]
    auth = _authorizer(clock)
    nid = r.node(alice, "one", key="11" * 32)
    assert auth.refresh(r.state) == set()
    [held] = auth._holders
    assert held is r.state.nodes[nid].node_key
    assert auth.is_authorized(bytes.fromhex("11" * 32))
