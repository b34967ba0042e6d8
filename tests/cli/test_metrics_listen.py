"""``/metrics`` is served on ``metrics_listen_addr`` (by default on localhost), never on
the public control port; a taken default costs only the metrics, a taken explicit
address stops the server with why."""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cli.config import DEFAULT_METRICS_LISTEN_ADDR, ConfigError, load_config
from cli.spawn import child_env, tailledger_argv
from tests.support.waits import wait_until_sync

from .server_process import RunningServer, free_port, running_server


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _metrics_port(server: RunningServer) -> int:
    match = wait_until_sync(
        lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.log_text()),
        what="the metrics address in the log", detail=server.log_text,
    )
    return int(match.group(1))


@contextmanager
def _held(port: int) -> Iterator[None]:
    """Keep ``127.0.0.1:port`` taken (by us, or already by someone else)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            pass  # taken already, which is all we need
        yield


def test_metrics_on_their_own_address_and_not_on_the_control_port(tmp_path: Path) -> None:
    metrics = free_port()
    env = {"TAILLEDGER_METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics}"}
    with running_server(tmp_path / "data", extra_env=env) as server:
        assert _metrics_port(server) == metrics
        status, body = _get(metrics, "/metrics")
        assert status == 200 and "tailledger_log_head_seq" in body
        assert _get(server.port, "/metrics")[0] == 404
        assert _get(server.port, "/health")[0] == 200
        assert _get(metrics, "/health")[0] == 404


def test_the_default_is_localhost() -> None:
    config = load_config(None, {})
    assert config.metrics_listen_addr == DEFAULT_METRICS_LISTEN_ADDR == "127.0.0.1:9090"


def test_metrics_on_the_control_port_is_refused() -> None:
    env = {"TAILLEDGER_LISTEN_ADDR": "0.0.0.0:8080", "TAILLEDGER_METRICS_LISTEN_ADDR": "0.0.0.0:8080"}
    with pytest.raises(ConfigError, match="must differ from listen_addr"):
        load_config(None, env)


def test_a_taken_default_address_costs_only_the_metrics(tmp_path: Path) -> None:
    with _held(9090):
        env = {"TAILLEDGER_METRICS_LISTEN_ADDR": DEFAULT_METRICS_LISTEN_ADDR}
        with running_server(tmp_path / "data", extra_env=env) as server:
            assert server.cli("users", "list").returncode == 0
            wait_until_sync(
                lambda: "metrics NOT served" in server.log_text(), what="the warning", detail=server.log_text
            )


def test_a_taken_explicit_address_stops_the_server_with_why(tmp_path: Path) -> None:
    port = free_port()
    with _held(port):
        env = {
            "TAILLEDGER_DATA": str(tmp_path / "data"),
            "TAILLEDGER_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
            "TAILLEDGER_METRICS_LISTEN_ADDR": f"127.0.0.1:{port}",
            "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(tmp_path / "signing.key"),
            "PATH": "/usr/bin:/bin",
        }
        result = subprocess.run(tailledger_argv("serve"), env=child_env(env), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"metrics_listen_addr: cannot listen on 127.0.0.1:{port}" in result.stderr
