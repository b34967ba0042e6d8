"""Tailscale SSH check mode: an admin's decision on a held SSH connection."""

from __future__ import annotations

from datetime import datetime

from .base import Event

__all__ = ["SshCheckApproved", "SshCheckRejected"]


class SshCheckApproved(Event, frozen=True, kw_only=True, tag="ssh.check_approved"):
    """SSH from node ``src_node_id`` as ``local_user`` (to ``dst_node_id``, which held the
    connection for a ``check`` rule) is approved at ``approved_at``. A later connection of
    that source and user is accepted unchecked while it is within the ``checkPeriod`` of
    the rule that holds it; ``until`` is when the approving rule's period ends.

    Events recorded before ``approved_at`` existed have none: they cover every
    destination until ``until``, as they did then."""

    check_id: str
    src_node_id: int
    dst_node_id: int
    local_user: str
    until: datetime
    approved_at: datetime | None = None


class SshCheckRejected(Event, frozen=True, kw_only=True, tag="ssh.check_rejected"):
    """The held SSH connection ``check_id`` is refused (``reason`` is shown to the user)."""

    check_id: str
    src_node_id: int
    dst_node_id: int
    local_user: str
    reason: str = ""
