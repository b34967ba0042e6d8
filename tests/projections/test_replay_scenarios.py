"""Incident scenarios: recorded answers of the replay engine, reviewed by hand.

Each ``replay-fixtures/incident-*`` folder holds a history (``events.jsonl``), the
questions an incident responder would ask of it with the answers the engine gave when
the fixture was recorded (``answers.json``), and a README that checks every answer
against Tailscale's semantics. This test replays the questions and requires the same
answers, so a change to the engine that changes an answer fails here and must be
reviewed again. ``TAILLEDGER_UPDATE_GOLDEN=1`` re-records the answers (not the events).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from eventlog import SQLiteEventStore
from eventlog.export import import_export
from projections.replay import (
    History,
    diff_view,
    netmap_view,
    parse_proto,
    reach_timeline,
    state_view,
    target_for,
    who_can_reach,
)

from .replay_scenarios import SCENARIOS
from .test_replay_fixtures import _line

ROOT = Path(__file__).resolve().parents[2] / "replay-fixtures"
UPDATE = os.environ.get("TAILLEDGER_UPDATE_GOLDEN") == "1"


def history_of(folder: Path) -> History:
    store = SQLiteEventStore(":memory:")
    import_export(folder / "events.jsonl", store)
    return History(store, snapshot_every=3)


def answer(history: History, q: dict[str, object]) -> object:
    at = history.point(str(q["at"])) if "at" in q else history.point(None)
    match q["cmd"]:
        case "state":
            return state_view(history, at)
        case "netmap":
            return netmap_view(history, at, str(q["node"]), control_url="https://control.example")
        case "diff":
            return diff_view(history, history.point(str(q["from"])), history.point(str(q["to"])))
        case "reach":
            port = q.get("port")
            assert port is None or isinstance(port, int)
            proto = q.get("proto")
            assert proto is None or isinstance(proto, str)
            return reach_timeline(
                history, str(q["src"]), str(q["dst"]), port=port, protocols=parse_proto(proto, port),
                proto_name=proto, start=history.point_at_seq(0), end=at,
            ).to_json()
        case "who-can-reach":
            port = q.get("port")
            assert port is None or isinstance(port, int)
            target = target_for(history.state_at(at.seq), str(q["dst"]))
            return who_can_reach(history, at, target, port=port, protocols=parse_proto(None, port))
        case other:
            raise AssertionError(other)


def _record(name: str, folder: Path) -> None:
    events, questions = SCENARIOS[name]()
    folder.mkdir(exist_ok=True)
    from eventlog import encode_event

    events_file = folder / "events.jsonl"
    if not events_file.exists():
        events_file.write_bytes(b"\n".join(_line(r, encode_event(r.event)) for r in events) + b"\n")
    if not (folder / "answers.json").exists():
        (folder / "answers.json").write_bytes(
            msgspec.json.format(msgspec.json.encode([{"question": q} for q in questions]), indent=1) + b"\n"
        )


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_incident_answers(name: str) -> None:
    folder = ROOT / name
    if not (folder / "events.jsonl").exists() or not (folder / "answers.json").exists():
        _record(name, folder)
    history = history_of(folder)
    recorded = msgspec.json.decode((folder / "answers.json").read_bytes())
    got = [{"question": item["question"], "answer": answer(history, item["question"])} for item in recorded]
    if UPDATE or any("answer" not in item for item in recorded):
        (folder / "answers.json").write_bytes(msgspec.json.format(msgspec.json.encode(got), indent=1) + b"\n")
        recorded = got
    assert len(got) == len(recorded)
    for mine, theirs in zip(got, recorded, strict=True):
        assert msgspec.json.decode(msgspec.json.encode(mine["answer"])) == theirs["answer"], (
            f"{name}: the answer to {mine['question']} changed"
        )
