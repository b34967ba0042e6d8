"""SSH check approvals in the fold: an approval covers a connection while it is within
the period of the rule holding it; one recorded before approvals carried their time
keeps covering every destination until its ``until``, as it did then."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from immutables import Map

from eventlog import Actor, ActorKind, RecordedEvent
from eventlog.events import SshCheckApproved
from projections import commands as c
from projections import decode_state, encode_state
from projections.fold import apply
from projections.state import SshApproval, TailnetState

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _approved(event: SshCheckApproved) -> TailnetState:
    recorded = RecordedEvent(
        seq=1, recorded_at=T0, actor=Actor(kind=ActorKind.ADMIN, id="test"), type="ssh.check_approved",
        schema=1, event=event, prev_hash="", hash="",
    )  # fmt: skip
    state, _ = apply(TailnetState(), recorded)
    # A checkpoint keeps the approval as it is.
    assert decode_state(encode_state(state)).ssh_checks == state.ssh_checks
    return state


def test_an_approval_lasts_the_holding_rules_period() -> None:
    state = _approved(
        SshCheckApproved(check_id="x", src_node_id=1, dst_node_id=2, local_user="root",
                         until=T0 + timedelta(hours=2), approved_at=T0)
    )  # fmt: skip
    assert state.ssh_checks == Map({"1/root": SshApproval(T0, T0 + timedelta(hours=2))})
    later = T0 + timedelta(hours=1)
    assert c.ssh_check_approved(state, 1, "root", later, timedelta(hours=2))
    assert not c.ssh_check_approved(state, 1, "root", later, timedelta(minutes=30))
    assert c.ssh_check_approved(state, 1, "root", later, timedelta(hours=3))  # beyond the approving rule's
    assert not c.ssh_check_approved(state, 1, "admin", later, timedelta(hours=2))  # another user
    assert not c.ssh_check_approved(state, 2, "root", later, timedelta(hours=2))  # another source


def test_an_approval_recorded_without_its_time_keeps_its_until() -> None:
    state = _approved(
        SshCheckApproved(check_id="x", src_node_id=1, dst_node_id=2, local_user="root", until=T0)
    )
    assert c.ssh_check_approved(state, 1, "root", T0 - timedelta(seconds=1), timedelta(0))
    assert not c.ssh_check_approved(state, 1, "root", T0, timedelta(hours=12))
