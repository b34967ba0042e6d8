"""Shared parts of the reliability suite: a real server process, an async admin client,
and the oracle that checks a log after a crash.

Role: the reliability tests (``test_kill9.py``, ``test_disk_full.py``) treat
``tailledger serve`` as a black box that may die at any moment. This module starts it
(optionally behind a command prefix such as ``nsenter``), talks to it over its admin
socket the way the CLI does, and, once it is dead, checks what it left on disk against
what it acknowledged:

* every acknowledged change has its event in the log (`signature` of both sides),
* the hash chain verifies (the ``tailledger log verify`` command itself, run in-process),
* every stored row decodes (no partial event),
* the saved checkpoint is valid against the log and equals a fresh fold from zero up to
  its sequence number, and checkpoint + tail equals the fold of the whole log.

Requirements for the namespace-based tests (root, util-linux) are checked by `require`:
outside CI a missing one skips, under ``CI=true`` it fails, so CI cannot go green by
skipping.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import trio

from cli.spawn import child_env, free_port, spawn_serve, tailledger_argv
from eventlog import RecordedEvent, SQLiteEventStore
from eventlog.signing import load_signing_key
from projections import CheckpointStore, TailnetState, fold
from tests.e2e.harness import in_ci
from tests.support.waits import wait_until

__all__ = [
    "LogCheck",
    "ServerProcess",
    "admin",
    "admin_rows",
    "check_log",
    "require",
    "signature",
    "signing_key_path",
    "start_server",
]


def require(*tools: str, root: bool = True) -> None:
    """Skip the test when the machine cannot run it, or fail it under ``CI=true``.

    Args:
        tools: executables that must be on PATH.
        root: whether the test needs root (mounts, namespaces).
    """
    missing = [f"`{t}` on PATH" for t in tools if shutil.which(t) is None]
    if root and os.geteuid() != 0:
        missing.append("root (to mount a filesystem in a private mount namespace)")
    if not missing:
        return
    message = "reliability test requirements missing: " + "; ".join(missing)
    if in_ci():
        pytest.fail(f"{message} (CI=true: reliability tests must not skip)", pytrace=False)
    pytest.skip(message)


def server_env(data: Path, admin_socket: Path, port: int) -> dict[str, str]:
    """The environment of a server (and of CLI commands aimed at it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILLEDGER_")}
    return {
        **child_env(env),
        "TAILLEDGER_DATA": str(data),
        "TAILLEDGER_ADMIN_SOCKET": str(admin_socket),
        "TAILLEDGER_LISTEN_ADDR": f"127.0.0.1:{port}",
        # The log's signing key lives outside the data directory.
        "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(signing_key_path(data)),
    }


@dataclass
class ServerProcess:
    """One ``tailledger serve`` process (it may already be dead)."""

    proc: subprocess.Popen[bytes]
    data: Path
    admin_socket: Path
    port: int
    log_path: Path
    prefix: tuple[str, ...]

    @property
    def env(self) -> dict[str, str]:
        return server_env(self.data, self.admin_socket, self.port)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, and reap."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait for a clean exit; return the exit status (SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``tailledger ARGS`` as its own process (behind the same prefix)."""
        return subprocess.run(
            [*self.prefix, *tailledger_argv(*args)], env=self.env, capture_output=True, text=True, timeout=60
        )


def start_server(
    data: Path,
    *,
    admin_socket: Path | None = None,
    log_path: Path | None = None,
    prefix: Sequence[str] = (),
    port: int | None = None,
) -> ServerProcess:
    """Spawn ``tailledger serve`` and return at once (see `wait_ready`).

    Args:
        data: the data directory.
        admin_socket: where the admin socket goes (default: in ``data``).
        log_path: the server's output is *appended* here, so restarts keep one history.
        prefix: argv prefix (``nsenter --mount=…``) to run the server under.
        port: the control port (default: a free one).
    """
    admin_socket = admin_socket or data / "admin.sock"
    log_path = log_path or data.parent / f"{data.name}-serve.log"
    port = port or free_port()
    # A socket left by a killed server would look like a ready one.
    admin_socket.unlink(missing_ok=True)
    proc = spawn_serve(server_env(data, admin_socket, port), log_path, prefix=prefix)
    return ServerProcess(proc, data, admin_socket, port, log_path, tuple(prefix))


async def wait_ready(server: ServerProcess, within: float = 60) -> None:
    """Wait until the admin socket answers and the control port accepts connections."""

    async def ready() -> bool:
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited ({server.proc.returncode}):\n{server.log_text()[-4000:]}")
        try:
            reply = await admin(server.admin_socket, "log.head", within=5)
            if reply.get("ok"):
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                await stream.aclose()
                return True
        except OSError:
            pass
        return False

    await wait_until(ready, what="the server to serve", seconds=within, detail=lambda: server.log_text()[-4000:])


async def admin(
    path: Path, op: str, args: dict[str, object] | None = None, *, within: float = 30
) -> dict[str, object]:
    """Send one admin request, as the CLI does; return the raw reply object.

    Raises:
        OSError: the server is not there or the connection broke (no answer: not
            acknowledged).
        trio.TooSlowError: no answer within ``within`` seconds (a hang).
    """
    with trio.fail_after(within):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(msgspec.json.encode({"op": op, "args": args or {}}) + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise ConnectionResetError("the server closed the connection without answering")
                buf += chunk
    reply = msgspec.json.decode(buf)
    assert isinstance(reply, dict), reply
    return reply


async def admin_rows(path: Path, op: str) -> list[dict[str, object]]:
    """A listing op's result (the op must succeed)."""
    reply = await admin(path, op)
    assert reply["ok"], reply
    rows = reply["result"]
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows), rows
    return rows


# -- the oracle ------------------------------------------------------------------------

#: The fields that identify an acknowledged change in its event (see `signature`).
SIGNATURE_FIELDS: dict[str, tuple[str, ...]] = {
    "user.created": ("user_id", "name"),
    "user.renamed": ("user_id", "name"),
    "preauthkey.created": ("key_id", "prefix"),
    "node.registered": ("machine_key",),
    "node.renamed": ("node_id", "given_name"),
    "node.tags_set": ("node_id", "tags"),
    "policy.set": ("sha256",),
}

Signature = tuple[object, ...]


def signature(type_: str, fields: dict[str, object], seq: int | None = None) -> Signature:
    """What an acknowledged change must find in the log: its type and identifying
    fields (lists as tuples), plus the sequence number when the answer named one."""
    values = tuple(
        tuple(v) if isinstance(v := fields[name], list) else v for name in SIGNATURE_FIELDS[type_]
    )
    return (type_, seq, *values)


def _event_signatures(rec: RecordedEvent) -> list[Signature]:
    if rec.type not in SIGNATURE_FIELDS:
        return []
    fields = msgspec.to_builtins(rec.event)
    assert isinstance(fields, dict)
    return [signature(rec.type, fields), signature(rec.type, fields, rec.seq)]


@dataclass(frozen=True)
class LogCheck:
    """What `check_log` found (it raises on any failure)."""

    head: int
    checkpoint_seq: int | None
    state: TailnetState


def signing_key_path(data: Path) -> Path:
    """Where a test server of data directory ``data`` keeps its log's signing key
    (outside the data directory, as ``audit.signing_key_file`` wants it)."""
    return data.parent / f"{data.name}-signing.key"


def _log_verify_command(data: Path, signing_key: Path | None) -> None:
    """``tailledger log verify`` on ``data``, run in-process (the same code as the
    command, without an interpreter start per trial).

    The signatures are checked with the public half of ``signing_key`` (the key the
    server signed with), never with whatever key this machine's default location holds.
    """
    from cli.main import main

    args = ["log", "verify", "--data", str(data)]
    if signing_key is None:
        signing_key = signing_key_path(data)
    if signing_key.exists():  # absent: the server never started, nothing was signed
        args += ["--pubkey", load_signing_key(signing_key).public_key]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(args)
    assert status == 0 and "chain intact" in out.getvalue(), f"tailledger log verify: {out.getvalue()}"


def check_log(data: Path, acked: Sequence[Signature], *, signing_key: Path | None = None) -> LogCheck:
    """Check a dead server's data directory; raise ``AssertionError`` on any loss.

    Args:
        data: the data directory (the server is not running).
        acked: the signatures of every change the server acknowledged.
        signing_key: the server's signing key file, whose public key the signed
            checkpoints must verify with (default: `signing_key_path` of ``data``;
            give it for a copy of a data directory).
    """
    _log_verify_command(data, signing_key)
    store = SQLiteEventStore(data / "ledger.db", read_only=True)
    try:
        events: list[RecordedEvent] = []
        while batch := store.read(events[-1].seq if events else 0, 5000):  # every row decodes
            events.extend(batch)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert store.verify().head_seq == len(events)

        found = {sig for rec in events for sig in _event_signatures(rec)}
        lost = [sig for sig in acked if sig not in found]
        assert not lost, f"{len(lost)} acknowledged change(s) lost, e.g. {lost[:5]}"

        full, _ = fold(TailnetState(), events)
        checkpoint_seq = None
        checkpoints = CheckpointStore(data / "checkpoints.db")
        try:
            saved = checkpoints.load("tailnet", store)
        finally:
            checkpoints.close()
        with contextlib.closing(sqlite3.connect(data / "checkpoints.db")) as conn:
            has_row = conn.execute("SELECT 1 FROM checkpoints WHERE name = 'tailnet'").fetchone() is not None
        # A checkpoint is written only after its events committed, so a valid log never
        # invalidates it: a rejected checkpoint would mean the log lost events.
        assert (saved is not None) == has_row, "the saved checkpoint no longer matches the log"
        if saved is not None:
            checkpoint_seq = saved.seq
            upto, _ = fold(TailnetState(), events[: saved.seq])
            assert saved == upto, f"checkpoint at seq {saved.seq} differs from a fresh fold"
            resumed, _ = fold(saved, events[saved.seq :])
            assert resumed == full, "checkpoint + tail differs from a fresh fold"
        return LogCheck(head=len(events), checkpoint_seq=checkpoint_seq, state=full)
    finally:
        store.close()
