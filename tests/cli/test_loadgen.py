"""``tailledger loadgen``: the cheap receive path and one whole (tiny) run.

The scanner tests build streams with the server's own framing
(:func:`protocol.frame_map_response`) and cut them at arbitrary points, because the
HTTP/2 DATA boundaries a client sees have nothing to do with frame boundaries. The run
test starts a real server subprocess with five simulated clients and checks that every
phase completed for every client and that the figures are plausible.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import resource
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.bench.loadgen.churn import (
    Kind,
    ReceiverModel,
    deletable,
    planned_changes,
    policy_tailnet,
    rss_slope,
    rss_summary,
)
from cli.bench.loadgen.client import ChurnWatch
from cli.bench.loadgen.main import build_parser, loadgen_main, server_settings
from cli.bench.loadgen.options import PHASES, LoadgenOptions
from cli.bench.loadgen.phases import _servers, expectations
from cli.bench.loadgen.report import (
    ISSUE_7,
    ISSUE_19_CHURN,
    ISSUE_19_CORP,
    ISSUE_19_FLAT,
    churn_lines,
    cpu_lines,
    target_lines,
    targets_for,
    warning_lines,
)
from cli.bench.loadgen.scanner import FrameKind, MapFrameScanner, ScannedFrame, make_decompressor
from cli.bench.loadgen.server import Server, proc_cpu_wait, thread_cpu_waits, waited_between
from cli.bench.loadgen.workers import ParentHub, RemoteWatch, Workers
from cli.bench.scenarios import corp, scenario
from cli.fdlimit import raise_fd_limit
from cli.spawn import child_env, tailledger_argv
from projections.policy import compile_policy, parse_policy
from protocol import KEEPALIVE_FRAME_ZSTD, KEEPALIVE_JSON, RemoteProtocolError, frame_map_response

_decompress = make_decompressor()


def _pieces(message: bytes, size: int) -> bytes:
    """``message`` framed as several concatenated zstd frames, as the server sends
    full maps built from shared pre-compressed pieces."""
    compressor = zstandard.ZstdCompressor(level=1, write_checksum=True)
    payload = b"".join(compressor.compress(message[i : i + size]) for i in range(0, len(message), size))
    return len(payload).to_bytes(4, "little") + payload


_NEWCOMER = b"nodekey:" + b"ab" * 32
# A full map big enough to span many chunks, a keep-alive, and two updates.
_FULL = json.dumps(
    {"Node": {"ID": 1, "Key": "nodekey:" + "01" * 32},
     "Peers": [{"ID": i, "Key": f"nodekey:{i:064x}", "Name": f"sim-{i}.example."} for i in range(2, 400)],
     "PacketFilters": {"base": []}},
    separators=(",", ":"),
).encode()
_UPDATE_JOIN = b'{"PeersChanged":[{"ID":401,"Key":"' + _NEWCOMER + b'"}],"ControlTime":"2026-01-01T00:00:00Z"}'
_UPDATE_PATCH = b'{"PeersChangedPatch":[{"NodeID":7,"Online":true}],"ControlTime":"2026-01-01T00:00:01Z"}'
_MESSAGES = [_FULL, KEEPALIVE_JSON, _UPDATE_JOIN, _UPDATE_PATCH]
_STREAM = _pieces(_FULL, 4096) + b"".join(frame_map_response(m, compress=True) for m in _MESSAGES[1:])
_KINDS = [FrameKind.FULL, FrameKind.KEEPALIVE, FrameKind.UPDATE, FrameKind.UPDATE]


def _feed(scanner: MapFrameScanner, data: bytes, cuts: list[int]) -> list[ScannedFrame]:
    frames: list[ScannedFrame] = []
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in itertools.pairwise(bounds):
        frames.extend(scanner.feed(data[start:end]))
    return frames


_cuts = st.lists(st.integers(min_value=1, max_value=len(_STREAM) - 1), max_size=40)


@given(cuts=_cuts)
def test_skipping_scanner_classifies_frames_without_reading_them(cuts: list[int]) -> None:
    asked: list[FrameKind] = []

    def want(kind: FrameKind) -> bool:
        asked.append(kind)
        return False

    frames = _feed(MapFrameScanner(want, _decompress), _STREAM, cuts)
    assert [f.kind for f in frames] == _KINDS
    assert [f.size for f in frames] == [
        len(_pieces(_FULL, 4096)) - 4, *(len(frame_map_response(m, compress=True)) - 4 for m in _MESSAGES[1:])
    ]
    assert all(f.payload is None for f in frames)
    # Asked once per non-keep-alive frame, with the kind it will get.
    assert asked == [FrameKind.FULL, FrameKind.UPDATE, FrameKind.UPDATE]


@given(cuts=_cuts)
def test_wanted_frames_come_back_whole(cuts: list[int]) -> None:
    frames = _feed(MapFrameScanner(lambda kind: True, _decompress), _STREAM, cuts)
    assert [f.kind for f in frames] == _KINDS
    bodies = [_decompress(f.payload) if f.payload is not None else None for f in frames]
    assert bodies == [_FULL, None, _UPDATE_JOIN, _UPDATE_PATCH]
    assert _NEWCOMER in (bodies[2] or b"")
    assert _NEWCOMER not in (bodies[3] or b"")


def test_a_message_of_many_zstd_frames_decompresses_whole() -> None:
    payload = _pieces(_FULL, 1000)[4:]
    assert zstandard.ZstdDecompressor().decompress(payload, max_output_size=1 << 24) != _FULL  # first piece only
    assert _decompress(payload) == _FULL
    with pytest.raises(RemoteProtocolError, match="limit"):
        make_decompressor(max_size=len(_FULL) - 1)(payload)


def test_only_updates_wanted() -> None:
    frames = _feed(MapFrameScanner(lambda kind: kind is FrameKind.UPDATE, _decompress), _STREAM, [])
    assert frames[0].payload is None
    assert frames[2].payload is not None
    assert _decompress(frames[2].payload) == _UPDATE_JOIN


def test_keepalive_before_the_full_map_and_keepalive_of_another_encoder() -> None:
    # A keep-alive compressed by some other zstd encoder: different bytes, same JSON.
    other = zstandard.ZstdCompressor(level=19, write_checksum=False).compress(KEEPALIVE_JSON)
    assert other != KEEPALIVE_FRAME_ZSTD[4:]
    data = (
        len(other).to_bytes(4, "little") + other
        + KEEPALIVE_FRAME_ZSTD
        + frame_map_response(_UPDATE_PATCH, compress=True)  # tiny, but the stream's first map
        + KEEPALIVE_FRAME_ZSTD
    )
    frames = MapFrameScanner(lambda kind: False, _decompress).feed(data)
    assert [f.kind for f in frames] == [FrameKind.KEEPALIVE, FrameKind.KEEPALIVE, FrameKind.FULL, FrameKind.KEEPALIVE]
    # Small frames are read to rule out a keep-alive, but not handed out unless wanted.
    assert frames[2].payload is None


def test_bad_lengths_are_the_servers_fault() -> None:
    with pytest.raises(RemoteProtocolError, match="zero-length"):
        MapFrameScanner(lambda kind: False, _decompress).feed(b"\0\0\0\0")
    with pytest.raises(RemoteProtocolError, match="too large"):
        MapFrameScanner(lambda kind: False, _decompress, max_frame=1000).feed((1001).to_bytes(4, "little"))


def test_phases_are_checked() -> None:
    assert build_parser().parse_args(["--phases", "join,restart"]).phases == {"join", "restart"}
    assert build_parser().parse_args([]).phases == set(PHASES)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--phases", "join,bogus"])


def _number(row: dict[str, object], key: str) -> float:
    value = row[key]
    assert isinstance(value, int | float), f"{key} = {value!r}"
    assert math.isfinite(value), f"{key} = {value!r}"
    return float(value)


@pytest.mark.slow
def test_a_tiny_run_measures_every_phase(tmp_path: Path) -> None:
    n = 5
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [*tailledger_argv("loadgen"), "--nodes", str(n), "--json", str(out),
         "--updaters", "1", "--update-interval", "0.3,0.6"],
        env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "join p99 ms" in proc.stdout
    assert "warning" not in proc.stdout, proc.stdout
    [row] = json.loads(out.read_text())
    assert row["nodes"] == n
    # Everybody made it through every phase (the newcomer joins the later ones).
    assert row["registered"] == n
    assert row["connected"] == n
    assert row["join_reached"] == n
    assert row["policy_reached"] == n + 1
    assert row["reconnected"] == n + 1
    # The sentinel's decoded full map lists every other node (the policy allows all),
    # and its decoded view never contradicted the byte search.
    assert row["full_map_peers"] == n - 1
    assert row["marker_mismatches"] == 0
    assert row["lite_updates"] >= 1
    # Latencies: positive, ordered, and within the phase timeouts.
    for phase in ("join", "policy"):
        p50, p99, top = (_number(row, f"{phase}_{q}_ms") for q in ("p50", "p99", "max"))
        assert 0 < p50 <= p99 <= top < 60_000
    assert 0 < _number(row, "register_ms") < 60_000
    assert _number(row, "join_self_map_ms") >= _number(row, "register_ms")
    assert _number(row, "connect_all_s") > 0
    assert 0 < _number(row, "reconnect_all_s") <= _number(row, "restart_total_s")
    # Memory and CPU figures come from /proc of a live server.
    assert _number(row, "rss_mib") > 10
    assert _number(row, "peak_rss_mib") >= _number(row, "rss_mib")
    assert _number(row, "rss_after_restart_mib") > 10
    assert _number(row, "full_map_json_kib") > _number(row, "full_map_kib") > 0
    for key in ("register_cpu_s", "connect_cpu_s", "join_cpu_s", "policy_cpu_s", "reconnect_cpu_s"):
        assert _number(row, key) >= 0


@pytest.mark.slow
def test_a_tiny_corp_run_waits_only_for_the_nodes_a_change_concerns(tmp_path: Path) -> None:
    """Issue 19: the corp scenario's receivers come from the policy engine; a node
    that gets a change it should not see would be counted (and must not be)."""
    n = 40
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [*tailledger_argv("loadgen"), "--scenario", "corp", "--nodes", str(n), "--json", str(out),
         "--updaters", "0", "--phases", "join,policy"],
        env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stdout, proc.stdout
    [row] = json.loads(out.read_text())
    assert row["scenario"] == "corp"
    assert row["registered"] == row["connected"] == n
    # Segmented: several classes, and the newcomer (a team member's device) is seen
    # by some nodes but not all; the policy change reaches nearly all.
    assert _number(row, "classes") > 5
    assert 0 < _number(row, "join_expected") < n
    assert row["join_reached"] == row["join_expected"]
    assert row["join_unexpected"] == 0
    assert row["policy_reached"] == row["policy_expected"] > n // 2
    assert row["policy_unexpected"] == 0
    assert row["marker_mismatches"] == 0
    assert _number(row, "join_kib") > 0 and _number(row, "policy_kib") > 0


@pytest.mark.slow
def test_the_memory_guard_stops_a_ballooning_server(tmp_path: Path) -> None:
    # Any real server is above 1 MiB: the guard must trip, kill it and say so.
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [*tailledger_argv("loadgen"), "--nodes", "3", "--json", str(out), "--max-server-rss", "1"],
        env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    [row] = json.loads(out.read_text())
    assert "passed --max-server-rss" in str(row["aborted"])
    assert "warning: 3 nodes: aborted" in proc.stdout
    assert "join_reached" not in row


def test_a_churn_change_counts_each_receiver_once_and_strays_as_unexpected() -> None:
    watch = ChurnWatch("tag", frozenset({1, 2}), key=b"nodekey:aa", node_id=7, exclude=3)
    watch.t0 = 10.0
    assert watch.matches({b"nodekey:aa"}, set(), False)
    assert watch.matches(set(), {7}, False)  # it left this node's view
    assert not watch.matches({b"nodekey:bb"}, {8}, True)
    watch.offer(3, 10.5, 1000)  # the changed node itself is no receiver
    watch.offer(1, 11.0, 100)
    watch.offer(1, 12.0, 1000)  # a second update to the same node counts once
    watch.offer(5, 11.5, 30)  # not a receiver: an error (its bytes were sent all the same)
    assert (watch.latencies, watch.unexpected, watch.done.is_set()) == ([1.0], 1, False)
    assert watch.strays == [(5, 1.5)]  # who and when, for telling a fault from a model gap
    watch.offer(2, 12.5, 7)
    assert watch.latencies == [1.0, 2.5] and watch.done.is_set()
    assert watch.delivered_bytes == 137
    delete = ChurnWatch("delete", frozenset({1}), key=b"nodekey:cc", node_id=9)
    assert delete.matches(set(), {9}, False) and not delete.matches({b"nodekey:cc"}, set(), False)
    assert ChurnWatch("policy", frozenset({1})).matches(set(), set(), True)
    assert ChurnWatch("join", frozenset()).done.is_set()  # nobody to wait for


def test_a_node_whose_visibility_a_tag_change_under_way_flips_is_not_deleted() -> None:
    # Two tag changes under way: the first target starts or stops seeing 4 and 5, the
    # second 5 and 6. Deleting one of those before the target's own update arrives,
    # the target may legitimately get its removal or never see it; the receiver model
    # (with the target's new tags) would count one as a stray, the other as a miss.
    assert deletable([1, 2, 3, 4, 5, 6, 7], [frozenset({4, 5}), frozenset({5, 6})]) == [1, 2, 3, 7]
    assert deletable([1, 2], []) == [1, 2]


def test_rss_slope_is_per_minute_after_the_warm_up() -> None:
    samples = [(0.0, 500.0), (1.0, 100.0), (2.0, 101.0), (3.0, 102.0), (4.0, 103.0)]
    assert rss_slope(samples, 1.0) == pytest.approx(60.0)
    assert rss_slope(samples, 3.5) is None  # too few samples


def test_the_rss_slope_of_a_ten_minute_run_leaves_the_first_minute_out() -> None:
    # Growing 10 MiB/min during the first minute (warm-up), flat after it.
    samples = [(float(t), 300 + 10 * min(t, 60) / 60) for t in range(600)]
    summary = rss_summary(samples, 600.0)
    assert summary["churn_rss_slope_from_s"] == 60.0
    assert summary["churn_rss_slope_mib_per_min"] == pytest.approx(0.0, abs=1e-9)
    assert (summary["churn_rss_first_mib"], summary["churn_rss_warm_mib"], summary["churn_rss_last_mib"]) == (
        300.0, 310.0, 310.0)
    assert (rss_slope(samples, 0.0) or 0) > 0.2  # with the warm-up it would read as growth
    # A short run has no minute to spare: its second half.
    short = rss_summary([(float(t), 100.0 + t) for t in range(20)], 20.0)
    assert short["churn_rss_slope_from_s"] == 10.0
    assert short["churn_rss_slope_mib_per_min"] == pytest.approx(60.0)
    assert rss_summary([], 600.0)["churn_rss_slope_mib_per_min"] is None


def test_the_churn_plan_counts_what_its_rates_ask_for() -> None:
    opts = LoadgenOptions(scenario="churn", duration=600, join_delete_every=1, tag_every=10, policy_every=60)
    assert planned_changes(opts) == {"join": 300, "delete": 299, "tag": 59, "policy": 9}
    off = LoadgenOptions(scenario="churn", duration=8, join_delete_every=0, tag_every=2, policy_every=4)
    assert planned_changes(off) == {"join": 0, "delete": 0, "tag": 3, "policy": 1}


def _engine_peers(users: tuple[str, ...], text: str, live: dict[int, Kind], index: int) -> frozenset[int]:
    """The reference: compile the whole live tailnet and ask for one node's peers."""
    compiled = compile_policy(parse_policy(text), policy_tailnet(users, live))
    return frozenset(i - 1 for i in compiled.peer_id_set(index + 1))


def test_the_receiver_model_names_kinds_met_under_the_other_policy() -> None:
    """Issue 19, the smoke run's two strays: both policies are compiled before the
    churn begins; a kind met later under one of them (a newcomer of a user with no
    device yet, a tag no node had) must be a receiver under the other one too."""
    sc = scenario("churn", 21)  # as the load generator builds it for 20 nodes
    live = {i: sc.node(i) for i in range(20)}
    model = ReceiverModel(sc.users, live, sc.policy_a)
    for text in (sc.policy_a, sc.policy_b):  # as run_churn does before its clock starts
        model.seen_by(sc.node(0), text)
    assert sc.node(20) == ("u1", ())  # an admin: sees every node; no device of u1 yet
    # Under policy_a (each asked as the churn phase asks it): sim-20 joins, sim-9 is
    # retagged to a tag no node had (tag:svc1 reaches it on 5432).
    model.peers(20, {**live, 20: sc.node(20)})
    live[20] = sc.node(20)
    assert (live[9], live[19]) == (("u0", ("tag:svc0",)), ("u0", ("tag:svc1",)))
    model.peers(9, {**live, 9: ("u0", ("tag:svc2",))})
    live[9] = ("u0", ("tag:svc2",))
    model.policy = sc.policy_b  # a policy edit
    # The delete of sim-15 concerns the admins' devices, the newcomer too.
    assert 20 in model.peers(15)
    assert model.peers(15) == _engine_peers(sc.users, sc.policy_b, live, 15)
    # sim-19 (tag:svc1 -> svc2) is seen by sim-9 (svc2) before the change, not after.
    after = {**live, 19: ("u0", ("tag:svc2",))}
    assert 9 in model.peers(19) and 9 not in model.peers(19, after)
    assert model.peers(19) == _engine_peers(sc.users, sc.policy_b, live, 19)
    assert model.peers(19, after) == _engine_peers(sc.users, sc.policy_b, after, 19)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_the_receiver_model_agrees_with_compiling_the_live_tailnet(data: st.DataObject) -> None:
    """Issue 19: a change's receivers come from the policy engine. The churn phase asks
    a per-kind template instead of compiling thousands of live nodes per change; after
    any joins, deletes, tag changes and policy edits (asked after each, as the churn
    phase asks, with both of corp's policies compiled first) it must name exactly the
    nodes that compiling the live tailnet does."""
    n = 60
    sc = corp(n)
    live = {i: sc.node(i) for i in range(n)}
    model = ReceiverModel(sc.users, live, sc.policy_a)
    for text in (sc.policy_a, sc.policy_b):
        model.seen_by(sc.node(0), text)

    parsed = {text: parse_policy(text) for text in (sc.policy_a, sc.policy_b)}

    def check() -> None:
        compiled = compile_policy(parsed[model.policy], policy_tailnet(sc.users, live))
        for index in data.draw(st.lists(st.sampled_from(sorted(live)), min_size=1, max_size=3)):
            assert model.peers(index) == frozenset(i - 1 for i in compiled.peer_id_set(index + 1))

    next_index = n
    for _ in range(data.draw(st.integers(0, 12), label="changes")):
        op = data.draw(st.sampled_from(["join", "delete", "tag", "policy"]))
        if op == "join":
            # Users beyond the first 60 nodes' own: a kind no node had yet.
            kind = sc.node(next_index) if data.draw(st.booleans()) else (f"u{data.draw(st.integers(0, 19))}", ())
            live[next_index] = kind
            next_index += 1
        elif op == "delete" and len(live) > 2:
            del live[data.draw(st.sampled_from(sorted(live)))]
        elif op == "policy":
            model.policy = sc.policy_b if model.policy == sc.policy_a else sc.policy_a
        else:
            tagged = sorted(i for i, (_, tags) in live.items() if tags)
            if tagged:
                i = data.draw(st.sampled_from(tagged))
                live[i] = (live[i][0], (f"tag:svc{data.draw(st.integers(0, 19))}",))
        check()
    # A tag change's "after", asked before it is made (the live map unchanged).
    tagged = sorted(i for i, (_, tags) in live.items() if tags)
    if tagged:
        i = tagged[0]
        after = {**live, i: (live[i][0], ("tag:svc19",))}
        assert model.peers(i, after) == _engine_peers(sc.users, model.policy, after, i)


@pytest.mark.parametrize("name", ["flat", "corp"])
def test_the_peer_figures_taken_per_class_are_those_of_every_node(name: str) -> None:
    """The report's peers per node (average, median, max) come from one node per
    visibility class; they must be what asking every node gives."""
    n = 300
    sc = scenario(name, n + 1)
    got = expectations(sc, n)
    compiled = compile_policy(parse_policy(sc.policy_a), policy_tailnet(sc.users, {i: sc.node(i) for i in range(n + 1)}))
    per_node = sorted(len(compiled.peer_id_set(i + 1)) for i in range(n))
    assert (got.peers_avg, got.peers_median, got.peers_max) == (sum(per_node) / n, float(per_node[n // 2]), per_node[-1])
    assert got.classes > 1 if name == "corp" else got.classes == 1


def test_the_targets_are_those_of_the_scenario_run() -> None:
    assert targets_for({"scenario": "corp", "nodes": 1000}) is ISSUE_19_CORP
    assert targets_for({"scenario": "churn", "nodes": 5000}) is ISSUE_19_CHURN
    assert targets_for({"scenario": "flat", "nodes": 10000}) is ISSUE_19_FLAT
    assert targets_for({"scenario": "flat", "nodes": 5000}) is ISSUE_7
    corp_lines = target_lines({"scenario": "corp", "nodes": 5000, "join_p99_ms": 999.0, "policy_p99_ms": 3100.0,
                               "register_all_s": 59.0, "register_ms": None})
    assert "issue 19, corp" in corp_lines[0] and "5,000 corp nodes" in corp_lines[0]
    assert any(line.strip().startswith("ok") and "within 1 s" in line for line in corp_lines)
    assert any(line.strip().startswith("FAIL") and "policy_p99_ms = 3100.0" in line for line in corp_lines)
    assert any("FAIL (timed out)" in line and "register_ms" in line for line in corp_lines)
    flat = target_lines({"scenario": "flat", "nodes": 10000, "mem_per_node_kib": 17.0, "restart_total_s": 110.0})
    assert "10,000 flat nodes" in flat[0]
    assert [line.split()[0] for line in flat[1:]] == ["FAIL", "ok"]  # 16 KiB, 120 s
    churn = target_lines({"scenario": "churn", "nodes": 5000, "churn_duration_s": 600.0, "churn_p99_ms": 1500.0,
                          "churn_rss_slope_mib_per_min": 2.0})
    assert "at 5000 nodes for 600 s" in churn[0]
    assert [line.split()[0] for line in churn[1:]] == ["ok", "FAIL"]


def _churn_row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {"nodes": 1000, "scenario": "churn", "churn_changes": 10, "churn_duration_s": 120.0,
                              "churn_kib_per_change": 2.0, "churn_cpu_s": 1.5, "churn_loadgen_cpu_s": 3.0}
    for p in ("churn", *(f"churn_{k}" for k in ("join", "delete", "tag", "policy"))):
        row |= {f"{p}_count": 3, f"{p}_planned": 3, f"{p}_expected": 10, f"{p}_reached": 10, f"{p}_missing": 0,
                f"{p}_unexpected": 0, f"{p}_p50_ms": 5.0, f"{p}_p99_ms": 9.0, f"{p}_max_ms": 9.0,
                f"{p}_kib_per_change": 1.0}
    row |= rss_summary([(float(t), 200.0) for t in range(120)], 120.0)
    return row | changes


def test_the_churn_report_shows_each_kind_and_warns_when_the_run_fell_behind() -> None:
    lines = churn_lines(_churn_row(churn_tag_missing=2, churn_tag_reached=8))
    assert any("tag:" in line and "3 of 3 planned" in line and "8/10 receivers reached (2 missing)" in line
               and "1.0 KiB each" in line for line in lines)
    assert any("150 ms per change" in line for line in lines)
    assert any("slope after 60 s: +0.00 MiB/min" in line for line in lines)
    # No receivers: no latency to show, which is not a time-out.
    idle = churn_lines(_churn_row(churn_tag_expected=0, churn_tag_reached=0, churn_tag_p50_ms=None,
                                  churn_tag_p99_ms=None, churn_tag_max_ms=None))
    assert any("tag:" in line and "p50 - ms" in line for line in idle)
    late = churn_lines(_churn_row(churn_tag_reached=0, churn_tag_missing=10, churn_tag_p99_ms=None))
    assert any("tag:" in line and "p99 t/o ms" in line for line in late)
    assert warning_lines(_churn_row()) == []
    [behind] = warning_lines(_churn_row(churn_join_count=1, churn_join_planned=60))
    assert "1 of the 60 planned churn join changes" in behind
    [explained] = warning_lines(_churn_row(churn_join_count=1, churn_join_planned=60, churn_policy_held_s=30.0))
    assert "held the other changes back for 30 s" in explained
    assert any("held the other changes back for 30.0 s" in line
               for line in churn_lines(_churn_row(churn_policy_held_s=30.0)))
    stray = {"kind": "delete", "node": 12, "node_id": 13, "client": 40, "after_ms": 250.0}
    assert warning_lines(_churn_row(churn_unexpected=1, churn_strays=[stray]))[1:] == [
        "  delete of sim-12 (node id 13) reached sim-40 after 250 ms"]
    # A change that came due when no node was free to change is no sign of falling behind.
    assert warning_lines(_churn_row(churn_tag_count=1, churn_tag_skipped=2)) == []
    assert any("(2 skipped: no node free to change)" in line
               for line in churn_lines(_churn_row(churn_tag_count=1, churn_tag_skipped=2)))


def test_a_sentinel_whose_peers_differ_from_the_policy_engine_is_a_warning() -> None:
    assert warning_lines({"nodes": 5, "full_map_peers": 4, "full_map_peers_expected": 4}) == []
    [mismatch] = warning_lines({"nodes": 5, "full_map_peers": 3, "full_map_peers_expected": 4})
    assert "lists 3 peers, the policy engine says 4" in mismatch


def _few_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (500, 500))


def test_the_file_limit_is_per_process_and_a_low_hard_limit_is_a_clear_error(tmp_path: Path) -> None:
    script = (
        "import resource\n"
        "from cli.fdlimit import raise_fd_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (300, 1000))\n"
        "print(raise_fd_limit(500))\n"  # 500 + 256 fit under 1000: raised, no error
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "print(raise_fd_limit(900))\n"  # 1156 do not
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    proc = subprocess.run(["python", "-c", script], env=child_env(), capture_output=True, text=True, timeout=60)
    none, raised, problem, top = proc.stdout.splitlines()
    assert (none, raised, top) == ("None", "756", "1000")
    assert "hard limit (ulimit -Hn) is 1000" in problem and "1156" in problem
    assert raise_fd_limit(0) is None  # this process has far more than 256
    # The command says so and starts nothing.
    low = subprocess.run(
        [*tailledger_argv("loadgen"), "--nodes", "2000", "--json", ""], env=child_env(), capture_output=True,
        text=True, timeout=60,
        preexec_fn=_few_files,
    )
    assert low.returncode == 2 and "ulimit -Hn" in low.stderr, low.stderr


def test_a_ten_thousand_node_run_lifts_the_servers_connection_cap(tmp_path: Path) -> None:
    # The server refuses connections over limits.max_connections (10,000 by default):
    # 10,000 clients and the join phase's newcomer would not all get in.
    opts = LoadgenOptions()
    assert opts.sockets(10_000) == 10_001
    assert LoadgenOptions(scenario="churn", duration=600).sockets(5000) == 5300
    [server] = _servers(10_000, tmp_path, opts)
    assert int(server.env["TAILLEDGER_LIMITS__MAX_CONNECTIONS"]) >= 10_001 + 256
    [small] = _servers(10, tmp_path, opts)
    assert small.env["TAILLEDGER_LIMITS__MAX_CONNECTIONS"] == "10000"  # never below the default


def test_server_settings_reach_the_server_over_the_loadgens_own_and_bad_ones_stop_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--server-setting`` (a [tuning] A/B: the server ignores the shell's
    ``TAILLEDGER_*``) becomes the server's environment, over the load generator's own
    settings; one the server would refuse stops the run before it starts."""
    args = build_parser().parse_args(
        ["--server-setting", "tuning.malloc_mmap_threshold=0", "--server-setting", "limits.write_timeout = 5s"]
    )
    settings = server_settings(args.server_setting)
    assert settings == (
        ("TAILLEDGER_TUNING__MALLOC_MMAP_THRESHOLD", "0"),
        ("TAILLEDGER_LIMITS__WRITE_TIMEOUT", "5s"),
    )
    [server] = _servers(10, tmp_path, LoadgenOptions(server_settings=settings))
    assert server.env["TAILLEDGER_TUNING__MALLOC_MMAP_THRESHOLD"] == "0"
    assert server.env["TAILLEDGER_LIMITS__WRITE_TIMEOUT"] == "5s"  # not the loadgen's 10m
    [plain] = _servers(10, tmp_path / "plain", LoadgenOptions())
    assert "TAILLEDGER_TUNING__MALLOC_MMAP_THRESHOLD" not in plain.env
    assert plain.env["TAILLEDGER_LIMITS__WRITE_TIMEOUT"] == "10m"
    for bad, says in (
        ("tuning.malloc_mmap_threshold=-1", "malloc_mmap_threshold"),
        ("tuning.no_such_knob=1", "no_such_knob"),
        ("malloc_mmap_threshold=0", "SECTION.KEY=VALUE"),
    ):
        assert loadgen_main(["--nodes", "1", "--json", "", "--server-setting", bad]) == 2
        assert says in capsys.readouterr().err


def test_churn_rates_are_checked() -> None:
    args = build_parser().parse_args(["--scenario", "churn", "--duration", "5", "--policy-every", "0"])
    assert (args.duration, args.policy_every, args.tag_every) == (5.0, 0.0, 10.0)
    for bad in (["--duration", "0"], ["--tag-every", "-1"], ["--join-delete-every", "nan"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_tiny_churn_run_times_every_kind_of_change_to_exactly_its_receivers(
    tmp_path: Path, workers: int, bench_smoke: bool
) -> None:
    """Issue 19: corp under steady change; each change's receivers come from the
    policy engine, every one is reached and nobody else gets it (also when the
    clients run in worker processes and the parent judges what they report)."""
    out = tmp_path / "results.json"
    # Every kind of change at least once: joins and deletes every second, a tag change
    # and a policy edit before the end.
    duration, tag_every, policy_every = ("5", "1.5", "3") if bench_smoke else ("8", "2", "4")
    proc = subprocess.run(
        [*tailledger_argv("loadgen"), "--scenario", "churn", "--nodes", "20", "--json", str(out),
         "--updaters", "0", "--duration", duration, "--tag-every", tag_every, "--policy-every", policy_every,
         "--workers", str(workers)],
        env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stdout, proc.stdout
    assert "churn at 20 nodes" in proc.stdout and "MiB/min" in proc.stdout
    [row] = json.loads(out.read_text())
    assert row["scenario"] == "churn"
    assert "join_reached" not in row and "reconnected" not in row  # churn replaces those phases
    for kind in ("join", "delete", "tag", "policy"):
        assert row[f"churn_{kind}_count"] >= 1, kind
        assert row[f"churn_{kind}_reached"] == row[f"churn_{kind}_expected"] > 0, kind
        assert row[f"churn_{kind}_missing"] == row[f"churn_{kind}_unexpected"] == 0, kind
        assert row[f"churn_{kind}_count"] + row[f"churn_{kind}_skipped"] <= row[f"churn_{kind}_planned"], kind
        assert _number(row, f"churn_{kind}_kib_per_change") > 0, kind
    # The receivers come from the policy engine; the server agrees on the sentinel's peers.
    assert row["full_map_peers"] == row["full_map_peers_expected"] > 0
    assert "targets (issue 19, churn" in proc.stdout
    # Segmented: a join concerns some of the nodes, not all of them.
    assert row["churn_join_expected"] < row["churn_join_count"] * 20
    assert row["churn_unexpected"] == 0
    assert row["marker_mismatches"] == 0
    assert row["churn_rss_samples"] >= 5
    assert isinstance(row["churn_rss_slope_mib_per_min"], float)
    assert _number(row, "churn_cpu_s") >= 0 and _number(row, "churn_loadgen_cpu_s") >= 0
    assert _number(row, "churn_kib_per_change") > 0
    assert _number(row, "churn_policy_held_s") > 0  # the edit waited for its receivers, at least
    if workers:
        assert row["workers"] == workers and _number(row, "churn_workers_cpu_s") > 0
    else:
        assert "workers" not in row and "churn_workers_cpu_s" not in row


def test_a_workers_watch_reports_hits_strays_and_bytes_to_the_parent() -> None:
    parent, child = multiprocessing.Pipe()
    watch = RemoteWatch("join", b"nodekey:aa", 3, exclude=9, receivers=frozenset({1, 2, 3}), t0=5.0)
    watch.serial, watch.conn = 4, child
    watch.unexpected += 1
    watch.bytes += 100
    watch.bytes += 20
    watch.hit(6.25)
    got = [parent.recv() for _ in range(4)]
    assert got == [("unexpected", 4, 1), ("bytes", 4, 100), ("bytes", 4, 20), ("hit", 4, 6.25)]
    assert (watch.unexpected, watch.bytes) == (1, 120)
    assert not parent.poll()


def test_workers_are_checked() -> None:
    assert build_parser().parse_args([]).workers == 0  # default: the clients run in-process
    proc = subprocess.run([*tailledger_argv("loadgen"), "--nodes", "3", "--json", "", "--workers", "-1"],
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--workers" in proc.stderr


@pytest.mark.slow
def test_a_tiny_run_with_two_workers_measures_every_phase(tmp_path: Path) -> None:
    """Issue 19: the clients in two worker processes; the parent counts what they
    see, the sentinel's checks come back, and each side's CPU is reported."""
    n = 6
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [*tailledger_argv("loadgen"), "--nodes", str(n), "--json", str(out), "--workers", "2",
         "--updaters", "2", "--update-interval", "0.3,0.6"],
        env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stdout, proc.stdout
    [row] = json.loads(out.read_text())
    assert row["workers"] == 2
    assert row["registered"] == row["connected"] == n
    assert row["join_reached"] == n and row["join_unexpected"] == 0
    assert row["policy_reached"] == n + 1 and row["policy_unexpected"] == 0
    assert row["reconnected"] == n + 1
    # Counted in the workers, folded into the parent's figures.
    assert row["full_map_peers"] == n - 1
    assert row["marker_mismatches"] == 0
    assert row["lite_updates"] >= 1
    assert _number(row, "full_map_kib") > 0 and _number(row, "join_kib") > 0
    for phase in ("join", "policy"):
        p50, p99, top = (_number(row, f"{phase}_{q}_ms") for q in ("p50", "p99", "max"))
        assert 0 < p50 <= p99 <= top < 60_000  # one clock across the processes
    # Each side's CPU: the server's and the workers' (whose clients did the registering).
    for phase in ("register", "connect", "join", "policy", "reconnect"):
        assert _number(row, f"{phase}_cpu_s") >= 0 and _number(row, f"{phase}_workers_cpu_s") >= 0
    assert _number(row, "register_workers_cpu_s") > 0
    pinned = len(os.sched_getaffinity(0)) >= 3
    assert row["pinning"].startswith("pinned:" if pinned else "not pinned:"), row["pinning"]
    assert "workers" in proc.stdout and row["pinning"] in proc.stdout


def test_the_wait_for_a_cpu_of_a_process_that_is_gone_is_unknown() -> None:
    proc = subprocess.Popen(["python", "-c", "pass"])
    proc.wait()
    assert proc_cpu_wait(proc.pid) is None  # reaped: no /proc entry, no figure made up


def test_the_wait_for_a_cpu_is_counted_per_thread_so_an_ended_thread_cannot_make_it_negative() -> None:
    """A phase's wait for a CPU was the difference of two sums over the threads present,
    and a thread that ended in between (trio's idle worker threads do) took its total
    with it: a corp run printed "-0.8 s runnable". Per thread, it never goes below
    zero; a thread present only at the end counts from zero."""
    before = {1: 5.0, 2: 3.0, 3: 1.0}
    after = {1: 5.5, 3: 1.25, 4: 0.5}  # thread 2 ended; 4 is new
    assert waited_between(before, after) == pytest.approx(0.5 + 0.25 + 0.5)
    assert sum(after.values()) - sum(before.values()) < 0  # what was printed before
    waits = thread_cpu_waits(os.getpid())
    if waits is not None:  # (a kernel without schedstats has none)
        assert threading.get_native_id() in waits and all(w >= 0 for w in waits.values())
        assert proc_cpu_wait(os.getpid()) == pytest.approx(sum(waits.values()), abs=0.05)


def test_the_cpu_report_shows_the_servers_wait_for_a_cpu_when_measured() -> None:
    row: dict[str, object] = {"nodes": 10, "workers": 2, "pinning": "shared",
                              "register_wall_s": 4.0, "register_cpu_s": 1.0, "register_cpu_wait_s": 2.5,
                              "connect_wall_s": 1.0, "connect_cpu_s": 0.5}
    register, connect = cpu_lines(row)[1:]
    assert "server 1.00 s (and 2.5 s runnable, waiting for a CPU)" in register
    assert "waiting for a CPU" not in connect  # not measured: nothing claimed


def test_database_options_are_checked() -> None:
    def refused(*argv: str) -> str:
        proc = subprocess.run([*tailledger_argv("loadgen"), "--json", "", *argv],
                              env=child_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stdout
        return proc.stderr

    assert "needs --backend postgres" in refused("--nodes", "3", "--replicas", "2")
    assert "needs --dsn" in refused("--nodes", "3", "--backend", "postgres")
    assert "one --nodes size" in refused("--nodes", "3,4", "--backend", "postgres", "--dsn", "dbname=x")
    assert "--workers" in refused("--nodes", "3", "--backend", "postgres", "--dsn", "dbname=x",
                                  "--replicas", "2", "--workers", "1")


@pytest.mark.slow
def test_a_tiny_run_over_two_replicas_measures_join_policy_and_cross_replica_presence(
    tmp_path: Path, pg_dsn: str
) -> None:
    n = 6
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [*tailledger_argv("loadgen"), "--nodes", str(n), "--json", str(out), "--updaters", "0",
         "--backend", "postgres", "--dsn", pg_dsn, "--replicas", "2"],
        env=child_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    for column in ("join p99 ms", "policy p99 ms", "presence p99 ms"):
        assert column in proc.stdout
    assert "warning" not in proc.stdout, proc.stdout
    [row] = json.loads(out.read_text())
    assert row["replicas"] == 2
    # Clients 0, 2, 4 and the newcomer (6) are on the first replica, 1, 3, 5 on the second.
    assert row["registered"] == n
    assert row["connected"] == n
    assert row["join_reached"] == n  # on both replicas
    assert row["policy_reached"] == n + 1
    # Node 0's endpoint change (first replica), timed at its peers on the second: 1, 3, 5.
    assert row["presence_expected"] == 3
    assert row["presence_reached"] == 3
    assert row["presence_unexpected"] == 0
    assert "reconnected" not in row  # no restart phase over replicas
    for phase in ("join", "presence", "policy"):
        p50, p99, top = (_number(row, f"{phase}_{q}_ms") for q in ("p50", "p99", "max"))
        assert 0 < p50 <= p99 <= top


async def test_a_churn_change_is_made_only_once_every_worker_watches_for_it(tmp_path: Path) -> None:
    """Issue 19: a worker slow to read its pipe got a delete's update on its clients'
    streams before the ``churn`` message that says to watch for it, so the server's
    ``PeersRemoved`` reached those receivers unseen and they were counted missing
    (the 176 "missing" of the 10-minute run at 5,000 nodes). Publishing a churn
    change now returns only once every worker has taken it up: here one worker is
    stopped (SIGSTOP), and the change cannot be made until it runs again."""
    opts = LoadgenOptions(scenario="churn", workers=2)
    hub = ParentHub(
        port=1, auth_key="", server_key=None, decompress=make_decompressor(), update_interval=(20.0, 40.0),
        register_slots=trio.Semaphore(1), connect_slots=None,
    )
    workers = Workers(opts, hub, Server(data=tmp_path, port=1), set())
    results: dict[str, object] = {}
    try:
        async with trio.open_nursery() as nursery:
            await workers.start(nursery, 0, results)
            slow = workers.procs[1].pid
            assert slow is not None
            watch = ChurnWatch("delete", frozenset({1, 2}), node_id=7)
            published = trio.Event()

            async def publish() -> None:
                await workers.publish_churn(watch)
                published.set()

            os.kill(slow, signal.SIGSTOP)
            try:
                nursery.start_soon(publish)
                # The running worker answers; the stopped one cannot.
                await trio.testing.wait_all_tasks_blocked()
                assert not published.is_set()
            finally:
                os.kill(slow, signal.SIGCONT)
            await published.wait()
            assert workers.churn[id(watch)] is watch
            nursery.cancel_scope.cancel()
    finally:
        workers.stop()
