"""What the command modules share: the user-facing error, a command's configuration,
calls to the admin socket, and printing a result as a table or JSON (``-o``).

:mod:`cli.main` builds the parser and runs the handlers; the modules that add their own
commands to it (:mod:`cli.apikeycmd`, :mod:`cli.replaycmd`) use the same pieces from
here, so that no command module imports :mod:`cli.main`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from .adminsock import AdminError, call
from .config import Config, ConfigError, load_config
from .output import print_json, print_table, terminal_safe

__all__ = ["CLIError", "admin", "command_config", "show", "split_list"]


class CLIError(Exception):
    """A user-facing failure: printed on stderr, exit status 1."""


def command_config(args: argparse.Namespace) -> Config:
    """The configuration a command runs with (``--config``, ``--data``, environment).

    Raises:
        CLIError: the configuration is invalid.
    """
    env = None
    if getattr(args, "data", None):
        env = {**os.environ, "TAILLEDGER_DATA": args.data}
    try:
        return load_config(args.config, env)
    except ConfigError as exc:
        raise CLIError(f"invalid configuration: {exc}") from None


def admin(args: argparse.Namespace, op: str, payload: dict[str, object] | None = None) -> object:
    """Run the admin operation ``op`` on the running server (with ``--reason``).

    Raises:
        CLIError: the server refused it or cannot be reached.
    """
    config = command_config(args)
    try:
        return call(config.admin_socket_path, op, payload, reason=getattr(args, "reason", None) or "")
    except AdminError as exc:
        raise CLIError(str(exc)) from None


def show(args: argparse.Namespace, data: object, columns: Sequence[tuple[str, str]]) -> None:
    """Print ``data`` as JSON (``-o json``) or as a table of ``columns``."""
    if args.output == "json":
        print_json(data)
    elif isinstance(data, list):
        print_table(data, columns)
    elif isinstance(data, dict):
        print_table([data], columns)
    else:
        print(terminal_safe(str(data)))


def split_list(text: str | None) -> list[str]:
    """A comma-separated option as a list (blanks dropped)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]
