"""Talking to a real server's admin socket byte for byte, as a hostile or buggy
client would (the CLI's :func:`cli.adminsock.call` only sends well-formed requests)."""

from __future__ import annotations

import contextlib
import json
import socket

from tests.cli.server_process import RunningServer

__all__ = ["assert_serving", "raw_request"]


def raw_request(server: RunningServer, line: bytes, *, timeout: float = 30) -> dict[str, object]:
    """Send ``line`` (a newline is added) and return the decoded one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(server.data / "admin.sock"))
        # It may answer and hang up before reading everything (a line too large).
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(line + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"the server closed the connection without answering {line[:80]!r}")
            buf += chunk
    answer = json.loads(buf)
    assert isinstance(answer, dict), answer
    assert isinstance(answer.get("ok"), bool), answer
    return answer


def assert_serving(server: RunningServer) -> None:
    """The server process is alive and still answers admin requests."""
    assert server.proc.poll() is None, f"the server exited:\n{server.log_text()[-3000:]}"
    answer = raw_request(server, b'{"op": "users.list"}')
    assert answer["ok"] is True, answer
