"""The load generator's figures as text: quantiles, the table and the notes under it.

Pure functions of the results (:data:`~cli.bench.loadgen.options.Results`):
:func:`pct` turns latencies into a quantile over the expected receivers (those who
never got a change count as infinitely late), :func:`format_table` prints one row per
tailnet size, and the ``*_lines`` functions the CPU curve, the churn and ``--workers``
figures, the targets of the scenario run (issue 7's or issue 19's: :func:`targets_for`)
and the warnings about incomplete or suspect rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .options import CHURN_KINDS, Results

__all__ = [
    "ISSUE_7",
    "ISSUE_19_CHURN",
    "ISSUE_19_CORP",
    "ISSUE_19_FLAT",
    "Targets",
    "churn_lines",
    "cpu_lines",
    "curve_lines",
    "format_table",
    "pct",
    "sec",
    "target_lines",
    "targets_for",
    "warning_lines",
]


def pct(latencies: list[float], expected: int, q: float) -> float | None:
    """The q-quantile in ms over ``expected`` receivers, counting those who never
    received as infinitely late: ``None`` when the quantile falls among them."""
    if expected <= 0:
        return None
    ordered = sorted(latencies)
    i = min(expected - 1, max(0, math.ceil(q * expected) - 1))
    return ordered[i] * 1000 if i < len(ordered) else None


def sec(ms: float | None) -> float | None:
    """Milliseconds to seconds, keeping ``None`` (not reached)."""
    return None if ms is None else ms / 1000


def cpu_lines(row: Results) -> list[str]:
    """With ``--workers``: each side's CPU per phase (nothing otherwise)."""
    if not row.get("workers"):
        return []
    lines = [f"{_num(row, 'nodes') or 0:.0f} nodes, {row['workers']} workers, {row.get('pinning', '')}"]
    for phase in ("register", "connect", "join", "policy", "reconnect", "churn"):
        wall = _num(row, f"{phase}_wall_s")
        if wall is None:
            continue
        waited = _num(row, f"{phase}_cpu_wait_s")
        queued = "" if waited is None else f" (and {waited:.1f} s runnable, waiting for a CPU)"
        lines.append(f"  {phase:>9}: {wall:.1f} s; CPU: server {_num(row, f'{phase}_cpu_s') or 0:.2f} s{queued}, "
                     f"workers {_num(row, f'{phase}_workers_cpu_s') or 0:.2f} s "
                     f"({_num(row, f'{phase}_workers_cpu_pct') or 0:.0f}% of a core), "
                     f"main {_num(row, f'{phase}_loadgen_cpu_pct') or 0:.0f}% of a core")
    return lines


def churn_lines(row: Results) -> list[str]:
    """The churn phase's figures (nothing for a row without one)."""
    if "churn_changes" not in row:
        return []

    def ms(key: str) -> str:
        value = _num(row, key)
        if value is None:  # nobody to wait for, or too many never reached
            return "-" if not row.get(key.rsplit("_", 2)[0] + "_expected") else "t/o"
        return f"{value:.0f}"

    n = _num(row, "nodes") or 0
    changes = _num(row, "churn_changes") or 0
    lines = [f"churn at {n:.0f} nodes for {_num(row, 'churn_duration_s') or 0:.0f} s: "
             f"{changes:.0f} changes, {_num(row, 'churn_kib_per_change') or 0:.1f} KiB received per change"]
    for kind in ("all", *CHURN_KINDS):
        p = "churn" if kind == "all" else f"churn_{kind}"
        skipped = row.get(f"{p}_skipped") or 0
        count = "" if kind == "all" else (
            f"{row[f'{p}_count']:>4} of {row.get(f'{p}_planned', '?')} planned"
            + (f" ({skipped} skipped: no node free to change)" if skipped else "") + ", ")
        kib = f", {_num(row, f'{p}_kib_per_change') or 0:.1f} KiB each" if kind != "all" else ""
        lines.append(f"  {kind:>6}: {count}{row[f'{p}_reached']}/{row[f'{p}_expected']} receivers reached "
                     f"({row.get(f'{p}_missing', '?')} missing), "
                     f"p50 {ms(f'{p}_p50_ms')} ms, p99 {ms(f'{p}_p99_ms')} ms, max {ms(f'{p}_max_ms')} ms, "
                     f"{row[f'{p}_unexpected']} unexpected{kib}")
    held = _num(row, "churn_policy_held_s")
    if held:
        lines.append(f"  the policy edits held the other changes back for {held:.1f} s in all (each waits for "
                     "the changes under way, then lands alone)")
    cpu = _num(row, "churn_cpu_s") or 0
    waited = _num(row, "churn_cpu_wait_s")
    lines.append(f"  CPU: server {cpu:.2f} s ({1000 * cpu / max(changes, 1):.0f} ms per change"
                 + ("" if waited is None else f"; {waited:.1f} s runnable, waiting for a CPU") + "), "
                 f"load generator {_num(row, 'churn_loadgen_cpu_s') or 0:.2f} s"
                 + (f" + workers {_num(row, 'churn_workers_cpu_s') or 0:.2f} s" if row.get("workers") else ""))
    slope = _num(row, "churn_rss_slope_mib_per_min")

    def mib(key: str) -> str:
        value = _num(row, key)
        return "?" if value is None else f"{value:.0f}"

    lines.append(f"  server RSS {mib('churn_rss_first_mib')} MiB at the start, {mib('churn_rss_warm_mib')} at "
                 f"{_num(row, 'churn_rss_slope_from_s') or 0:.0f} s, {mib('churn_rss_last_mib')} at the end "
                 f"({row.get('churn_rss_samples', 0)} samples); slope after "
                 f"{_num(row, 'churn_rss_slope_from_s') or 0:.0f} s: "
                 + ("n/a (too few samples)" if slope is None else f"{slope:+.2f} MiB/min"))
    return lines


_COLUMNS: Final = [
    ("nodes", "nodes", "{:.0f}"),
    ("classes", "classes", "{:.0f}"),
    ("peers_avg", "peers avg", "{:.0f}"),
    ("peers_median", "med", "{:.0f}"),
    ("peers_max", "max", "{:.0f}"),
    ("register_all_s", "reg s", "{:.1f}"),
    ("connect_all_s", "connect s", "{:.1f}"),
    ("mem_per_node_kib", "KiB/node", "{:.1f}"),
    ("peak_rss_mib", "peak MiB", "{:.0f}"),
    ("register_ms", "register ms", "{:.0f}"),
    ("join_p50_ms", "join p50 ms", "{:.0f}"),
    ("join_p99_ms", "join p99 ms", "{:.0f}"),
    ("join_cpu_s", "join CPU s", "{:.3f}"),
    ("join_loadgen_cpu_pct", "lg %", "{:.0f}"),
    ("join_expected", "join rcv", "{:.0f}"),
    ("join_kib", "join KiB", "{:.0f}"),
    ("presence_p50_ms", "presence p50 ms", "{:.0f}"),
    ("presence_p99_ms", "presence p99 ms", "{:.0f}"),
    ("presence_expected", "presence rcv", "{:.0f}"),
    ("policy_p50_ms", "policy p50 ms", "{:.0f}"),
    ("policy_p99_ms", "policy p99 ms", "{:.0f}"),
    ("policy_cpu_s", "policy CPU s", "{:.3f}"),
    ("policy_loadgen_cpu_pct", "lg %", "{:.0f}"),
    ("policy_expected", "policy rcv", "{:.0f}"),
    ("policy_kib", "policy KiB", "{:.0f}"),
    ("server_start_s", "start s", "{:.1f}"),
    ("reconnect_all_s", "reconnect s", "{:.1f}"),
]


@dataclass(frozen=True)
class Targets:
    """The targets a row is held against: where they come from, the run they are
    meant for, and per figure (key, upper limit, label). A figure must be under its
    limit; ``None`` (not reached in time) fails."""

    source: str
    meant_for: str
    limits: tuple[tuple[str, float, str], ...]


#: Issue 7's targets: one user, allow-all, 5,000 nodes on 2 cores.
ISSUE_7: Final = Targets("issue 7", "5,000 flat nodes on 2 cores", (
    ("join_p99_ms", 2000.0, "a join reaches all within 2 s (p99)"),
    ("policy_p99_ms", 5000.0, "a policy change reaches all within 5 s (p99)"),
    ("mem_per_node_kib", 20.0, "under 20 KiB of server memory per idle node"),
    ("restart_total_s", 60.0, "all reconnected within 60 s of a restart"),
    ("register_ms", 200.0, "registering one more node answers within 200 ms"),
))
#: Issue 19's, for the segmented tailnet.
ISSUE_19_CORP: Final = Targets("issue 19, corp", "5,000 corp nodes on 2 cores", (
    ("join_p99_ms", 1000.0, "a join reaches every node that sees it within 1 s (p99)"),
    ("policy_p99_ms", 3000.0, "a policy change reaches every node it concerns within 3 s (p99)"),
    ("mem_per_node_kib", 20.0, "under 20 KiB of server memory per idle node"),
    ("register_all_s", 60.0, "all nodes registered within 60 s"),
    ("restart_total_s", 60.0, "every node back within 60 s of a restart"),
    ("register_ms", 100.0, "registering one more node answers within 100 ms"),
))
#: Issue 19's, for twice issue 7's flat tailnet.
ISSUE_19_FLAT: Final = Targets("issue 19, flat", "10,000 flat nodes on 2 cores", (
    ("join_p99_ms", 2000.0, "a join reaches all within 2 s (p99)"),
    ("policy_p99_ms", 5000.0, "a policy change reaches all within 5 s (p99)"),
    ("mem_per_node_kib", 16.0, "under 16 KiB of server memory per idle node"),
    ("restart_total_s", 120.0, "all reconnected within 120 s of a restart"),
))
#: The slope under which the churn phase's RSS counts as flat: 0.5 MiB/min is under
#: 5 MiB over the nine minutes after the first (about 1% of a 5,000-node server),
#: and far above the noise of a least-squares fit over 540 one-second samples.
FLAT_RSS_SLOPE: Final = 0.5
#: Issue 19's, for corp under steady change.
ISSUE_19_CHURN: Final = Targets("issue 19, churn", "5,000 corp nodes for 10 minutes on 2 cores", (
    ("churn_p99_ms", 2000.0, "every change reaches every node it concerns within 2 s (p99)"),
    ("churn_rss_slope_mib_per_min", FLAT_RSS_SLOPE,
     f"server RSS does not grow after the first minute (slope under {FLAT_RSS_SLOPE} MiB/min)"),
))
#: Issue 18's, over ``--replicas`` (added to whichever set applies when measured).
_PRESENCE: Final = ("presence_p99_ms", 1000.0, "an endpoint change reaches the other replicas' peers within 1 s (p99)")


def targets_for(row: Results) -> Targets:
    """The targets that apply to a row: issue 19's for ``corp`` and ``churn``; for
    ``flat`` issue 19's at 10,000 nodes (from 7,500 on, nearer 10,000 than 5,000)
    and issue 7's below."""
    scenario = row.get("scenario", "flat")
    if scenario == "corp":
        return ISSUE_19_CORP
    if scenario == "churn":
        return ISSUE_19_CHURN
    return ISSUE_19_FLAT if (_num(row, "nodes") or 0) >= 7500 else ISSUE_7


def _cell(row: Results, key: str, fmt: str) -> str:
    if key not in row:
        return "-"
    value = row[key]
    if value is None:
        return "t/o"
    assert isinstance(value, int | float)
    return fmt.format(value)


def format_table(rows: Sequence[Results]) -> str:
    """The figures as an aligned text table, one row per tailnet size."""
    head = [h for _, h, _ in _COLUMNS]
    body = [[_cell(r, k, fmt) for k, _, fmt in _COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *body])


def _num(row: Results, key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) else None


def curve_lines(rows: Sequence[Results]) -> list[str]:
    """How CPU per change grows with the tailnet, against linear and quadratic."""
    lines: list[str] = []
    base = rows[0]
    for r in rows[1:]:
        scale = (_num(r, "nodes") or 0) / (_num(base, "nodes") or 1)
        for key, what in (("join_cpu_s", "join"), ("policy_cpu_s", "policy")):
            a, b = _num(base, key), _num(r, key)
            if a and b is not None:
                lines.append(
                    f"{what} CPU x{b / a:.1f} for x{scale:.0f} nodes "
                    f"(linear would be x{scale:.0f}, quadratic x{scale * scale:.0f})"
                )
    return lines


def warning_lines(row: Results) -> list[str]:
    """What makes a row's figures incomplete or suspect."""
    n = _num(row, "nodes") or 0
    out: list[str] = []
    for key, what in (("registered", "registered"), ("connected", "connected"),
                      ("join_reached", "saw the join"), ("policy_reached", "got the new filter"),
                      ("presence_reached", "on the other replicas got the endpoint change"),
                      ("reconnected", "reconnected")):
        got = _num(row, key)
        want = n + 1 if key == "reconnected" and "join_reached" in row else n
        if key in ("join_reached", "policy_reached", "presence_reached"):
            want = _num(row, key.replace("reached", "expected")) or 0
        if got is not None and got < want:
            out.append(f"{n:.0f} nodes: only {got:.0f} of {want:.0f} {what} before the timeout")
    for phase in ("connect", "join", "presence", "policy", "reconnect", "churn"):
        busy, wall = _num(row, f"{phase}_loadgen_cpu_pct"), _num(row, f"{phase}_wall_s")
        if busy is not None and busy > 90 and (wall or 0) >= 1:  # a blip is no saturation
            out.append(f"{n:.0f} nodes: the load generator was {busy:.0f}% busy during {phase}; "
                       "its figures are upper bounds")
        workers, their = _num(row, "workers"), _num(row, f"{phase}_workers_cpu_pct")
        if workers and their is not None and their / workers > 90 and (wall or 0) >= 1:
            out.append(f"{n:.0f} nodes: the load generator's workers were {their / workers:.0f}% busy each "
                       f"during {phase}; its figures are upper bounds")
    if row.get("aborted"):
        out.append(f"{n:.0f} nodes: aborted: {row['aborted']}")
    if row.get("churn_unexpected"):
        out.append(f"{n:.0f} nodes: {row['churn_unexpected']} nodes got a churn change although the policy "
                   "says it does not concern them")
        strays = row.get("churn_strays")
        for stray in strays if isinstance(strays, list) else ():
            out.append(f"  {stray['kind']} of sim-{stray['node']} (node id {stray['node_id']}) reached "
                       f"sim-{stray['client']} after {stray['after_ms']:.0f} ms")
    if _num(row, "churn_reached") is not None and (_num(row, "churn_reached") or 0) < (_num(row, "churn_expected") or 0):
        out.append(f"{n:.0f} nodes: churn changes reached only {row['churn_reached']} of "
                   f"{row['churn_expected']} receivers in time")
    for kind in CHURN_KINDS:
        done, planned = _num(row, f"churn_{kind}_count"), _num(row, f"churn_{kind}_planned")
        due = (done or 0) + (_num(row, f"churn_{kind}_skipped") or 0)  # skipped: no node was free
        if done is not None and planned and due < 0.9 * planned:
            held = _num(row, "churn_policy_held_s")
            why = "" if not held or kind == "policy" else (
                f" (the policy edits held the other changes back for {held:.0f} s in all)")
            out.append(f"{n:.0f} nodes: only {due:.0f} of the {planned:.0f} planned churn {kind} changes came "
                       f"due: the run fell behind its rates{why}")
    seen, expected = _num(row, "full_map_peers"), _num(row, "full_map_peers_expected")
    if seen is not None and seen >= 0 and expected is not None and seen != expected:
        out.append(f"{n:.0f} nodes: the sentinel's full map lists {seen:.0f} peers, the policy engine "
                   f"says {expected:.0f}: the expected receivers do not match the server")
    for phase in ("join", "presence", "policy"):
        if row.get(f"{phase}_unexpected"):
            out.append(f"{n:.0f} nodes: {row[f'{phase}_unexpected']} nodes got the {phase} change although "
                       "the policy says it does not concern them")
    if row.get("marker_mismatches"):
        out.append(f"{n:.0f} nodes: byte search and full decode disagreed {row['marker_mismatches']} times")
    return out


def target_lines(row: Results) -> list[str]:
    """The targets of :func:`targets_for` against one row, ok or FAIL each."""
    targets = targets_for(row)
    run = f"{_num(row, 'nodes') or 0:.0f} nodes"
    if "churn_duration_s" in row:
        run += f" for {_num(row, 'churn_duration_s') or 0:.0f} s"
    lines = [f"targets ({targets.source}; meant for {targets.meant_for}), at {run}:"]
    for key, limit, label in (*targets.limits, _PRESENCE):
        if key not in row:
            continue
        value = _num(row, key)
        mark = "FAIL (timed out)" if value is None else ("ok" if value < limit else "FAIL")
        shown = "-" if value is None else f"{value:.1f}"
        lines.append(f"  {mark:>4}  {label} ({key} = {shown})")
    return lines
