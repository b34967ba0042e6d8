"""Signed checkpoints end to end: a real server signs, the CLI verifies, the server
refuses a tampered log, and a forged projection checkpoint is not trusted."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import trio

from cli.spawn import child_env, tailledger_argv
from eventlog import GENESIS_HASH, StoredRow
from eventlog.signing import parse_anchor
from tests.support.waits import wait_until_sync

from .server_process import free_port, running_server, serve_env
from .test_node_commands import _register


def _cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=serve_env(data, 0), capture_output=True, text=True, timeout=60
    )


def _rehash_everything(db: Path, edit_seq: int) -> None:
    """The attack of issue 13: drop the triggers, edit an event, recompute every hash."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER events_no_update")
    conn.execute(
        "UPDATE events SET data = replace(data, '\"ops\"', '\"mal\"') WHERE seq = ?", (edit_seq,)
    )
    prev = GENESIS_HASH
    for r in conn.execute(
        "SELECT seq, recorded_at_us, actor_kind, actor_id, type, schema, data, correlation_id, reason "
        "FROM events ORDER BY seq"
    ).fetchall():
        data = r[6] if isinstance(r[6], bytes) else str(r[6]).encode()
        new = StoredRow(r[0], r[1], r[2], r[3], r[4], r[5], data, prev, "", r[7], r[8]).computed_hash()
        conn.execute("UPDATE events SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, new, r[0]))
        prev = new
    conn.close()


def test_sign_verify_tamper_refuse_and_override(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_server(data) as server:
        server.cli("users", "create", "ops", "--reason", "first operator", check=True)
        server.cli("users", "create", "dev", check=True)
        line = server.cli("log", "checkpoint", check=True).stdout.strip()
        anchor = parse_anchor(line)
        assert anchor.seq == 2 and anchor.n == 1
        assert server.cli("log", "pubkey", check=True).stdout.strip() == anchor.public_key
        assert server.cli("log", "anchor", check=True).stdout.strip() == line
        server.cli("users", "create", "qa", check=True)
    # Shut down: the head (seq 3) was signed too; the data directory is private.
    assert data.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o077 == 0 for p in data.iterdir() if p.is_file())
    key = tmp_path / "data-signing.key"
    assert key.stat().st_mode & 0o777 == 0o600
    ok = _cli(data, "log", "verify", "-o", "json")
    report = json.loads(ok.stdout)
    assert ok.returncode == 0 and report["ok"] and report["signed_checkpoints"] == 2
    assert report["latest_signed_seq"] == 3 and report["signatures_checked"]
    kept = tmp_path / "anchors.txt"
    kept.write_text("# kept in the ticket\n" + line + "\n")

    _rehash_everything(data / "ledger.db", edit_seq=1)
    bad = _cli(data, "log", "verify", "--anchor", str(kept))
    assert bad.returncode == 1
    assert "BROKEN at event 1" in bad.stdout and "re-hashed" in bad.stdout

    # The server refuses to serve, naming the sequence number …
    refused = subprocess.run(
        tailledger_argv("serve"), env=child_env(serve_env(data, free_port())),
        capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode == 1
    assert "refusing to serve: the event log fails verification at seq 1" in refused.stderr

    # … unless told to start anyway, which is itself recorded.
    with running_server(data, args=("--ignore-chain-errors",)) as server:
        events = json.loads(server.cli("log", "show", "-o", "json", "--after", "3", check=True).stdout)
        [ignored] = events
        assert ignored["type"] == "log.chain_errors_ignored"
        assert ignored["actor"].startswith("admin:")  # the account that started it
        assert ignored["event"]["first_bad"] == 1
        assert ignored["reason"] == "serve --ignore-chain-errors"


def test_a_forged_projection_checkpoint_is_discarded(tmp_path: Path) -> None:
    from msgspec.structs import replace

    from projections.checkpoint import decode_state, encode_state

    data = tmp_path / "data"
    with running_server(data) as server:
        server.cli("users", "create", "ops", check=True)
        server.cli("preauthkeys", "create", "-u", "ops", check=True)
    conn = sqlite3.connect(data / "checkpoints.db", isolation_level=None)
    [blob] = conn.execute("SELECT state FROM checkpoints WHERE name = 'tailnet'").fetchone()
    state = decode_state(blob)
    [key] = state.preauth_keys.values()
    planted = replace(key, id=99, prefix="planted", reusable=True, expires_at=None)
    forged = replace(state, preauth_keys=state.preauth_keys.set(99, planted))
    conn.execute("UPDATE checkpoints SET state = ? WHERE name = 'tailnet'", (encode_state(forged),))
    conn.close()
    with running_server(data) as server:
        keys = json.loads(server.cli("preauthkeys", "list", "-o", "json", check=True).stdout)
        assert [k["prefix"] for k in keys] == [key.prefix]
    assert "fails its MAC" in server.log_text()


def test_two_logs_can_share_one_signing_key(tmp_path: Path) -> None:
    """Each log keeps its own anchor beside the shared key: neither blames the other."""
    env = {"TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(tmp_path / "shared.key")}
    for name in ("a", "b", "a"):
        with running_server(tmp_path / name, extra_env=env) as server:
            server.cli("users", "create", f"user-{name}-{server.port}", check=True)
        assert "refusing" not in server.log_text()
    anchors = sorted(p.name for p in tmp_path.glob("shared.key.*.anchor"))
    assert len(anchors) == 2
    for name in ("a", "b"):
        assert json.loads(_cli_with(tmp_path / name, env, "log", "verify", "-o", "json").stdout)["ok"]


def _cli_with(data: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=serve_env(data, 0, env), capture_output=True, text=True, timeout=60
    )


def _run_relay(data: Path, relay_data: Path, log: Path) -> None:
    """Start ``tailledger relay`` on the log of `data`, wait until it serves, stop it."""
    derp, stun = free_port(), free_port()
    env = {
        **serve_env(relay_data, 0),
        "TAILLEDGER_DATABASE__PATH": str(data / "ledger.db"),
        "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(data.parent / f"{data.name}-signing.key"),
        "TAILLEDGER_DERP__SERVER__LISTEN_ADDR": f"127.0.0.1:{derp}",
        "TAILLEDGER_DERP__SERVER__STUN_LISTEN_ADDR": f"127.0.0.1:{stun}",
        "TAILLEDGER_DERP__SERVER__TLS": "false",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "relay"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_sync(
            lambda: "DERP map for this relay" in log.read_text(), what="the relay to start",
            process=proc, detail=log.read_text,
        )
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_forged_relay_checkpoint_is_discarded_and_its_data_directory_is_private(tmp_path: Path) -> None:
    """The relay's checkpoint decides who may use DERP: a node planted in it is not trusted."""
    from msgspec.structs import replace

    from projections.checkpoint import decode_state, encode_state

    data, relay_data = tmp_path / "data", tmp_path / "relay-data"
    with running_server(data) as server:
        server.cli("users", "create", "ops", check=True)
        key = server.cli("preauthkeys", "create", "-u", "ops", check=True).stdout.strip()
        trio.run(_register, server, key, "box")
    _run_relay(data, relay_data, tmp_path / "relay-1.log")
    assert relay_data.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o077 == 0 for p in relay_data.iterdir() if p.is_file())

    db = relay_data / "relay-checkpoints.db"
    conn = sqlite3.connect(db, isolation_level=None)
    [blob] = conn.execute("SELECT state FROM checkpoints WHERE name = 'relay'").fetchone()
    state = decode_state(blob)
    [node] = state.nodes.values()
    planted = replace(node, id=99, node_key="ab" * 32, machine_key="cd" * 32, given_name="planted")
    conn.execute("UPDATE checkpoints SET state = ? WHERE name = 'relay'", (encode_state(replace(
        state, nodes=state.nodes.set(99, planted))),))
    conn.close()

    log = tmp_path / "relay-2.log"
    _run_relay(data, relay_data, log)
    assert "projection checkpoint 'relay' at seq" in log.read_text() and "fails its MAC" in log.read_text()
    conn = sqlite3.connect(db, isolation_level=None)
    [blob] = conn.execute("SELECT state FROM checkpoints WHERE name = 'relay'").fetchone()
    conn.close()
    assert [n.node_key for n in decode_state(blob).nodes.values()] == [node.node_key]  # refolded from the log
