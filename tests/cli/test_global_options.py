"""Global options before the subcommand (``tailledger --data X users list``,
``tailledger -o json nodes list``, ``-c FILE``) are honoured, not silently replaced by
the subcommand's defaults -- which made an operator act on the wrong server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .server_process import RunningServer, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("globals") / "data") as srv:
        srv.cli("users", "create", "gina", check=True)
        yield srv


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI with no TAILLEDGER_* variables, from a directory with no server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILLEDGER_")}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--data", "{data}", "-o", "json", "users", "list"],
        ["--data", "{data}", "users", "list", "-o", "json"],
        ["-o", "json", "users", "list", "--data", "{data}"],
        ["-c", "{config}", "-o", "json", "users", "list"],
        ["--config", "{config}", "users", "-o", "json", "list"],
    ],
)
def test_global_options_anywhere_before_or_after_the_subcommand(
    server: RunningServer, tmp_path: Path, args: list[str]
) -> None:
    config = tmp_path / "t.toml"
    config.write_text(f'data_dir = "{server.data}"\n')
    argv = [a.format(data=server.data, config=config) for a in args]
    result = _run(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [u["name"] for u in json.loads(result.stdout)] == ["gina"]


def test_output_before_the_subcommand_gives_json_and_after_it_wins(server: RunningServer, tmp_path: Path) -> None:
    table = _run(["-o", "json", "--data", str(server.data), "users", "list", "-o", "table"], tmp_path)
    assert table.returncode == 0 and "Display name" in table.stdout
