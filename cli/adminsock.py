"""The local admin socket: how ``tailledger`` commands reach the running server.

A Unix stream socket in the data directory (mode 0600, like Headscale's CLI socket)
carries one JSON object per line each way::

    → {"op": "users.create", "args": {"name": "alice"}, "reason": "onboarding, OPS-12"}
    ← {"ok": true, "result": {...}}            or   {"ok": false, "error": "user 'alice' already exists"}

The server identifies the caller by the socket's peer credentials (``SO_PEERCRED``), so
every event an operator causes is recorded with ``admin:<unix user>`` as its actor;
nobody can claim to be someone else over this socket. With ``admin.socket_group`` the
socket is opened to that group (mode 0660) so that each operator uses their own account
and is named as such; the socket then lives outside the data directory, which is 0700.
Each request is one cause (:func:`eventlog.caused_by`): its events share a correlation
id and carry the request's ``reason``.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import struct
from pathlib import Path

import msgspec
import trio

from eventlog import Actor, ActorKind, caused_by, check_reason
from projections import CommandError
from projections.admin import AdminOps

__all__ = ["AdminError", "call", "serve_admin_socket"]

log = logging.getLogger(__name__)

_MAX_LINE = 1 << 20


class AdminError(Exception):
    """The server refused the operation (the message says why) or cannot be reached."""


class _Request(msgspec.Struct, forbid_unknown_fields=True):
    op: str
    args: dict[str, object] = msgspec.field(default_factory=dict)
    reason: str = ""


def _peer_actor(sock: trio.socket.SocketType) -> Actor:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid{uid}"
    except OSError:
        name = "unknown"
    return Actor(kind=ActorKind.ADMIN, id=name)


async def _handle(stream: trio.SocketStream, ops: AdminOps) -> None:
    """Serve one admin connection. Nothing that goes wrong here reaches the server:
    a failure ends this connection alone (logged with its traceback)."""
    async with stream:
        try:
            await _serve_connection(stream, ops)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("admin connection failed; closing it")


async def _serve_connection(stream: trio.SocketStream, ops: AdminOps) -> None:
    actor = _peer_actor(stream.socket)
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            reply = await _answer(line, ops, actor)
            await stream.send_all(_encode_reply(reply))
        if len(buf) > _MAX_LINE:
            await stream.send_all(b'{"ok":false,"error":"request too large"}\n')
            return


def _encode_reply(reply: dict[str, object]) -> bytes:
    """One reply line; a result that cannot be encoded becomes an error answer."""
    try:
        return msgspec.json.encode(reply) + b"\n"
    except (TypeError, ValueError, OverflowError, RecursionError, UnicodeError) as exc:
        log.error("cannot encode the answer to an admin request: %r", exc)
        return msgspec.json.encode({"ok": False, "error": f"internal error: cannot encode the answer ({exc})"}) + b"\n"


async def _answer(line: bytes, ops: AdminOps, actor: Actor) -> dict[str, object]:
    """The answer to one request line.

    A refused command answers its reason. Any other failure of the operation is a bug
    or an outage (the disk, the log): it is logged with its traceback and answered as
    an internal error, and the server goes on serving.
    """
    try:
        req = msgspec.json.decode(line, type=_Request)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return {"ok": False, "error": f"malformed request: {exc}"}
    except RecursionError:
        return {"ok": False, "error": "malformed request: nested too deeply"}
    try:
        reason = check_reason(req.reason)
    except ValueError as exc:  # a reason that cannot be stored
        return {"ok": False, "error": f"--reason: {exc}"}
    try:
        with caused_by(reason=reason):
            return {"ok": True, "result": await ops.dispatch(req.op, req.args, actor)}
    except CommandError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:
        log.exception("admin operation %r by %s failed", req.op[:100], actor.id)
        return {"ok": False, "error": f"internal error in {req.op[:100]!r}: {type(exc).__name__}: {exc}"[:2000]}


def group_id(name: str) -> int:
    """The id of the Unix group ``name`` (or a numeric id).

    Raises:
        ValueError: no such group.
    """
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isascii() and name.isdigit():
            return int(name)
        raise ValueError(f"no Unix group named {name!r}") from None


def _prepare(path: Path, gid: int | None) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        if gid is not None:  # our own directory: open it to the group (the umask is 077)
            os.chown(path.parent, -1, gid)
            os.chmod(path.parent, 0o750)
    path.unlink(missing_ok=True)  # a stale socket from a crashed server


async def serve_admin_socket(
    path: Path,
    ops: AdminOps,
    *,
    group: str = "",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``path`` until cancelled. A stale socket file is replaced.

    Args:
        group: a Unix group whose members may use the socket (mode 0660); empty for
            the server's own account only (0600).
    """
    gid = group_id(group) if group else None
    await trio.to_thread.run_sync(_prepare, path, gid)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    if gid is None:
        os.chmod(path, 0o600)
    else:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda s: _handle(s, ops), [listener])  # type: ignore[arg-type]
    finally:
        path.unlink(missing_ok=True)  # noqa: ASYNC240 - a cheap unlink during shutdown


def call(
    path: Path,
    op: str,
    args: dict[str, object] | None = None,
    *,
    reason: str = "",
    timeout: float = 60,
) -> object:
    """Run ``op`` on the server listening at ``path`` (blocking).

    ``reason`` is stored with every event the operation appends.

    Raises:
        AdminError: the server is not running, or it refused the operation.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            request: dict[str, object] = {"op": op, "args": args or {}}
            if reason:
                request["reason"] = reason
            sock.sendall(msgspec.json.encode(request) + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise AdminError("the server closed the connection")
                buf += chunk
    except FileNotFoundError:
        raise AdminError(
            f"no tailledger server is running here (no admin socket at {path}); start one with "
            "'tailledger serve' or pass --config/--data"
        ) from None
    except PermissionError:
        raise AdminError(
            f"permission denied on the admin socket {path}: run as the server's account, or "
            "as a member of its admin.socket_group"
        ) from None
    except ConnectionRefusedError:
        raise AdminError(f"the server at {path} is not accepting connections") from None
    except TimeoutError:
        raise AdminError("the server did not answer in time") from None
    reply = msgspec.json.decode(buf)
    if not isinstance(reply, dict):
        raise AdminError("malformed reply from the server")
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error", "unknown error")))
    return reply.get("result")
