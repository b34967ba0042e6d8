"""Route HA reads the routers from the compiled tailnet's router list; across a random
history compiled incrementally it lists exactly what a scan of every node finds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from projections.policy.ipset import prefix_str
from projections.policy.tailnet import Tailnet as PolicyTailnet
from projections.policystate import PolicyCompiler
from protocol.ha import subnet_routers
from tests.support.builders import OPS, RandomHistory

ops = st.lists(st.tuples(st.integers(0, OPS - 1), st.integers(0, 1000)), max_size=60)


def _every_node(tailnet: PolicyTailnet) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for info in tailnet.iter_nodes():
        for route in info.subnet_routes:
            out.setdefault(prefix_str(route), []).append(info.id)
    return out


@settings(max_examples=60, deadline=None)
@given(ops=ops, seed=st.integers(0, 3))
def test_subnet_routers_equal_a_scan_of_every_node(ops: list[tuple[int, int]], seed: int) -> None:
    history = RandomHistory(seed=seed, users=("alice", "bob"))
    compiler = PolicyCompiler()
    for op, arg in ops:
        history.step(op, arg)
        tailnet = compiler.compiled(history.recorder.state).tailnet
        assert subnet_routers(tailnet) == _every_node(tailnet)
