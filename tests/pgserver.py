"""A throw-away PostgreSQL server for the tests (Debian's ``postgresql`` package).

The server runs from a temporary data directory, listening only on a Unix socket in
that directory, with trust authentication (nothing else can reach the socket: the
directory belongs to the server's account). As root, ``initdb`` and the server run as
the ``postgres`` user through ``runuser`` (``initdb`` refuses root); otherwise as the
current user. ``tests/install-deps.sh`` installs the package when it is missing; outside
CI a machine without it skips the PostgreSQL tests, under ``CI=true`` they fail.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.support.waits import wait_until_sync

__all__ = ["PgServer", "find_bin_dir"]


def find_bin_dir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, else Debian's versioned one."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


class PgServer:
    """One PostgreSQL cluster in a temporary directory; :meth:`conninfo` per database."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="tailledger-pg-"))
        self.data = self.dir / "data"
        self.port = 5432
        self._names = itertools.count(1)
        self._as_root = os.geteuid() == 0
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o700)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8", "--locale=C")

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", "postgres", "--", *cmd] if self._as_root else cmd

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run(self._cmd(tool, *args), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")

    def start(self) -> None:
        options = (
            f"-k {self.dir} -c listen_addresses='' -p {self.port} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"),
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend (a crash); the next start recovers."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)

        def backends_gone() -> bool:
            # The backends notice the dead postmaster and exit by themselves.
            out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, check=False)
            for child in out.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(child), signal.SIGKILL)
            return not out.stdout.strip()

        with contextlib.suppress(AssertionError):  # what lingers is a zombie: go on
            wait_until_sync(backends_gone, what="the backends to go", seconds=10)
        # A killed postmaster may linger as a zombie whose pid still answers; its lock
        # files would make the next start believe it is alive.
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        (self.dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.dir} port={self.port} user=postgres dbname={dbname}"

    def create_database(self) -> str:
        """A new, empty database; its connection string."""
        import psycopg

        name = f"t{next(self._names)}"
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}".encode())
        return self.conninfo(name)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
