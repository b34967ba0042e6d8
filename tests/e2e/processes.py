"""Long-running processes of an end-to-end test, with their logs.

Role: every server and client an e2e test starts (``tailledger serve``, Caddy
nodes, tailcat) is a `ManagedProcess`: started inside the test's network
namespace, its stdout and stderr captured to one log file under the test's
``tmp_path``, waited on by log line or port, and always stopped at teardown.

Invariants:

* A process is the leader of its own process group (``start_new_session``),
  so `ManagedProcess.stop` signals exactly what it started, children included.
* `ManagedProcess.stop` always ends with the process reaped: SIGTERM, a grace
  period, then SIGKILL.
* Waiting for a log line fails fast with `ProcessExitedError` when the process
  dies first, and with `LogWaitTimeout` otherwise; both carry the log's tail.
* With ``orphan_guard`` (the default when ``setpriv`` is available) the child
  gets ``PR_SET_PDEATHSIG=SIGKILL``, so even a SIGKILLed pytest leaves no
  servers behind. The death signal fires when the *thread* that forked the
  child exits, so start processes from the main thread (plain or trio tests
  both run there), not from ``trio.to_thread`` workers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from .netns import NetNamespace

__all__ = [
    "LogWaitTimeout",
    "ManagedProcess",
    "ProcessExitedError",
    "start_process",
]

#: How often waits poll the log file, in seconds.
POLL_INTERVAL = 0.05


class ProcessExitedError(RuntimeError):
    """A managed process exited while the test was waiting on it."""


class LogWaitTimeout(TimeoutError):
    """A log line did not appear in time."""


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


class ManagedProcess:
    """A process running inside the test namespace, logging to a file.

    Create with `start_process`. Attributes are read-only by convention.

    Attributes:
        name: Short label used in messages and the log file name.
        argv: The command as given (without the namespace prefix).
        log_path: Where stdout and stderr go (interleaved).
        popen: The underlying process.
    """

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, popen: subprocess.Popen[bytes]
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.popen = popen

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.returncode}>"

    @property
    def pid(self) -> int:
        """The process id (also its process-group id)."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once it has exited (negative: killed by that signal), else None."""
        return self.popen.poll()

    @property
    def running(self) -> bool:
        """Whether it has not exited yet."""
        return self.returncode is None

    def log_text(self) -> str:
        """The whole log so far."""
        return _read_text(self.log_path)

    def log_position(self) -> int:
        """The current end of the log, to pass as ``since=`` to a later wait."""
        return len(self.log_text())

    def tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _describe(self) -> str:
        return f"{self.name} (pid {self.pid}, exit {self.returncode}); log {self.log_path}; last lines:\n{self.tail()}"

    def _search(self, pattern: re.Pattern[str], since: int) -> re.Match[str] | None:
        return pattern.search(self.log_text(), since)

    def wait_for_log(
        self, pattern: str | re.Pattern[str], *, timeout: float = 30.0, since: int = 0
    ) -> re.Match[str]:
        """Block until `pattern` appears in the log.

        Args:
            pattern: A regular expression (``re.search`` semantics over the
                whole log text, so it may span lines with ``re.S``).
            timeout: Seconds to wait.
            since: Only look at log text from this offset
                (see `log_position`).

        Returns:
            The match, with offsets into the full log text.

        Raises:
            ProcessExitedError: The process exited without logging it.
            LogWaitTimeout: It did not appear within `timeout`.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.running
            if (match := self._search(regex, since)) is not None:
                return match
            if exited:
                raise ProcessExitedError(f"waiting for /{regex.pattern}/: {self._describe()}")
            if time.monotonic() > deadline:
                raise LogWaitTimeout(
                    f"/{regex.pattern}/ not logged after {timeout}s by {self._describe()}"
                )
            time.sleep(POLL_INTERVAL)

    async def wait_for_log_async(
        self, pattern: str | re.Pattern[str], *, since: int = 0
    ) -> re.Match[str]:
        """Async `wait_for_log`: wait until `pattern` appears in the log.

        Waits forever; bound it with ``trio.fail_after`` (a failing test's
        report carries the log tails anyway). Cancellable between polls.

        Raises:
            ProcessExitedError: The process exited without logging it.
        """
        regex = re.compile(pattern)
        while True:
            exited = not self.running
            if (match := self._search(regex, since)) is not None:
                return match
            if exited:
                raise ProcessExitedError(f"waiting for /{regex.pattern}/: {self._describe()}")
            await trio.sleep(POLL_INTERVAL)

    def wait_exit(self, *, timeout: float = 30.0) -> int:
        """Block until the process exits on its own.

        Returns:
            The exit status.

        Raises:
            subprocess.TimeoutExpired: If it is still running after `timeout`.
        """
        return self.popen.wait(timeout)

    def signal(self, sig: int) -> None:
        """Send `sig` to the process group (no-op once it has exited)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def stop(self, *, timeout: float = 10.0) -> int:
        """Stop the process: SIGTERM, then SIGKILL after `timeout` seconds.

        Idempotent; always reaps the process.

        Returns:
            The exit status (negative for a signal).
        """
        if self.running:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
        rc = self.popen.wait()
        # Children that escaped into their own group are the namespace's
        # problem (NetNamespace.close kills everything left inside).
        self.signal(signal.SIGKILL)
        return rc


def _orphan_guard_prefix() -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


def start_process(
    ns: NetNamespace,
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    orphan_guard: bool = True,
) -> ManagedProcess:
    """Start `argv` inside `ns`, logging stdout and stderr to ``log_dir/<name>.log``.

    Args:
        ns: The namespace to run in.
        name: Label; must be unique within `log_dir`.
        argv: Command and arguments.
        log_dir: Directory for the log file (created if needed).
        env: Complete environment (default: this process's environment).
        cwd: Working directory.
        orphan_guard: Kill the child if the starting thread dies (see module
            docstring). Ignored where ``setpriv`` is missing.

    Returns:
        The running process. Stdin is ``/dev/null``.

    Raises:
        FileExistsError: If a log for `name` already exists.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    prefix = _orphan_guard_prefix() if orphan_guard else []
    with log_path.open("xb") as log_file:
        popen = subprocess.Popen(
            ns.command([*prefix, *argv]),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return ManagedProcess(name, argv, log_path, popen)
