"""The server's Noise key file is written atomically: a crash while it is first
written never leaves an empty or partial key that stops the server from starting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli.config import ConfigError
from cli.network import load_noise_key


def _valid(path: Path) -> bytes:
    text = path.read_text().strip()
    assert text.startswith("privkey:")
    key = bytes.fromhex(text.removeprefix("privkey:"))
    assert len(key) == 32
    return key


def test_first_start_makes_a_private_key_and_later_starts_reuse_it(tmp_path: Path) -> None:
    key = load_noise_key(tmp_path)
    path = tmp_path / "noise_private.key"
    assert _valid(path) == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_noise_key(tmp_path) == key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise_private.key"]


def test_an_empty_key_left_by_a_crash_is_replaced(tmp_path: Path) -> None:
    # What the old touch-then-write left when the process died in between.
    (tmp_path / "noise_private.key").touch(mode=0o600)
    key = load_noise_key(tmp_path)
    assert len(key) == 32
    assert _valid(tmp_path / "noise_private.key") == key


def test_a_leftover_temporary_file_is_removed(tmp_path: Path) -> None:
    (tmp_path / "noise_private.key.tmp").write_text("privkey:00")
    key = load_noise_key(tmp_path)
    assert _valid(tmp_path / "noise_private.key") == key
    assert not (tmp_path / "noise_private.key.tmp").exists()


def test_a_garbled_key_is_an_error_not_a_silent_new_identity(tmp_path: Path) -> None:
    (tmp_path / "noise_private.key").write_text("privkey:not-hex\n")
    with pytest.raises(ConfigError, match="does not hold a Noise private key"):
        load_noise_key(tmp_path)


_CRASH = """
import os, signal, sys
from pathlib import Path
import cli.network as network

point = sys.argv[2]
real = getattr(os, point)

def crash(*args, **kwargs):
    if point == "replace":
        os.kill(os.getpid(), signal.SIGKILL)
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

setattr(os, point, crash)
network.load_noise_key(Path(sys.argv[1]))
"""


@pytest.mark.parametrize("point", ["fsync", "replace"])
def test_kill_9_while_writing_leaves_a_startable_data_directory(tmp_path: Path, point: str) -> None:
    result = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path), point], env=os.environ, timeout=60)
    assert result.returncode == -signal.SIGKILL
    path = tmp_path / "noise_private.key"
    if path.exists():  # killed after the rename: the key is whole
        _valid(path)
    key = load_noise_key(tmp_path)
    assert _valid(path) == key
    assert not (tmp_path / "noise_private.key.tmp").exists()
