"""A small filesystem that only the test's processes see.

`open_small_disk` starts a *holder* process in a new, private mount namespace
(``unshare --mount``, propagation private) that mounts a size-limited tmpfs on a
directory and then sleeps. The mount exists only in that namespace: the host's view
of the directory stays an empty folder, and the mount disappears with the namespace
when the holder and everything that joined it are gone. The holder runs under
``setpriv --pdeathsig KILL``, so even a SIGKILLed pytest leaves nothing behind.

Processes join the namespace with `SmallDisk.command` (``nsenter --mount=…``); the
test itself reaches the files through ``/proc/<holder>/root`` (`SmallDisk.host_path`),
which resolves paths in the holder's mount namespace (SQLite cannot open files
through it: check a `SmallDisk.snapshot` instead). tmpfs is the right kind of small
disk here: unlike ext4 it keeps no blocks in reserve for root, so a server running as
root sees the disk full exactly when it is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SmallDisk", "open_small_disk"]


@dataclass
class SmallDisk:
    """A tmpfs of ``size`` bytes mounted on ``mountpoint`` in a private namespace."""

    holder: subprocess.Popen[str]
    mountpoint: Path
    size: int

    @property
    def namespace(self) -> str:
        return f"/proc/{self.holder.pid}/ns/mnt"

    def command(self) -> list[str]:
        """The argv prefix that runs a command inside the namespace."""
        return ["nsenter", f"--mount={self.namespace}", "--"]

    def host_path(self, path: Path) -> Path:
        """``path`` (absolute, as seen inside the namespace) as the test reaches it."""
        return Path(f"/proc/{self.holder.pid}/root") / path.relative_to("/")

    @property
    def filler(self) -> Path:
        return self.host_path(self.mountpoint / "filler")

    def snapshot(self, path: Path, to: Path) -> Path:
        """Copy the directory ``path`` (as seen inside) to ``to`` on the host; return ``to``.

        SQLite cannot open a database through ``/proc/<pid>/root``: it resolves the
        magic link as a plain symlink, to ``/`` of the *caller's* namespace. A copy
        taken while no process writes is a faithful image of the directory.
        """
        shutil.copytree(self.host_path(path), to)
        return to

    def free_bytes(self) -> int:
        st = os.statvfs(self.host_path(self.mountpoint))
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Take the free space, up to ``leave`` bytes (rounded to pages), with a filler file."""
        with open(self.filler, "ab", buffering=0) as f:
            while (free := self.free_bytes()) > leave:
                try:
                    f.write(b"\0" * min(free - leave, 1 << 20))
                except OSError:
                    if self.free_bytes() == 0:
                        return
                    raise

    def free(self) -> None:
        """Give the filler's space back."""
        self.filler.unlink(missing_ok=True)


@contextlib.contextmanager
def open_small_disk(mountpoint: Path, size: int) -> Iterator[SmallDisk]:
    """Mount a ``size``-byte tmpfs on ``mountpoint`` in a private mount namespace.

    Requires root, ``setpriv``, ``unshare`` and ``nsenter`` (util-linux).
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o "size=$1,mode=0755" tailledger-test "$0" && echo mounted && exec sleep infinity'
    holder = subprocess.Popen(
        ["setpriv", "--pdeathsig", "KILL", "--",
         "unshare", "--mount", "--propagation", "private", "--",
         "sh", "-c", script, str(mountpoint), str(size)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if line.strip() != "mounted":
            raise RuntimeError(f"could not mount a tmpfs in a private namespace (exit {holder.wait()})")
        yield SmallDisk(holder, mountpoint, size)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
