"""Running the CLI as another Unix account (an operator of the admin socket's group)."""

from __future__ import annotations

import os
import sys
import traceback

__all__ = ["NOBODY", "NOGROUP", "as_other_account"]

NOBODY, NOGROUP = 65534, 65534


def as_other_account(argv: list[str], env: dict[str, str], uid: int, gid: int) -> tuple[int, str, str]:
    """Run the CLI's ``main`` in a forked child under another Unix account."""
    from cli.config import load_config
    from cli.main import build_parser, main

    # Import everything now: the other account cannot read this Python installation.
    build_parser()
    load_config(None, env)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            sys.stdout = os.fdopen(out_w, "w")
            sys.stderr = os.fdopen(err_w, "w")
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.environ.clear()
            os.environ.update(env)
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r) as o, os.fdopen(err_r) as e:
        stdout, stderr = o.read(), e.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stdout, stderr
