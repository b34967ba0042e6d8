"""The given-name index: a registration picks a free name from it, without a scan of
every node, and picks the name a scan would."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from eventlog.events import NodeDeleted
from projections import TailnetState
from projections import commands as c
from tests.support.builders import OPS, PLAN, RandomHistory, Recorder

ops = st.lists(st.tuples(st.integers(0, OPS - 1), st.integers(0, 1000)), max_size=60)


def _scanned_name(state: TailnetState, wanted: str) -> str:
    """The unique name computed from every node (the reference)."""
    taken = {n.given_name for n in state.nodes.values()}
    n, candidate = 0, wanted
    while candidate in taken:
        n += 1
        candidate = wanted[: 63 - len(f"-{n}")] + f"-{n}"
    return candidate


def _register(r: Recorder, user_id: int, hostname: str) -> int:
    return r.run(
        lambda s: c.decide_register_node(
            s, machine_key=f"{r.state.next_node_id:064x}", node_key=f"{r.state.next_node_id + 10**6:064x}",
            hostname=hostname, user_id=user_id, tags=(), ephemeral=False, expiry=None, auth="cli",
            preauth_key=None, plan=PLAN,
        )
    )


@settings(max_examples=60, deadline=None)
@given(ops=ops, seed=st.integers(0, 3), arg=st.integers(0, 30))
def test_the_index_counts_every_name_and_a_newcomer_gets_the_scanned_name(
    ops: list[tuple[int, int]], seed: int, arg: int
) -> None:
    history = RandomHistory(seed=seed, users=("alice",))
    r = history.recorder
    for op, a in ops:
        history.step(op, a)
        assert dict(r.state.node_names.items()) == Counter(n.given_name for n in r.state.nodes.values())
    owner = r.user("registrar")
    # Names the random history uses for nodes (renames to n<arg>, host names node-<...>).
    for wanted in (f"n{arg}", "node", f"node-{arg}"):
        expected = _scanned_name(r.state, wanted)
        node_id = _register(r, owner, wanted)
        assert r.state.nodes[node_id].given_name == expected


def test_a_name_held_twice_in_an_old_log_stays_taken_until_both_are_gone() -> None:
    r = Recorder()
    alice = r.user("alice")
    first = _register(r, alice, "db")
    # An old log recorded a second node under the same name (no longer decided today).
    def duplicate(s: TailnetState) -> c.Decision[int]:
        decided = c.decide_register_node(
            s, machine_key="bb" * 32, node_key="cc" * 32, hostname="other", user_id=alice, tags=(),
            ephemeral=False, expiry=None, auth="cli", preauth_key=None, plan=PLAN,
        )
        return c.Decision((replace(decided.events[0], given_name="db"),), decided.result)

    second = r.run(duplicate)
    assert r.state.node_names["db"] == 2
    r.run(lambda s: c.Decision((NodeDeleted(node_id=first, reason="admin"),), first))
    assert r.state.node_named("db") == r.state.nodes[second]
    third = _register(r, alice, "db")
    assert r.state.nodes[third].given_name == "db-1"
    r.run(lambda s: c.Decision((NodeDeleted(node_id=second, reason="admin"),), second))
    assert "db" not in r.state.node_names
    fourth = _register(r, alice, "db")
    assert r.state.nodes[fourth].given_name == "db"
