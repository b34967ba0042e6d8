"""Golden replay fixtures: fold a recorded history, compare every node's netmap.

See ``replay-fixtures/README.md``. A fixture that is missing is generated from its
builder (then reviewed and committed); ``TAILLEDGER_UPDATE_GOLDEN=1`` regenerates the
expected netmaps from the committed events.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from eventlog import (
    GENESIS_HASH,
    Actor,
    RecordedEvent,
    chain_hash,
    decode_event,
    from_micros,
    to_micros,
)
from projections import TailnetState, fold
from projections import commands as c
from projections.netmap import NetmapSettings, full_map
from projections.policystate import PolicyCompiler
from projections.tailcfg import DERPMap, encode
from tests.support.builders import PLAN, Recorder

from .replay_scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[2] / "replay-fixtures"
NOW = datetime(2026, 6, 1, tzinfo=UTC)
UPDATE = os.environ.get("TAILLEDGER_UPDATE_GOLDEN") == "1"

POLICY = """{
  "groups": {"group:eng": ["alice@"]},
  "tagOwners": {"tag:router": ["alice@"], "tag:web": ["alice@"]},
  "hosts": {"office": "10.20.0.0/16"},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:80,443", "office:*"]},
    {"action": "accept", "src": ["bob@"], "dst": ["bob@:*"]}
  ],
  "grants": [{"src": ["group:eng"], "dst": ["tag:web"], "app": {"example.com/cap/admin": [{"role": "ops"}]}}],
  "ssh": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:web"], "users": ["root", "autogroup:nonroot"]}],
  "autoApprovers": {"routes": {"10.20.0.0/16": ["tag:router"]}}
}"""


def build_policy_routes() -> list[RecordedEvent]:
    r = Recorder()
    alice, bob = r.user("alice"), r.user("bob")
    r.node(alice, "laptop")
    web = r.node(alice, "web-1", tags=("tag:web",))
    router = r.node(alice, "router", tags=("tag:router",))
    r.node(bob, "bobs-box")
    gone = r.node(bob, "temp")
    node = r.state.nodes[router]
    r.run(lambda s: c.decide_advertise_routes(s, node, ("10.20.0.0/16",)))
    r.run(lambda s: c.decide_approve_routes(s, str(router), ("10.20.0.0/16",)))
    r.run(lambda s: c.decide_set_policy(s, POLICY, source="db"))
    r.run(lambda s: c.decide_rename_node(s, str(web), "www"))
    r.run(lambda s: c.decide_delete_node(s, str(gone)))
    assert PLAN is not None
    return r.events


BUILDERS = {"policy-routes": build_policy_routes}
# The incident scenarios' netmaps at their end are golden too (answers: test_replay_scenarios).
for _name, _scenario in SCENARIOS.items():
    BUILDERS[_name] = lambda scenario=_scenario: scenario()[0]  # type: ignore[misc]


def _line(rec: RecordedEvent, data: bytes) -> bytes:
    return msgspec.json.encode(
        {
            "seq": rec.seq,
            "recorded_at_us": to_micros(rec.recorded_at),
            "actor": str(rec.actor),
            "type": rec.type,
            "schema": rec.schema,
            "data": msgspec.json.decode(data),
            "prev_hash": rec.prev_hash,
            "hash": rec.hash,
        }
    )


def load_events(path: Path) -> list[RecordedEvent]:
    """Read ``events.jsonl`` and verify its hash chain."""
    out: list[RecordedEvent] = []
    prev = GENESIS_HASH
    for raw in path.read_bytes().splitlines():
        row = msgspec.json.decode(raw)
        data = msgspec.json.encode(row["data"])
        actor = Actor.parse(row["actor"])
        expect = chain_hash(
            prev, seq=row["seq"], recorded_at_us=row["recorded_at_us"], actor_kind=actor.kind.value,
            actor_id=actor.id, type=row["type"], schema=row["schema"], data=data,
        )
        assert row["prev_hash"] == prev and row["hash"] == expect, f"chain broken at {row['seq']}"
        out.append(
            RecordedEvent(
                seq=row["seq"], recorded_at=from_micros(row["recorded_at_us"]), actor=actor,
                type=row["type"], schema=row["schema"], event=decode_event(row["type"], row["schema"], data),
                prev_hash=row["prev_hash"], hash=row["hash"],
            )
        )
        prev = row["hash"]
    return out


def netmaps(events: list[RecordedEvent]) -> dict[str, bytes]:
    state, _ = fold(TailnetState(), events)
    settings = NetmapSettings(domain="tailnet.internal", derp_map=DERPMap(regions={}))
    compiler = PolicyCompiler("https://control.example")
    out = {}
    for node in state.nodes.values():
        msg = full_map(state, node.id, policy=compiler, settings=settings, presence=lambda _nid: None, now=NOW)
        msg = msgspec.structs.replace(msg, control_time=None)
        out[node.given_name] = msgspec.json.format(encode(msg), indent=1)
    return out


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_replay_fixture(name: str) -> None:
    folder = ROOT / name
    events_file = folder / "events.jsonl"
    if not events_file.exists():
        recorded = BUILDERS[name]()
        from eventlog import encode_event

        events_file.write_bytes(b"\n".join(_line(r, encode_event(r.event)) for r in recorded) + b"\n")
    events = load_events(events_file)
    got = netmaps(events)
    expected_dir = folder / "expected"
    if UPDATE or not expected_dir.exists():
        expected_dir.mkdir(exist_ok=True)
        for old in expected_dir.glob("*.json"):
            old.unlink()
        for node, data in got.items():
            (expected_dir / f"{node}.json").write_bytes(data + b"\n")
    expected = {p.stem: p.read_bytes().rstrip(b"\n") for p in expected_dir.glob("*.json")}
    assert sorted(got) == sorted(expected)
    for node in got:
        assert got[node] == expected[node], f"{name}/{node} netmap changed"


def test_fixture_tampering_is_detected(tmp_path: Path) -> None:
    src = ROOT / "policy-routes" / "events.jsonl"
    lines = src.read_bytes().splitlines()
    row = msgspec.json.decode(lines[2])
    row["actor"] = "admin:mallory"
    lines[2] = msgspec.json.encode(row)
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(AssertionError, match="chain broken at 3"):
        load_events(tmp_path / "events.jsonl")
