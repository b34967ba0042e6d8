"""What the command modules share: the user-facing error, a command's configuration,
the subcommand set-up, calls to the admin socket, and printing a result as a table or
JSON (``-o``).

:mod:`cli.main` builds the parser and runs the handlers; the modules that add their own
commands to it (:mod:`cli.apikeycmd`, :mod:`cli.replaycmd`) use the same pieces from
here, so that no command module imports :mod:`cli.main`.

Most administrative commands are a table of actions (:func:`admin_command`): each
ACTION names its admin operation, how its arguments become the payload, and how a
result is printed when it is not a table of the command's columns.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from .adminsock import AdminError, call
from .config import Config, ConfigError, load_config
from .durations import DurationError, parse_duration
from .output import print_json, print_table, terminal_safe

__all__ = [
    "AdminAction",
    "CLIError",
    "Handler",
    "SubParsers",
    "add_command",
    "add_group",
    "admin",
    "admin_command",
    "command_config",
    "expiration_seconds",
    "global_options",
    "only_user",
    "print_done",
    "print_field",
    "show",
    "split_list",
]

#: A command's handler: the parsed arguments in, the exit status out.
Handler = Callable[[argparse.Namespace], int]
#: What ``add_subparsers`` returns: where subcommands are added.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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


def expiration_seconds(text: str) -> int | None:
    """``--expiration`` in seconds (``None``: never).

    Raises:
        CLIError: not a duration.
    """
    try:
        expiration = parse_duration(text)
    except DurationError as exc:
        raise CLIError(f"--expiration: {exc}") from None
    return int(expiration.total_seconds()) if expiration else None


# -- the subcommand set-up -------------------------------------------------------------


def global_options(*, top: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name.

    The top-level parser holds the defaults; the subcommands' copies default to
    ``SUPPRESS``, so that ``tailledger --data X users list`` keeps X instead of
    having it silently overwritten by the subcommand's default (argparse copies a
    subparser's defaults over what the main parser parsed). Given in both places,
    the later one wins.
    """

    def d(value: object) -> object:
        return value if top else argparse.SUPPRESS

    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("-c", "--config", default=d(None), help="TOML configuration file (default: $TAILLEDGER_CONFIG)")
    opts.add_argument("--data", default=d(None), help="data directory (default: $TAILLEDGER_DATA or ./tailledger-data)")
    opts.add_argument("-o", "--output", choices=["table", "json"], default=d("table"), help="output format")
    opts.add_argument(
        "--reason", metavar="TEXT", default=d(None),
        help="why (admin commands): stored with every event the command appends, shown by 'log show'",
    )
    return opts


#: The subcommands' copy of the global options.
_COMMON = global_options(top=False)


def add_command(
    parent: SubParsers,
    name: str,
    help_: str,
    func: Handler | None = None,
    *,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` (with the global options, and the options of
    ``parents``) to ``parent``; ``func`` handles it."""
    p = parent.add_parser(name, help=help_, description=help_, parents=[_COMMON, *parents])
    if func is not None:
        p.set_defaults(func=func)
    return p


def add_group(parent: SubParsers, name: str, help_: str, func: Handler | None = None) -> SubParsers:
    """Add the command ``name`` whose first argument is an ACTION (``users create``);
    return where its actions are added (``args.action`` names the one given)."""
    return add_command(parent, name, help_, func).add_subparsers(dest="action", required=True, metavar="ACTION")


# -- administrative commands as tables of actions ---------------------------------------


def _no_payload(args: argparse.Namespace) -> dict[str, object] | None:
    return None


@dataclass(frozen=True)
class AdminAction:
    """One ACTION of an administrative command."""

    #: The admin operation it runs (``users.create`` …).
    op: str
    #: Its payload, from the arguments.
    payload: Callable[[argparse.Namespace], dict[str, object] | None] = _no_payload
    #: How the result is printed as text (default: a table of ``columns``); ``-o json``
    #: always prints the result as it came.
    render: Callable[[argparse.Namespace, object], None] | None = None
    #: The table's columns when they are not the command's.
    columns: Sequence[tuple[str, str]] | None = None


def admin_command(columns: Sequence[tuple[str, str]], actions: Mapping[str, AdminAction]) -> Handler:
    """The handler of a command whose ACTIONs are ``actions``; results are tables of
    ``columns`` unless the action says otherwise."""

    def run(args: argparse.Namespace) -> int:
        action = actions[args.action]
        data = admin(args, action.op, action.payload(args))
        if action.render is not None and args.output != "json":
            action.render(args, data)
        else:
            show(args, data, action.columns or columns)
        return 0

    return run


def only_user(args: argparse.Namespace) -> dict[str, object]:
    """The payload of a ``list`` with an optional ``-u USER`` filter."""
    return {"user": args.user} if args.user else {}


def print_field(name: str) -> Callable[[argparse.Namespace, object], None]:
    """A renderer that prints one field of the result alone (a secret shown once)."""

    def render(args: argparse.Namespace, data: object) -> None:
        assert isinstance(data, dict)
        print(data[name])

    return render


def print_done(text: str) -> Callable[[argparse.Namespace, object], None]:
    """A renderer that prints ``text``, formatted with the arguments, instead of the
    result (``"user {user} deleted"``)."""

    def render(args: argparse.Namespace, data: object) -> None:
        print(text.format_map(vars(args)))

    return render
