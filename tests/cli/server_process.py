"""A real ``tailledger serve`` process for CLI tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


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
            [sys.executable, "-m", "cli", *args], env=self.env, capture_output=True, text=True, timeout=60
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
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", *args], env=env, stdout=logf, stderr=subprocess.STDOUT
        )
    server = RunningServer(data, port, proc, log_path, extra_env)
    try:
        deadline = time.monotonic() + 30
        sock = Path(env.get("TAILLEDGER_ADMIN_SOCKET") or data / "admin.sock")
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{server.log_text()}")
            time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
