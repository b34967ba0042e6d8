"""Policy from a file (``policy.mode = "file"``): load at start, reload on change or SIGHUP.

Every successful (re)load that changes the text appends ``policy.set`` with the full
text, ``source = "file"`` and the actor ``system:policy-file:<path>``. A file that does
not parse, validate or pass its own tests is refused with a logged error, and the policy
already in force stays in force.
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


async def load_policy_file(tailnet: Tailnet, path: Path) -> bool:
    """Load ``path`` into the log if it changed; return whether it is in force."""
    try:
        text = await trio.to_thread.run_sync(path.read_text)
    except OSError as exc:
        log.error("cannot read the policy file %s: %s; keeping the policy in force", path, exc.strerror)
        return False
    actor = Actor(kind=ActorKind.SYSTEM, id=f"policy-file:{path}")
    try:
        _, recorded = await tailnet.execute(lambda s: c.decide_set_policy(s, text, source="file"), actor=actor)
    except CommandError as exc:
        log.error("policy file %s refused: %s; keeping the policy in force", path, exc)
        return False
    if recorded:
        log.info("policy file %s loaded (seq %d)", path, recorded[-1].seq)
    return True


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

    await load_policy_file(tailnet, path)
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
