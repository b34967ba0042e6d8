"""A real ``tailledger serve`` process for CLI tests (started by :mod:`cli.spawn`)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cli.spawn import child_env, spawn_serve, stop, tailledger_argv, wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RunningServer:
    data: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra_env: dict[str, str] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TAILLEDGER_DATA": str(self.data),
            "TAILLEDGER_LISTEN_ADDR": f"127.0.0.1:{self.port}",
            "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(self.data.parent / f"{self.data.name}-signing.key"),
            **(self.extra_env or {}),
        }

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            tailledger_argv(*args), env=child_env(self.env), capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise AssertionError(f"tailledger {' '.join(args)} failed: {result.stderr}")
        return result

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def serve_env(data: Path, port: int, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "TAILLEDGER_DATA": str(data),
        "TAILLEDGER_LISTEN_ADDR": f"127.0.0.1:{port}",
        # Each test server its own metrics port (the default 9090 is shared by all).
        "TAILLEDGER_METRICS_LISTEN_ADDR": "127.0.0.1:0",
        # The signing key lives outside the data directory (never /etc in tests).
        "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(data.parent / f"{data.name}-signing.key"),
        **(extra_env or {}),
    }


@contextmanager
def running_server(
    data: Path, *, extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> Iterator[RunningServer]:
    port = free_port()
    data.mkdir(parents=True, exist_ok=True)
    log_path = data.parent / f"{data.name}-serve.log"
    env = serve_env(data, port, extra_env)
    log_path.unlink(missing_ok=True)  # one server's output per file
    proc = spawn_serve(env, log_path, args=args)
    server = RunningServer(data, port, proc, log_path, extra_env)
    try:
        wait_ready(proc, log_path, timeout=30, admin_socket=Path(env.get("TAILLEDGER_ADMIN_SOCKET") or data / "admin.sock"))
        yield server
    finally:
        stop(proc, 10)
