"""``policy set`` with an impact summary: computed against the live state and recorded
in the ``policy.set`` event (schema 2); schema-1 events still read back."""

from __future__ import annotations

from pathlib import Path

import trio

from eventlog import EventLog, SQLiteEventStore, decode_event
from eventlog.events import PolicyImpact, PolicySet
from eventlog.export import import_export
from projections import ProjectionRunner, Tailnet
from projections.admin import AdminOps
from tests.conftest import ADMIN

from .replay_scenarios import OVERBROAD_WIDE

ROOT = Path(__file__).resolve().parents[2] / "replay-fixtures"


async def test_policy_set_records_its_impact(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "log.db")
    import_export(ROOT / "incident-overbroad-grant" / "events.jsonl", store)  # ends with the narrow policy
    log = EventLog(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        runner = ProjectionRunner(log)
        await nursery.start(runner.run)
        ops = AdminOps(Tailnet(log, runner))
        out = await ops.dispatch("policy.set", {"text": OVERBROAD_WIDE, "impact": True}, ADMIN)
        assert isinstance(out, dict)
        assert out["impact"] == {
            "against_seq": 8, "pairs_gained": 6, "pairs_lost": 0, "netmaps_changed": 3,
            "nodes": ("laptop", "db-1", "bobs-box"),
        }
        [row] = store.read_rows(8, 10)
        event = row.to_event().event
        assert isinstance(event, PolicySet) and row.schema == 2
        assert event.impact == PolicyImpact(
            against_seq=8, pairs_gained=6, pairs_lost=0, netmaps_changed=3,
            nodes=("laptop", "db-1", "bobs-box"),
        )
        # Without asking (programmatic callers, loadgen) nothing extra is computed.
        narrow = store.read_rows(7, 1)[0].to_event().event
        assert isinstance(narrow, PolicySet)
        out = await ops.dispatch("policy.set", {"text": narrow.text}, ADMIN)
        assert isinstance(out, dict) and "impact" not in out
        last = store.read_rows(9, 1)[0].to_event().event
        assert isinstance(last, PolicySet) and last.impact is None
        nursery.cancel_scope.cancel()


def test_a_schema_1_policy_event_reads_back_without_impact() -> None:
    raw = b'{"type":"policy.set","text":"{}","sha256":"x","source":"db"}'
    event = decode_event("policy.set", 1, raw)
    assert isinstance(event, PolicySet) and event.impact is None and event.text == "{}"
