"""Waiting for a server process's port."""

from __future__ import annotations

import trio


async def wait_until_serving(port: int) -> None:
    """Return once something accepts TCP connections on 127.0.0.1:``port`` (30 s at most).

    For a server in another process, which has no event to wait on: polling is the
    honest way.
    """
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.1)
                continue
            await stream.aclose()
            return
