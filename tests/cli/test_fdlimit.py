"""The server raises its open-file limit to what its connection cap needs
(:mod:`cli.fdlimit`): a Python process starts with a soft limit of 1,024, which would
stop a 10,000-node server at about a thousand nodes."""

from __future__ import annotations

import re
from pathlib import Path

from cli.fdlimit import FD_MARGIN
from cli.spawn import free_port, spawn_serve, stop, wait_ready

from .server_process import serve_env


def _soft_nofile(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.MULTILINE)
    assert found, limits
    return int(found.group(1))


def _serve_with_limits(tmp_path: Path, name: str, soft: int, hard: int, cap: int) -> tuple[int, str]:
    """Start ``tailledger serve`` with ``limits.max_connections = cap`` under an
    open-file limit of ``soft:hard``; its soft limit once ready, and its log."""
    data = tmp_path / name
    env = serve_env(data, free_port(), {"TAILLEDGER_LIMITS__MAX_CONNECTIONS": str(cap)})
    log = tmp_path / f"{name}.log"
    proc = spawn_serve(env, log, prefix=("prlimit", f"--nofile={soft}:{hard}"))
    try:
        wait_ready(proc, log, timeout=60, admin_socket=data / "admin.sock")
        return _soft_nofile(proc.pid), log.read_text()
    finally:
        stop(proc, 10)


def test_the_server_raises_its_file_limit_to_what_its_connection_cap_needs(tmp_path: Path) -> None:
    soft, log = _serve_with_limits(tmp_path, "room", 300, 20_000, 5_000)
    assert soft == 5_000 + FD_MARGIN
    assert "open files" not in log


def test_a_hard_limit_below_the_cap_is_a_warning_and_the_server_serves_what_fits(tmp_path: Path) -> None:
    soft, log = _serve_with_limits(tmp_path, "tight", 300, 1_000, 5_000)
    assert soft == 1_000
    assert "5000 connections need 5256 open files per process, but the hard limit (ulimit -Hn) is 1000" in log
    assert "or lower limits.max_connections" in log
