"""``tailledger replay …``, ``log export|import`` and ``policy impact`` on a real data
directory, without a server: read-only, verified, and with the documented JSON shapes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgspec
import pytest

from cli.main import main
from eventlog import SQLiteEventStore

ROOT = Path(__file__).resolve().parents[2] / "replay-fixtures"


def _fingerprint(folder: Path) -> dict[str, tuple[int, float, str]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mode, p.stat().st_mtime, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "data"
    assert main(["log", "import", str(ROOT / "incident-subnet-route" / "events.jsonl"), "--data", str(folder)]) == 0
    capfd.readouterr()
    return folder


def _run(capfd: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out = capfd.readouterr()
    assert code == 0, out.err
    return out.out


def test_no_replay_command_changes_the_data_directory(data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    before = _fingerprint(data)
    d = ("--data", str(data))
    policy = tmp_path / "p.hujson"
    policy.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}')
    for argv in [
        ("replay", "state", *d), ("replay", "state", "--at", "5", "-o", "json", *d),
        ("replay", "netmap", "laptop", "--at", "8", *d), ("replay", "netmap", "1", "-o", "json", *d),
        ("replay", "diff", "--from", "7", "--to", "9", *d), ("replay", "diff", "--from", "0", "-o", "json", *d),
        ("replay", "reach", "laptop", "10.30.0.7", "--port", "22", *d),
        ("replay", "reach", "laptop", "router", "--format", "svg", *d),
        ("replay", "who-can-reach", "10.30.0.7:22", "--at", "8", "-o", "json", *d),
        ("log", "export", "-f", str(tmp_path / "out.jsonl"), *d),
        ("policy", "impact", str(policy), *d), ("policy", "set", "--dry-run", str(policy), *d),
    ]:
        _run(capfd, *argv)
    assert _fingerprint(data) == before
    assert {p.name for p in data.iterdir()} == {"ledger.db"}


def test_reading_the_log_of_a_stopped_server_leaves_its_directory_alone(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """An auditor's ``log show|verify`` on a data directory creates no WAL files in it."""
    monkeypatch.setenv("TAILLEDGER_AUDIT__SIGNING_KEY_FILE", str(tmp_path / "absent.key"))
    before = _fingerprint(data)
    d = ("--data", str(data))
    assert '"seq": 1' in _run(capfd, "log", "show", "-o", "json", *d)
    assert "chain intact" in _run(capfd, "log", "verify", *d)
    assert _fingerprint(data) == before
    assert {p.name for p in data.iterdir()} == {"ledger.db"}


def test_json_shapes_of_reach_and_who_can_reach(data: Path, capfd: pytest.CaptureFixture[str]) -> None:
    d = ("--data", str(data))
    reach = json.loads(_run(capfd, "replay", "reach", "100.64.0.1", "10.30.0.7", "--port", "22", "-o", "json", *d))
    assert set(reach) == {"src", "dst", "port", "intervals"}
    assert reach["src"] == "laptop" and reach["dst"] == "10.30.0.7" and reach["port"] == 22
    [interval] = reach["intervals"]
    assert interval["from"] == {"seq": 8, "time": interval["from"]["time"], "type": "node.routes_approved", "actor": "admin:carol"}
    assert interval["to"]["seq"] == 9 and interval["rule"].startswith("acls[0]: ")
    who = json.loads(_run(capfd, "replay", "who-can-reach", "10.30.0.7:22", "--at", "8", "-o", "json", *d))
    assert set(who) == {"at_seq", "dst", "sources"}
    assert who["at_seq"] == 8 and who["dst"] == "10.30.0.7:22"
    assert [s["node"] for s in who["sources"]] == ["laptop"]
    assert who["sources"][0]["via"] == "subnet route 10.30.0.0/24 of router"
    # --at as an RFC 3339 time: the state after the last event at or before it.
    at_time = interval["from"]["time"]
    assert json.loads(_run(capfd, "replay", "state", "--at", at_time, "-o", "json", *d))["at_seq"] == 8


def test_export_import_round_trip_keeps_the_head(data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export.jsonl"
    _run(capfd, "log", "export", "-f", str(out), "--data", str(data))
    assert out.read_bytes() == (ROOT / "incident-subnet-route" / "events.jsonl").read_bytes()
    fresh = tmp_path / "fresh"
    text = _run(capfd, "log", "import", str(out), "--data", str(fresh), "-o", "json")
    head = SQLiteEventStore(data / "ledger.db", read_only=True).head()
    assert json.loads(text)["head_hash"] == head.hash
    # The same answers from the export as from the data directory.
    a = _run(capfd, "replay", "state", "-o", "json", "--data", str(data))
    b = _run(capfd, "replay", "state", "-o", "json", "--from-export", str(out))
    assert a == b
    partial = _run(capfd, "log", "export", "--from", "3", "--to", "5", "--data", str(data))
    assert [json.loads(x)["seq"] for x in partial.splitlines()] == [4, 5]


def test_a_tampered_export_is_refused_and_leaves_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    lines = (ROOT / "incident-key-expiry" / "events.jsonl").read_bytes().splitlines()
    row = msgspec.json.decode(lines[4])
    row["data"]["expiry"] = None  # hide the expiry
    lines[4] = msgspec.json.encode(row)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["log", "import", str(bad), "--data", str(tmp_path / "new")]) == 1
    assert "event 5" in capfd.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["replay", "state", "--from-export", str(bad)]) == 1
    assert "event 5" in capfd.readouterr().err


def test_reason_and_correlation_are_cited_and_survive_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from eventlog import Actor, ActorKind, AppendRequest
    from eventlog.events import NodeTagsSet

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "data"
    _run(capfd, "log", "import", str(ROOT / "incident-tag-opens-ssh" / "events.jsonl"), "--data", str(folder))
    store = SQLiteEventStore(folder / "ledger.db")
    head = store.head()
    store.append_batch(
        [AppendRequest(events=(NodeTagsSet(node_id=1, tags=()),), actor=Actor(kind=ActorKind.ADMIN, id="dave"),
                       expected_seq=head.seq, correlation_id="req-42", reason="INC-7: jump host untagged")],
        head.recorded_at_us + 60_000_000,
    )
    store.close()
    diff = json.loads(_run(capfd, "replay", "diff", "--from", "5", "-o", "json", "--data", str(folder)))
    [node] = diff["nodes"]
    assert node["node"] == "laptop" and node["changes"] == ["retagged ['tag:jump'] -> []"]
    [cause] = node["events"]
    assert cause["actor"] == "admin:dave" and cause["reason"] == "INC-7: jump host untagged"
    assert cause["correlation_id"] == "req-42"
    [lost] = diff["reach_lost"]
    assert (lost["src"], lost["dst"], lost["ports"]) == ("laptop", "prod-1", "22")
    assert lost["events"][-1]["reason"] == "INC-7: jump host untagged"
    reach = json.loads(_run(capfd, "replay", "reach", "laptop", "prod-1", "--port", "22", "-o", "json", "--data", str(folder)))
    assert reach["intervals"][-1]["to"]["reason"] == "INC-7: jump host untagged"
    out = tmp_path / "export.jsonl"
    _run(capfd, "log", "export", "-f", str(out), "--data", str(folder))
    text = _run(capfd, "log", "import", str(out), "--data", str(tmp_path / "copy"), "-o", "json")
    assert json.loads(text)["head_hash"] == SQLiteEventStore(folder / "ledger.db", read_only=True).head().hash


def test_a_log_from_before_the_envelope_columns_is_read_without_migrating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    from eventlog.export import open_lines, read_export
    from eventlog.migrations import create_events

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "old"
    folder.mkdir()
    conn = sqlite3.connect(folder / "ledger.db")
    import sqlite_utils

    create_events(sqlite_utils.Database(conn))  # migration 0001 only: no correlation_id, reason
    rows = list(read_export(open_lines(ROOT / "policy-routes" / "events.jsonl")))
    conn.executemany(
        "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(r.seq, r.recorded_at_us, r.actor_kind, r.actor_id, r.type, r.schema, r.data, r.prev_hash, r.hash) for r in rows],
    )
    conn.commit()
    conn.close()
    before = _fingerprint(folder)
    state = json.loads(_run(capfd, "replay", "state", "-o", "json", "--data", str(folder)))
    assert [n["name"] for n in state["nodes"]] == ["laptop", "www", "router", "bobs-box"]
    # A node deleted before the end is still named by its old name.
    reach = json.loads(_run(capfd, "replay", "reach", "temp", "laptop", "-o", "json", "--data", str(folder)))
    assert reach["src"] == "temp" and reach["intervals"][0]["to"]["type"] == "policy.set"
    assert _fingerprint(folder) == before


def test_the_progress_bar_draws_only_on_a_terminal(capfd: pytest.CaptureFixture[str]) -> None:
    from cli.replaycmd import Progress

    quiet = Progress("folding")  # stderr is not a terminal under pytest
    quiet(5, 10)
    quiet(10, 10)
    quiet.done()
    assert capfd.readouterr().err == ""
    shown = Progress("folding", enabled=True)
    shown(10, 10)
    shown.done()
    err = capfd.readouterr().err
    assert "folding [" in err and "100.0%" in err and err.endswith("\n")


def test_replay_netmap_is_the_servers_full_map_with_the_configured_domain(
    data: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from eventlog.export import import_export
    from projections.netmap import NetmapSettings
    from projections.replay import History, netmap_bytes
    from projections.tailcfg import DERPMap

    monkeypatch.setenv("TAILLEDGER_DNS__BASE_DOMAIN", "corp.example")
    got = json.loads(_run(capfd, "replay", "netmap", "laptop", "--at", "8", "-o", "json", "--data", str(data)))
    store = SQLiteEventStore(":memory:")
    import_export(ROOT / "incident-subnet-route" / "events.jsonl", store)
    history = History(store)
    point = history.point_at_seq(8)
    settings = NetmapSettings(domain="corp.example", derp_map=DERPMap(regions={}))
    want = json.loads(netmap_bytes(history.state_at(8), 1, point.now, settings))
    assert got["Node"]["Name"] == "laptop.corp.example."
    assert got["Peers"] == want["Peers"] and got["PacketFilters"] == want["PacketFilters"]
    assert got["Node"] == want["Node"]


def test_policy_impact_asks_the_running_server_and_appends_nothing(tmp_path: Path) -> None:
    """An operator on the admin socket gets the impact from the live tailnet (no read
    access to the data directory needed); nothing is appended."""
    from .server_process import running_server

    policy = tmp_path / "p.hujson"
    policy.write_text('{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["alice@:22"]}]}')
    with running_server(tmp_path / "data") as server:
        server.cli("users", "create", "alice", check=True)
        head = SQLiteEventStore(server.data / "ledger.db", read_only=True).head().seq
        for argv in (("policy", "impact", str(policy)), ("policy", "set", "--dry-run", str(policy))):
            out = json.loads(server.cli(*argv, "-o", "json", check=True).stdout)
            assert out == {"at_seq": head, "pairs_gained": [], "pairs_lost": [], "netmaps_changed": []}
        bad = tmp_path / "bad.hujson"
        bad.write_text('{"acls": [{"action": "accept", "src": ["group:nobody"], "dst": ["*:*"]}]}')
        refused = server.cli("policy", "impact", str(bad))
        assert refused.returncode == 1 and "group:nobody" in refused.stderr
        assert SQLiteEventStore(server.data / "ledger.db", read_only=True).head().seq == head
        # policy set records the summary with its event.
        out = json.loads(server.cli("policy", "set", str(policy), "-o", "json", check=True).stdout)
        assert out["impact"]["against_seq"] == head and out["impact"]["pairs_gained"] == 0
        shown = json.loads(server.cli("log", "show", "--type", "policy.", "-o", "json", check=True).stdout)
        assert shown[-1]["event"]["impact"]["against_seq"] == head


def test_reach_help_gives_each_bound_one_default(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["replay", "reach", "--help"])
    text = " ".join(capfd.readouterr().out.split())
    assert "--from FROM_ a sequence number or an RFC 3339 time (default: the first event) --to" in text
    assert "--to TO a sequence number or an RFC 3339 time (default: the head)" in text


def test_a_cache_dir_inside_the_data_directory_is_refused(data: Path, capfd: pytest.CaptureFixture[str]) -> None:
    before = _fingerprint(data)
    code = main(["replay", "state", "--cache-dir", str(data / "cache"), "--data", str(data)])
    assert code == 1
    assert "--cache-dir" in capfd.readouterr().err
    assert _fingerprint(data) == before and {p.name for p in data.iterdir()} == {"ledger.db"}


def test_who_can_reach_cites_the_event_that_set_its_rules(data: Path, capfd: pytest.CaptureFixture[str]) -> None:
    table = _run(capfd, "replay", "who-can-reach", "10.30.0.7:22", "--at", "8", "--data", str(data))
    assert "laptop" in table
    assert "Policy in force: set by #6 2026-01-01T00:01:05Z policy.set by admin:carol" in table


def _append(folder: Path, *events: object, actor: str, reason: str) -> None:
    from eventlog import Actor, ActorKind, AppendRequest

    store = SQLiteEventStore(folder / "ledger.db")
    head = store.head()
    store.append_batch(
        [AppendRequest(events=events, actor=Actor(kind=ActorKind.ADMIN, id=actor),  # type: ignore[arg-type]
                       expected_seq=head.seq, reason=reason)],
        head.recorded_at_us + 60_000_000,
    )
    store.close()


def test_state_rows_cite_the_event_that_last_changed_them(data: Path, capfd: pytest.CaptureFixture[str]) -> None:
    d = ("--data", str(data))
    at8 = json.loads(_run(capfd, "replay", "state", "--at", "8", "-o", "json", *d))
    nodes = {n["name"]: n["last_change"] for n in at8["nodes"]}
    assert nodes["router"] == {"seq": 8, "time": nodes["router"]["time"], "type": "node.routes_approved",
                               "actor": "admin:carol"}
    assert (nodes["laptop"]["seq"], nodes["laptop"]["type"]) == (3, "node.registered")
    assert [(u["name"], u["last_change"]["seq"], u["last_change"]["type"]) for u in at8["users"]] == [
        ("alice", 1, "user.created"), ("bob", 2, "user.created")]
    # At 7 the router's last change is its own advertisement; the answer follows --at.
    at7 = json.loads(_run(capfd, "replay", "state", "--at", "7", "-o", "json", *d))
    router7 = next(n for n in at7["nodes"] if n["name"] == "router")["last_change"]
    assert (router7["seq"], router7["actor"]) == (7, "node:router")
    table = _run(capfd, "replay", "state", "--at", "8", *d)
    assert "Changed" in table
    router_row = next(line for line in table.splitlines() if " router " in f" {line} ")
    assert router_row.rstrip().endswith("#8 admin:carol")


def test_state_cites_the_actor_and_reason_of_a_later_change(data: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from eventlog.events import NodeTagsSet, UserRenamed

    _append(data, UserRenamed(user_id=2, name="robert"), NodeTagsSet(node_id=2, tags=("tag:lab",)),
            actor="dave", reason="INC-9: bob's box becomes a lab host")
    for _ in range(2):  # the second run reads the snapshot the first one cached
        state = json.loads(_run(capfd, "replay", "state", "-o", "json", "--data", str(data)))
        users = {u["name"]: u["last_change"] for u in state["users"]}
        nodes = {n["name"]: n["last_change"] for n in state["nodes"]}
        assert (users["robert"]["seq"], users["robert"]["type"]) == (10, "user.renamed")
        assert users["robert"]["reason"] == "INC-9: bob's box becomes a lab host"
        assert users["alice"]["seq"] == 1
        assert (nodes["bobs-box"]["seq"], nodes["bobs-box"]["type"], nodes["bobs-box"]["actor"]) == (
            11, "node.tags_set", "admin:dave")
        assert nodes["bobs-box"]["reason"] == "INC-9: bob's box becomes a lab host"
        assert nodes["router"]["seq"] == 9


def test_who_can_reach_json_cites_the_policy_and_the_sources_last_change(
    data: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    d = ("--data", str(data))
    who = json.loads(_run(capfd, "replay", "who-can-reach", "10.30.0.7:22", "--at", "8", "-o", "json", *d))
    assert set(who) == {"at_seq", "dst", "sources"}  # the keys, unchanged
    [source] = who["sources"]
    assert set(source) == {"node", "rule", "via", "policy", "last_change"}
    assert (source["policy"]["seq"], source["policy"]["type"], source["policy"]["actor"]) == (6, "policy.set", "admin:carol")
    assert (source["last_change"]["seq"], source["last_change"]["type"]) == (3, "node.registered")
    table = _run(capfd, "replay", "who-can-reach", "10.30.0.7:22", "--at", "8", *d)
    assert "Source changed" in table and "#3 admin:tester" in table


def test_replay_netmap_cites_its_events_outside_the_map(data: Path, capfd: pytest.CaptureFixture[str]) -> None:
    d = ("--data", str(data))
    plain = json.loads(_run(capfd, "replay", "netmap", "laptop", "--at", "8", "-o", "json", *d))
    assert "Peers" in plain and "cites" not in plain  # the MapResponse alone, as the server computes it
    cited = json.loads(_run(capfd, "replay", "netmap", "laptop", "--at", "8", "-o", "json", "--cite", *d))
    assert set(cited) == {"netmap", "cites"}
    assert cited["netmap"] == plain
    cites = cited["cites"]
    assert cites["at_seq"] == 8
    assert (cites["policy"]["seq"], cites["policy"]["actor"]) == (6, "admin:carol")
    assert cites["node"]["name"] == "laptop" and cites["node"]["last_change"]["seq"] == 3
    peers = {p["name"]: p["last_change"]["seq"] for p in cites["peers"]}
    assert sorted(peers) == sorted(p["Name"].split(".")[0] for p in plain["Peers"])
    assert peers["router"] == 8
    table = _run(capfd, "replay", "netmap", "laptop", "--at", "8", *d)
    assert "node last changed by #3 " in table
    assert "Policy in force: set by #6 " in table
    router_row = next(line for line in table.splitlines() if "router" in line and "10.30.0.0/24" in line)
    assert "#8 admin:carol" in router_row
