"""The replay engine's own guarantees, on real histories in a real store.

* State replayed at seq N from a snapshot equals the fold from zero (property test
  over random valid histories and random snapshot spacings).
* A snapshot that no longer matches the chain (forged, or a log that was replaced) is
  ignored, never trusted.
* A row edited under the fold is refused with its sequence number.
* The pair compile used by ``replay reach`` decides every pair exactly like the full
  compile of the whole tailnet.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import given, settings

from eventlog import ChainError, SQLiteEventStore
from eventlog.export import import_export
from projections import encode_state, fold
from projections.policystate import PolicyCompiler
from projections.replay import History, Snapshot, Target, explain, pair_policy
from projections.state import TailnetState
from tests.support.builders import OPS, random_history

ROOT = Path(__file__).resolve().parents[2] / "replay-fixtures"

ops = st.lists(st.tuples(st.integers(0, OPS - 1), st.integers(0, 1000)), min_size=5, max_size=60)


@settings(max_examples=40, deadline=None)
@given(ops=ops, every=st.integers(1, 7), picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=6))
def test_state_from_snapshot_equals_fold_from_zero(
    ops: list[tuple[int, int]], every: int, picks: list[int]
) -> None:
    r = random_history(ops)
    history = History(r.store, snapshot_every=every)
    head = r.store.head().seq
    history.state_at(head)  # one full pass leaves snapshots behind
    for pick in picks:
        n = pick % (head + 1)
        zero, _ = fold(TailnetState(), r.events[:n])
        fresh = History(r.store, snapshots=history.snapshots, snapshot_every=every)
        from_snapshot = fresh.state_at(n)
        assert encode_state(from_snapshot) == encode_state(zero)
        assert from_snapshot.node_by_ip == zero.node_by_ip
        assert from_snapshot.user_by_name == zero.user_by_name


def _copy(folder: str) -> SQLiteEventStore:
    store = SQLiteEventStore(":memory:")
    import_export(ROOT / folder / "events.jsonl", store)
    return store


def test_a_forged_snapshot_is_not_trusted() -> None:
    store = _copy("policy-routes")
    history = History(store, snapshot_every=4)
    honest = encode_state(history.state_at(8))
    rows = store.read_rows(3, 1)
    forged_state = msgspec.structs.replace(history.state_at(4), policy_text='{"acls": []}')
    blob = encode_state(forged_state)
    # Right seq, right content hash, but the event hash of another log.
    history.snapshots.put(Snapshot(4, "f" * 64, hashlib.sha256(blob).hexdigest(), blob))
    assert encode_state(History(store, snapshots=history.snapshots).state_at(8)) == honest
    # Right event hash, but content that does not hash to what was recorded.
    history.snapshots.put(Snapshot(4, rows[0].hash, "0" * 64, blob))
    assert encode_state(History(store, snapshots=history.snapshots).state_at(8)) == honest


def test_an_edited_row_stops_the_fold_at_its_seq(tmp_path: Path) -> None:
    lines = (ROOT / "policy-routes" / "events.jsonl").read_bytes().splitlines()
    row = msgspec.json.decode(lines[5])
    row["data"]["hostname"] = "evil"
    lines[5] = msgspec.json.encode(row)
    # Write around the export reader (which would refuse it) straight into a store.
    from eventlog import StoredRow

    store = SQLiteEventStore(tmp_path / "ledger.db")
    rows = []
    for raw in lines:
        d = msgspec.json.decode(raw)
        kind, _, ident = d["actor"].partition(":")
        rows.append(StoredRow(d["seq"], d["recorded_at_us"], kind, ident, d["type"], d["schema"],
                              msgspec.json.encode(d["data"]), d["prev_hash"], d["hash"]))
    store.insert_rows(rows)
    history = History(store)
    history.state_at(5)
    with pytest.raises(ChainError) as caught:
        history.state_at(7)
    assert caught.value.seq == 6


def test_pair_compile_agrees_with_the_full_compile() -> None:
    for folder in sorted(p.name for p in ROOT.iterdir() if p.is_dir()):
        history = History(_copy(folder))
        for seq in range(1, history.head.seq + 1):
            point = history.point_at_seq(seq)
            state = history.state_at(seq)
            full = PolicyCompiler().compiled(state)
            for src in state.nodes:
                for dst in state.nodes:
                    target = Target(node_id=dst)
                    for port in (None, 22, 443):
                        protocols = (6, 17) if port else (6, 17, 1, 58)
                        want = explain(full, state, src, target, port=port, protocols=protocols, now=point.now)
                        mini = pair_policy(state, (src, dst), routers=False)
                        got = explain(mini, state, src, target, port=port, protocols=protocols, now=point.now)
                        assert got == want, (folder, seq, src, dst, port)
                        # And the rule-level answer agrees with the reduced filter the client gets.
                        in_filter = want is not None
                        assert in_filter == _filter_allows(full, state, src, dst, port, point.now)


def _filter_allows(full: object, state: TailnetState, src: int, dst: int, port: int | None, now: object) -> bool:
    from projections.policy import CompiledPolicy

    assert isinstance(full, CompiledPolicy)
    if src == dst or state.nodes[src].is_expired(now) or state.nodes[dst].is_expired(now):  # type: ignore[arg-type]
        return False
    s, d = full.tailnet.nodes[src], full.tailnet.nodes[dst]
    for rule in full.filter_rules(dst):
        if rule.caps or not rule.src_set.contains_any(s.addrs):
            continue
        if port is not None and rule.protocols and not set(rule.protocols) & {6, 17}:
            continue
        for entry in rule.dst:
            if entry.addresses.contains_any(d.addrs) and (port is None or entry.first <= port <= entry.last):
                return True
    return False


def test_who_can_reach_names_hosts_behind_a_subnet_router() -> None:
    from projections import commands as c
    from projections.replay import who_can_reach
    from tests.support.builders import Recorder

    r = Recorder()
    alice = r.user("alice")
    r.node(alice, "laptop")
    router = r.node(alice, "router", tags=("tag:router",))
    r.run(lambda s: c.decide_advertise_routes(s, s.nodes[router], ("10.40.0.0/24",)))
    r.run(lambda s: c.decide_approve_routes(s, "router", ("10.40.0.0/24",)))
    policy = """{"hosts": {"lab": "10.40.0.0/24"}, "tagOwners": {"tag:router": ["alice@"]},
      "acls": [{"action": "accept", "src": ["lab"], "dst": ["alice@:22"]}]}"""
    r.run(lambda s: c.decide_set_policy(s, policy, source="db"))
    history = History(r.store)
    point = history.point(None)
    answer = who_can_reach(history, point, Target(node_id=1), port=22, protocols=(6, 17))
    sources = answer["sources"]
    assert isinstance(sources, list) and len(sources) == 1
    source: dict[str, Any] = sources[0]
    assert {k: source[k] for k in ("node", "rule", "via")} == {
        "node": "router", "rule": 'acls[0]: {"action":"accept","src":["lab"],"dst":["alice@:22"]}',
        "via": "hosts in 10.40.0.0/24 behind router (subnet route, without SNAT)",
    }
    # Cited: the policy.set in force and the approval that made the router carry the subnet.
    assert (source["policy"]["seq"], source["policy"]["type"]) == (6, "policy.set")
    assert (source["last_change"]["seq"], source["last_change"]["type"]) == (5, "node.routes_approved")
    # Port 80 is not allowed to anyone.
    assert who_can_reach(history, point, Target(node_id=1), port=80, protocols=(6, 17))["sources"] == []


def test_reach_intervals_are_clipped_to_the_window() -> None:
    from projections.replay import reach_timeline

    history = History(_copy("incident-overbroad-grant"))

    def opened(start: int, end: int) -> list[tuple[int, int | None]]:
        tl = reach_timeline(history, "bobs-box", "db-1", port=5432, protocols=(6,), proto_name="tcp",
                            start=history.point_at_seq(start), end=history.point_at_seq(end))
        return [(int(str(i.opened["seq"])), None if i.closed is None else int(str(i.closed["seq"])))
                for i in tl.intervals]

    assert opened(0, 8) == [(5, 6), (7, 8)]
    # After event 6 the allow-all interval is over; the grant's opens at 7.
    assert opened(6, 8) == [(7, 8)]
    # An interval that opened before the window keeps its true opening event.
    # The scan stops at --to: what closes the interval later is not shown.
    assert opened(7, 7) == [(7, None)]
    assert opened(8, 8) == []


def test_replay_netmap_is_the_golden_netmap_of_every_fixture() -> None:
    """``replay netmap`` computes exactly what the golden fixtures hold (the server's
    reference full map, without presence), through the replay's own verified fold."""
    from projections.netmap import NetmapSettings
    from projections.replay import netmap_bytes
    from projections.tailcfg import DERPMap

    from .test_replay_fixtures import NOW

    settings = NetmapSettings(domain="tailnet.internal", derp_map=DERPMap(regions={}))
    for folder in sorted(p for p in ROOT.iterdir() if p.is_dir()):
        history = History(_copy(folder.name))
        state = history.state_at(history.head.seq)
        for golden in sorted((folder / "expected").glob("*.json")):
            node = next(n for n in state.nodes.values() if n.given_name == golden.stem)
            got = netmap_bytes(state, node.id, NOW, settings, PolicyCompiler("https://control.example"))
            assert msgspec.json.format(got, indent=1) + b"\n" == golden.read_bytes(), golden


def test_diff_cites_the_events_of_the_right_node_when_a_name_is_reused() -> None:
    from projections import commands as c
    from projections.replay import diff_view
    from tests.support.builders import Recorder

    r = Recorder()
    alice = r.user("alice")
    r.node(alice, "box")
    r.node(alice, "peer")
    start = r.state.seq
    r.run(lambda s: c.decide_delete_node(s, "box"))
    deleted = r.state.seq
    r.node(alice, "box")  # a new machine under the old name
    registered = r.state.seq
    history = History(r.store)
    diff = diff_view(history, history.point_at_seq(start), history.point(None))
    rows = msgspec.json.decode(msgspec.json.encode(diff))
    gained = {(row["src"], row["dst"]): [e["seq"] for e in row["events"]] for row in rows["reach_gained"]}
    lost = {(row["src"], row["dst"]): [e["seq"] for e in row["events"]] for row in rows["reach_lost"]}
    assert gained[("peer", "box")] == [registered] and lost[("peer", "box")] == [deleted]


def test_users_cite_their_last_change_even_from_a_snapshot_made_before_they_carried_it() -> None:
    from eventlog.events import UserRoleSet
    from projections.replay import Citations, diff_view
    from tests.support.builders import Recorder

    r = Recorder()
    alice = r.user("alice")
    bob = r.user("bob")
    from projections.commands import Decision

    for _ in range(2):  # the second sets the same role again
        r.run(lambda s: Decision(events=(UserRoleSet(user_id=bob, role="admin"),), result=0))
    history = History(r.store)
    state = history.state_at(history.head.seq)
    fresh = {uid: Citations(history, state).user(uid) for uid in (alice, bob)}
    assert fresh[alice]["seq"] == 1 and fresh[bob]["seq"] == 4  # type: ignore[index]
    assert fresh[bob]["type"] == "user.role_set"  # type: ignore[index]
    # A snapshot from before users carried updated_seq decodes it as 0: the rows say.
    old = msgspec.structs.replace(state, users=state.users.set(
        alice, msgspec.structs.replace(state.users[alice], updated_seq=0)).set(
        bob, msgspec.structs.replace(state.users[bob], updated_seq=0)))
    assert {uid: Citations(history, old).user(uid) for uid in (alice, bob)} == fresh
    # Setting the same role again changes the user's mark, not the user: no diff.
    changed = diff_view(history, history.point_at_seq(2), history.point_at_seq(3))["users"]
    assert [u["id"] for u in changed] == [bob]  # type: ignore[attr-defined]
    assert diff_view(history, history.point_at_seq(3), history.point_at_seq(4))["users"] == []
