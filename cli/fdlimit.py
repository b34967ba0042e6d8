"""The open-file limit of a process that holds one socket per connected node.

Linux starts most processes with a soft ``RLIMIT_NOFILE`` of 1,024 and a hard limit
far above it. A Go server (Headscale, tailscaled) never notices: the Go runtime
raises its soft limit to the hard one at start. A Python process keeps 1,024, so a
control server whose ``limits.max_connections`` is 10,000 would stop accepting at
about a thousand nodes, with ``EMFILE`` at accept and no word of why. So the server
raises its soft limit as far as its connection cap needs, within the hard limit, at
start, and warns when the hard limit is too low (it then serves as many as fit).

The limit is per process: the server and a load generator on the same host each
need one file per connection, not both together. Processes started afterwards
inherit it.
"""

from __future__ import annotations

import resource
from typing import Final

__all__ = ["FD_MARGIN", "raise_fd_limit"]

#: Files a process needs besides its sockets: the log, the admin socket, pipes, epoll.
FD_MARGIN: Final = 256


def raise_fd_limit(sockets: int, *, remedy: str = "or run fewer nodes") -> str | None:
    """Let this process hold ``sockets`` sockets plus :data:`FD_MARGIN` other files,
    by raising the soft ``RLIMIT_NOFILE`` as far as the hard limit allows (never
    lowering it).

    Returns:
        Why the limit cannot be raised that far (the hard limit is too low; ends with
        ``remedy``), or ``None`` when it now is high enough.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = sockets + FD_MARGIN
    if soft == resource.RLIM_INFINITY or soft >= want:
        return None
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        return (f"{sockets} connections need {want} open files per process, but the hard limit "
                f"(ulimit -Hn) is {hard}; raise it (e.g. `ulimit -Hn {want}` as root, or "
                f"LimitNOFILE= in a systemd unit) {remedy}")
    return None
