"""Node-controlled text never reaches the operator's terminal raw: terminal escapes
and bidirectional overrides in a host name are shown as visible escapes in tables,
JSON and log lines (and are cleaned from host names on input)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from cli.output import print_json, render_table, terminal_safe
from eventlog import AppendRequest, SQLiteEventStore
from eventlog.events import NodeRegistered, UserCreated
from projections import commands as c
from tests.conftest import ADMIN

from .server_process import running_server

EVIL = "evil\x1b]0;owned\x07\x1b[2J\u202egnp.exe\x9b31m\x7f\u2028x"
RAW = ("\x1b", "\x07", "\u202e", "\x9b", "\x7f", "\u2028")


def test_terminal_safe_shows_escapes_and_keeps_ordinary_text() -> None:
    assert terminal_safe("caf\u00e9 \U0001f600 tag:web") == "caf\u00e9 \U0001f600 tag:web"
    assert terminal_safe("a\x1b[31mb\u202ec\x9b") == "a\\x1b[31mb\\u202ec\\x9b"
    table = render_table([{"host": EVIL, "tags": ["tag:a\x1b", "tag:b"]}], [("host", "Host"), ("tags", "Tags")])
    assert not any(ch in table for ch in RAW)
    assert "evil\\x1b]0;owned\\x07" in table and "tag:a\\x1b,tag:b" in table
    assert "\\u2028x" in table and table.count("\n") == 2


def test_json_output_escapes_but_keeps_the_value() -> None:
    out = io.StringIO()
    print_json({"hostname": EVIL, "emoji": "\U000e0041\U0001f600"}, out)
    assert not any(ch in out.getvalue() for ch in RAW)
    assert json.loads(out.getvalue()) == {"hostname": EVIL, "emoji": "\U000e0041\U0001f600"}


def test_host_names_are_cleaned_on_input() -> None:
    assert c.clean_hostname(EVIL) == "evil]0;owned[2Jgnp.exe31mx"


def test_nodes_list_and_log_show_of_an_old_log_with_escapes_in_a_host_name(tmp_path: Path) -> None:
    """A log written before host names were cleaned still prints safely."""
    data = tmp_path / "data"
    data.mkdir()
    store = SQLiteEventStore(data / "ledger.db")
    events = (
        UserCreated(user_id=1, name="alice", display_name="alice", email="", provider="local", provider_id=""),
        NodeRegistered(
            node_id=1, machine_key="ab" * 32, node_key="cd" * 32, user_id=1, hostname=EVIL, given_name="evil",
            ipv4="100.64.0.1", ipv6=None, os="linux\x1b[5m",
        ),
    )
    store.append_batch([AppendRequest(events=events, actor=ADMIN, expected_seq=0)], int(time.time() * 1e6))
    store.close()
    with running_server(data) as server:
        table = server.cli("nodes", "list", check=True).stdout
        assert "evil\\x1b]0;owned\\x07\\x1b[2J\\u202egnp.exe" in table
        listed = server.cli("nodes", "list", "-o", "json", check=True).stdout
        shown = server.cli("nodes", "show", "1", "-o", "json", check=True).stdout
        log = server.cli("log", "show", check=True).stdout
        log_json = server.cli("log", "show", "-o", "json", check=True).stdout
        for out in (table, listed, shown, log, log_json):
            assert not any(ch in out for ch in RAW), out
        assert json.loads(listed)[0]["hostname"] == EVIL
        assert json.loads(shown)["os"] == "linux\x1b[5m"
