"""Crash safety: kill -9 a writer mid-append; every acknowledged event survives and no
partial event is visible."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from eventlog import SQLiteEventStore

ROOT = Path(__file__).resolve().parents[2]


def test_kill_9_loses_no_acknowledged_event(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.eventlog._crash_writer", str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        acked: list[int] = []
        deadline = time.monotonic() + 30
        while len(acked) < 200 + 50 * round_ and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.extend(int(s) for s in line.split())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Lines written before the kill but not yet read are acknowledgements too.
        acked.extend(int(s) for line in proc.stdout for s in line.split())
        proc.stdout.close()
        assert acked, "the writer acknowledged nothing"

        store = SQLiteEventStore(path)
        report = store.verify()
        assert report.ok, report
        stored = {e.seq for e in store.read(0, 10**6)}  # every row decodes: none is partial
        assert set(acked) <= stored
        # Events come in pairs from one append: a torn pair would mean a partial commit.
        assert len(stored) % 2 == 0
        store.close()
