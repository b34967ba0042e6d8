"""The replay engine: answers about the past, read from the log alone.

Theory of operation
-------------------
Every fact that decides reachability (users, nodes, keys, tags, routes, approvals,
expiry, policy) is an event in the hash-chained log, and the fold
(:mod:`projections.fold`) is pure: it reads time only from the envelope. So "the
tailnet after event N" is a function of the first N events, and the same policy
engine and netmap code the server runs can be asked about it. This package does
that, offline and read-only:

* :mod:`.history` -- points (a seq or an RFC 3339 time), verified folds (every row's
  link and hash is checked before it is folded) and verified snapshots, so any past
  state is cheap;
* :mod:`.reach` -- who may reach whom under a compiled policy and the first rule that
  allows it (``acls[i]``/``grants[i]`` plus its text), through subnet routes and exit
  nodes;
* :mod:`.timeline` -- one pair through the whole history, folding only the events
  that can change its answer, plus key expiries;
* :mod:`.views` -- the answers of ``replay state``, ``netmap``, ``who-can-reach``,
  ``diff`` and ``policy impact`` as plain JSON-ready values.

Nothing here writes to the log or reads a clock; the only I/O is reading the store
(and, through :class:`~.history.SnapshotStore`, a cache the caller provides).
Route primaries come from the log: every change of a subnet's primary router is a
``route.primary_changed`` event (the server's HA decisions, actor ``system:ha``), which
the fold keeps in ``TailnetState.route_primaries`` and the election keeps while the
router serves the prefix (:func:`projections.policystate.recorded_primaries`); only a
prefix with no recorded primary falls back to the lowest node id among its routers.
"""

from .history import (
    History,
    MemorySnapshots,
    Point,
    ReplayError,
    Snapshot,
    SnapshotStore,
    parse_time,
)
from .reach import (
    Hit,
    Target,
    explain,
    find_node,
    pair_policy,
    parse_proto,
    reach_pairs,
    rule_text,
    target_for,
)
from .timeline import Interval, Timeline, event_ref, iso, reach_timeline
from .views import (
    Citations,
    diff_view,
    impact,
    impact_summary,
    netmap_bytes,
    netmap_citations,
    netmap_view,
    state_view,
    who_can_reach,
)

__all__ = [
    "Citations",
    "History",
    "Hit",
    "Interval",
    "MemorySnapshots",
    "Point",
    "ReplayError",
    "Snapshot",
    "SnapshotStore",
    "Target",
    "Timeline",
    "diff_view",
    "event_ref",
    "explain",
    "find_node",
    "impact",
    "impact_summary",
    "iso",
    "netmap_bytes",
    "netmap_citations",
    "netmap_view",
    "pair_policy",
    "parse_proto",
    "parse_time",
    "reach_pairs",
    "reach_timeline",
    "rule_text",
    "state_view",
    "target_for",
    "who_can_reach",
]
