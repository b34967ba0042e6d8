"""A writer process for the crash test: appends forever, printing each acknowledged seq.

Run as ``python -m tests.eventlog._crash_writer PATH``. The parent kills it with SIGKILL
at a random moment and then checks that every printed seq is in the log.
"""

from __future__ import annotations

import sys

import trio

from eventlog import Actor, ActorKind, EventLog, SQLiteEventStore
from eventlog.events import PolicySet


async def main(path: str) -> None:
    log = EventLog(SQLiteEventStore(path))
    actor = Actor(kind=ActorKind.SYSTEM, id="crash-writer")
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)

        async def writer(w: int) -> None:
            i = 0
            while True:
                i += 1
                # Big-ish payloads make a torn write more likely if durability were wrong.
                text = f"writer {w} event {i} " + "x" * 4000
                recs = await log.append(
                    [PolicySet(text=text, sha256="0" * 64), PolicySet(text=text, sha256="1" * 64)],
                    actor=actor,
                )
                print(" ".join(str(r.seq) for r in recs), flush=True)

        for w in range(4):
            nursery.start_soon(writer, w)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
