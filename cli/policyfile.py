"""Policy from a file (``policy.mode = "file"``): load at start, reload on change or SIGHUP.

Every successful (re)load that changes the text appends ``policy.set`` with the full
text, ``source = "file"`` and the actor ``system:policy-file:<path>``. A file that does
not parse, validate or pass its own tests is refused with a logged error, and the policy
already in force (the last good one in the log) stays in force; at start-up that is a
loud warning, never a reason not to start.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import trio

from eventlog import Actor, ActorKind
from projections import CommandError, Tailnet
from projections import commands as c

__all__ = ["watch_policy_file"]

log = logging.getLogger("tailledger.policy")


async def load_policy_file(tailnet: Tailnet, path: Path, *, at_startup: bool = False) -> bool:
    """Load ``path`` into the log if it changed; return whether it is in force.

    Nothing here stops the server: a file that cannot be read or is refused, and any
    unexpected failure while checking it (logged with its traceback), leave the
    policy already in force -- the last good one from the log. At start-up that is
    said loudly, as a warning naming the policy kept.
    """
    try:
        text = await trio.to_thread.run_sync(path.read_text)
    except (OSError, UnicodeDecodeError) as exc:
        _refused(tailnet, path, f"cannot read it: {getattr(exc, 'strerror', None) or exc}", at_startup)
        return False
    actor = Actor(kind=ActorKind.SYSTEM, id=f"policy-file:{path}")
    try:
        _, recorded = await tailnet.execute(lambda s: c.decide_set_policy(s, text, source="file"), actor=actor)
    except CommandError as exc:
        _refused(tailnet, path, f"refused: {exc}", at_startup)
        return False
    except Exception:
        log.exception("checking the policy file %s failed", path)
        _refused(tailnet, path, "checking it failed (see the traceback above)", at_startup)
        return False
    if recorded:
        log.info("policy file %s loaded (seq %d)", path, recorded[-1].seq)
    return True


def _refused(tailnet: Tailnet, path: Path, why: str, at_startup: bool) -> None:
    """Log that the file is not in force, and which policy is."""
    state = tailnet.state
    if state.policy_text is None:
        kept = "no policy was ever set, so every node may reach every other (allow-all)"
    else:
        kept = f"the last good policy from the log stays in force (sha256 {str(state.policy_sha256)[:12]}…, source {state.policy_source})"
    if at_startup:
        log.warning("POLICY FILE NOT LOADED at start-up: %s %s; %s", path, why, kept)
    else:
        log.error("policy file %s %s; %s", path, why, kept)


async def watch_policy_file(
    tailnet: Tailnet, path: Path, *, interval: float = 2.0, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Load the file now, then again whenever it changes or the process gets SIGHUP."""

    def stamp() -> tuple[float, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    await load_policy_file(tailnet, path, at_startup=True)
    last = stamp()
    hup = trio.Event()
    task_status.started()
    async with trio.open_nursery() as nursery:

        async def on_sighup() -> None:
            nonlocal hup
            with trio.open_signal_receiver(signal.SIGHUP) as signals:
                async for _ in signals:
                    hup.set()

        nursery.start_soon(on_sighup)
        while True:
            with trio.move_on_after(interval):
                await hup.wait()
            forced = hup.is_set()
            hup = trio.Event()
            current = stamp()
            if forced or current != last:
                last = current
                await load_policy_file(tailnet, path)
