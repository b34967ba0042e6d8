"""Start ``tailledger`` as a child process that runs this checkout's code.

The load generator, the benchmarks and the tests start real ``tailledger serve``
processes (and run one-shot commands against them); this module is the one way they
do it.

Theory of operation
-------------------
A child runs the console script ``tailledger`` that ``pip install`` put in the
scripts directory of this interpreter's environment (``sysconfig``), the way an
operator runs it, never ``python -m cli``. The console script imports ``cli.main``
from wherever ``sys.path`` finds it first, and the package may be installed editable
from another checkout (a worktree's tests would then start the other checkout's
server). So the child's ``PYTHONPATH`` begins with :data:`ROOT`, the checkout this
module was imported from: ``PYTHONPATH`` entries come before site-packages and the
editable install's ``.pth`` entry, so the child imports exactly its parent's code.
Every other variable is passed through as the caller gives it.

:func:`spawn_serve` starts ``tailledger serve`` with its output appended to a log
file and returns at once; :func:`wait_ready` blocks until it listens (control port,
admin socket or both) and, if it exits or takes too long, raises with the log's
tail; :func:`stop` ends it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sysconfig
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

__all__ = ["ROOT", "child_env", "free_port", "spawn_serve", "stop", "tailledger_argv", "wait_ready"]

#: The checkout (or installed tree) this code runs from: its children import it too.
ROOT: Final = Path(__file__).resolve().parents[1]

#: How much of a failed server's log goes into the error.
_LOG_TAIL: Final = 4000


def tailledger_argv(*args: str) -> list[str]:
    """``tailledger ARGS`` as an argv: the console script of this environment.

    Raises:
        FileNotFoundError: the package is not installed (``pip install -e .``), so
            there is no console script.
    """
    script = Path(sysconfig.get_path("scripts")) / "tailledger"
    if not script.is_file():
        raise FileNotFoundError(f"no console script {script}: install the package (pip install -e .)")
    return [str(script), *args]


def child_env(env: Mapping[str, str] | None = None, *, root: Path = ROOT) -> dict[str, str]:
    """``env`` (default: this process's environment) with ``root`` first on ``PYTHONPATH``
    (once: an environment made by this function comes back unchanged)."""
    out = dict(os.environ if env is None else env)
    rest = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(root)]
    out["PYTHONPATH"] = os.pathsep.join([str(root), *rest])
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn_serve(
    env: Mapping[str, str],
    log: Path,
    *,
    args: Sequence[str] = (),
    prefix: Sequence[str] = (),
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``[PREFIX...] tailledger serve [ARGS...]`` and return at once.

    Args:
        env: the server's environment (its configuration is ``TAILLEDGER_*``);
            :data:`ROOT` is put first on its ``PYTHONPATH``.
        log: the server's stdout and stderr are *appended* here, so that a restarted
            server keeps one history.
        args: options after ``serve``.
        prefix: an argv to run it under (``nsenter --mount=...``).
        cwd: its working directory (default: this process's).
    """
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*prefix, *tailledger_argv("serve", *args)],
            env=child_env(env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
        )


def wait_ready(
    proc: subprocess.Popen[bytes],
    log: Path,
    *,
    timeout: float,
    port: int | None = None,
    admin_socket: Path | None = None,
) -> None:
    """Block until the server accepts connections on ``port`` (127.0.0.1) and its
    ``admin_socket`` exists (whichever are given).

    Raises:
        RuntimeError: the server exited or was not ready within ``timeout`` seconds;
            the message ends with the tail of ``log``.
    """
    deadline = time.monotonic() + timeout
    while True:
        if (admin_socket is None or admin_socket.exists()) and (port is None or _accepts(port)):
            return
        exited = proc.poll()
        if exited is not None or time.monotonic() > deadline:
            why = f"exited with status {exited}" if exited is not None else f"not ready within {timeout:g} s"
            tail = log.read_text(errors="replace")[-_LOG_TAIL:] if log.exists() else ""
            raise RuntimeError(f"tailledger serve {why} (log {log}):\n{tail}")
        time.sleep(0.05)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> int:
    """SIGTERM, and SIGKILL if it has not exited after ``grace`` seconds; reap it and
    return its exit status (blocking; nothing happens to a process that has exited)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
