"""``cli.spawn``: the one way the load generator, the benchmarks and the tests start
``tailledger``, through the console script, running the code of this checkout.

The package is installed editable from one checkout (``/work/main`` on the
development machine) while tests also run from other worktrees; a child started
through the console script would import the installed checkout's code unless
``PYTHONPATH`` names this one first.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cli.spawn import ROOT, child_env, free_port, spawn_serve, stop, tailledger_argv, wait_ready

from .server_process import running_server, serve_env

#: The checkout these tests (and so the code under test) come from.
CHECKOUT = Path(__file__).resolve().parents[2]


def test_the_spawned_server_runs_this_checkouts_code(tmp_path: Path) -> None:
    # PYTHONVERBOSE: the interpreter reports the file of every module it imports.
    with running_server(tmp_path / "data", extra_env={"PYTHONVERBOSE": "1"}) as server:
        assert server.cli("users", "list").returncode == 0
    log = server.log_text()
    loaded = re.findall(r"^# code object from '?(\S+?)/cli/(?:__pycache__/)?(\w+)\.", log, re.MULTILINE)
    modules = {name for _, name in loaded}
    assert {"main", "server", "network"} <= modules, log[-2000:]
    assert {root for root, _ in loaded} == {str(CHECKOUT)}
    assert server.proc.args == tailledger_argv("serve")  # the console script, not python -m cli


def test_the_console_script_imports_the_root_put_first_on_pythonpath(tmp_path: Path) -> None:
    fake = tmp_path / "checkout"
    (fake / "cli").mkdir(parents=True)
    (fake / "cli" / "__init__.py").write_text("")
    (fake / "cli" / "main.py").write_text("def main() -> int:\n    print(__file__)\n    return 0\n")
    env = child_env(root=fake)
    assert child_env(env, root=fake) == env  # once only
    done = subprocess.run(tailledger_argv("serve"), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(fake / "cli" / "main.py")
    assert ROOT == CHECKOUT


def test_a_server_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    env = serve_env(tmp_path / "data", free_port(), {"TAILLEDGER_LISTEN_ADDR": "not an address"})
    log = tmp_path / "serve.log"
    proc = spawn_serve(env, log)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)exited with status 1.*listen_addr: 'not an address' is not HOST:PORT"):
            wait_ready(proc, log, timeout=60, admin_socket=tmp_path / "data" / "admin.sock")
    finally:
        assert stop(proc) == proc.returncode
