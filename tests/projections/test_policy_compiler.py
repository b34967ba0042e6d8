"""PolicyCompiler edits its compiled policy from the nodes the folds' delta names
(issue 19) and still equals a compile from scratch, whatever the history."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections import EMPTY, TailnetState
from projections import commands as c
from projections.policy.engine import CompiledPolicy
from projections.policystate import PolicyCompiler
from tests.projections.test_mapviews import POLICIES
from tests.support.builders import OPS, RandomHistory


def _netmaps(compiled: CompiledPolicy) -> dict[int, bytes]:
    return {i: msgspec.json.encode(compiled.netmap(i)) for i in sorted(compiled.tailnet.nodes)}


@pytest.mark.parametrize("policy_index", range(len(POLICIES)))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.integers(0, OPS - 1), st.integers(0, 1000)), min_size=5, max_size=40))
def test_a_compile_edited_from_the_delta_equals_a_fresh_one(policy_index: int, ops: list[tuple[int, int]]) -> None:
    history = RandomHistory(seed=policy_index, users=("user0", "user1", "user2"), policies=POLICIES)
    r = history.recorder
    text = POLICIES[policy_index]
    if text is not None:
        r.run(lambda s: c.decide_set_policy(s, text, source="test"))
    compiler = PolicyCompiler("https://control.example")
    previous: TailnetState | None = None
    for op, arg in ops:
        history.step(op, arg)
        changed = r.delta.nodes_changed | r.delta.nodes_removed
        r.delta = EMPTY
        edited = compiler.compiled(r.state, since=previous, changed=changed)
        previous = r.state
        assert _netmaps(edited) == _netmaps(PolicyCompiler("https://control.example").compiled(r.state))


def test_a_delta_from_another_state_than_the_compilers_is_not_trusted() -> None:
    history = RandomHistory(seed=0, users=("user0",), policies=POLICIES)
    r = history.recorder
    owner = min(r.state.users)
    first = r.node(owner, "one")
    compiler = PolicyCompiler()
    compiler.compiled(r.state)  # the compiler's last state: `one` only
    second = r.node(owner, "two")
    callers_previous = r.state  # a caller saw the join of `two`; the compiler did not
    r.delta = EMPTY
    r.run(lambda s: c.decide_delete_node(s, str(first)))
    changed = r.delta.nodes_changed | r.delta.nodes_removed
    assert changed == {first}  # the caller's delta does not mention `two`
    compiled = compiler.compiled(r.state, since=callers_previous, changed=changed)
    assert sorted(compiled.tailnet.nodes) == [second]
