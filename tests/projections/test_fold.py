"""Fold invariants over random histories: incremental equals rebuild, checkpoints are
equivalent at every cut point, indexes stay consistent, deltas merge associatively."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from projections import Delta, TailnetState, decode_state, encode_state, fold, rebuild_indexes
from tests.support.builders import OPS, random_history

ops = st.lists(st.tuples(st.integers(0, OPS - 1), st.integers(0, 1000)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=ops, splits=st.lists(st.integers(1, 10), max_size=10))
def test_incremental_fold_equals_rebuild_from_zero(ops: list[tuple[int, int]], splits: list[int]) -> None:
    r = random_history(ops)
    rebuilt, _ = fold(TailnetState(), r.events)
    assert rebuilt == r.state  # the recorder folded one event at a time
    # Folding in arbitrary batches gives the same state too.
    state, i = TailnetState(), 0
    for size in [*splits, len(r.events)]:
        state, _ = fold(state, r.events[i : i + size])
        i += size
    assert state == rebuilt


@settings(max_examples=30, deadline=None)
@given(ops=ops)
def test_checkpoint_plus_tail_equals_full_fold_at_every_cut(ops: list[tuple[int, int]]) -> None:
    r = random_history(ops)
    full, _ = fold(TailnetState(), r.events)
    for cut in range(len(r.events) + 1):
        head, _ = fold(TailnetState(), r.events[:cut])
        restored = decode_state(encode_state(head))
        assert restored == head
        resumed, _ = fold(restored, r.events[cut:])
        assert resumed == full


@settings(max_examples=40, deadline=None)
@given(ops=ops)
def test_indexes_stay_consistent(ops: list[tuple[int, int]]) -> None:
    r = random_history(ops)
    assert rebuild_indexes(r.state) == r.state
    # Ids are never reused and no address is held twice.
    ips = [ip for n in r.state.nodes.values() for ip in (n.ipv4, n.ipv6) if ip]
    assert len(ips) == len(set(ips))
    registered = [e.event.node_id for e in r.events if e.type == "node.registered"]  # type: ignore[union-attr]
    assert len(registered) == len(set(registered))


@settings(max_examples=40, deadline=None)
@given(ops=ops)
def test_fold_is_deterministic(ops: list[tuple[int, int]]) -> None:
    r = random_history(ops)
    a, da = fold(TailnetState(), r.events)
    b, db = fold(TailnetState(), r.events)
    assert a == b and da == db
    assert encode_state(a) == encode_state(b)


ids = st.frozensets(st.integers(0, 20), max_size=5)
deltas = st.builds(
    Delta, nodes_changed=ids, nodes_removed=ids, users_changed=ids, users_removed=ids,
    policy=st.booleans(), keys=st.booleans(),
)


@given(a=deltas, b=deltas, c=deltas)
def test_delta_merge_is_associative(a: Delta, b: Delta, c: Delta) -> None:
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert Delta().merge(a).is_empty() == a.merge(Delta()).is_empty()


@given(a=deltas, b=deltas)
def test_removal_wins_over_change(a: Delta, b: Delta) -> None:
    merged = a.merge(b)
    assert not merged.nodes_changed & merged.nodes_removed
