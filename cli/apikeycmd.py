"""``tailledger apikeys …`` and ``tailledger oauth-clients …``: credentials of the admin
HTTP API (``/api/v1``, ``/api/v2``), made and revoked through the admin socket like
every other change, so each is an event with the operator as its actor.

The secret is printed once (``tlkey-api-<prefix>-<secret>``, or for an OAuth client
``tlkey-client-<id>-<secret>`` whose ``<id>`` is its client id); the log keeps only the
prefix and a SHA-256 hash of the secret.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Protocol

from projections.commands import OAUTH_SCOPES

from .durations import DurationError, parse_duration

__all__ = ["add_parsers"]

API_KEY_COLUMNS = [
    ("id", "ID"), ("prefix", "Prefix"), ("user", "User"), ("role", "Role"), ("description", "Description"),
    ("expiration", "Expiration"), ("expired", "Expired"), ("created", "Created"),
]
CLIENT_COLUMNS = [*API_KEY_COLUMNS[:4], ("scopes", "Scopes"), *API_KEY_COLUMNS[4:]]

Admin = Callable[[argparse.Namespace, str, "dict[str, object] | None"], object]
Show = Callable[[argparse.Namespace, object, "list[tuple[str, str]]"], None]


class _Add(Protocol):
    def __call__(
        self,
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        help_: str,
        func: Callable[[argparse.Namespace], int] | None = None,
    ) -> argparse.ArgumentParser: ...


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add: _Add,
    admin: Admin,
    show: Show,
    failure: Callable[[str], Exception],
) -> None:
    """Add ``apikeys`` and ``oauth-clients`` to the command line.

    Args:
        sub: the top-level subcommands.
        add: ``cli.main``'s helper that adds a subcommand with the common options.
        admin: calls an admin socket operation.
        show: prints a result as a table or JSON (``-o``).
        failure: makes the user-facing error of ``cli.main`` from a message.
    """

    def create_payload(args: argparse.Namespace) -> dict[str, object]:
        try:
            expiration = parse_duration(args.expiration)
        except DurationError as exc:
            raise failure(f"--expiration: {exc}") from None
        return {
            "user": args.user,
            "role": args.role,
            "description": args.description or "",
            "expiration_seconds": int(expiration.total_seconds()) if expiration else None,
        }

    def print_secret(args: argparse.Namespace, data: object, columns: list[tuple[str, str]]) -> int:
        if args.output == "json":
            show(args, data, columns)
        else:
            assert isinstance(data, dict)
            print(data["key"])
        return 0

    def cmd_apikeys(args: argparse.Namespace) -> int:
        match args.action:
            case "create":
                return print_secret(args, admin(args, "apikeys.create", create_payload(args)), API_KEY_COLUMNS)
            case "list":
                data = admin(args, "apikeys.list", {"user": args.user} if args.user else {})
            case "expire":
                data = admin(args, "apikeys.expire", {"key": args.key})
            case "delete":
                data = admin(args, "apikeys.delete", {"key": args.key})
                if args.output != "json":
                    print(f"API key {args.key} deleted")
                    return 0
            case _:
                raise AssertionError(args.action)
        show(args, data, API_KEY_COLUMNS)
        return 0

    def cmd_clients(args: argparse.Namespace) -> int:
        match args.action:
            case "create":
                payload = create_payload(args)
                payload["scopes"] = [s.strip() for s in args.scopes.split(",") if s.strip()]
                return print_secret(args, admin(args, "oauth_clients.create", payload), CLIENT_COLUMNS)
            case "list":
                data = admin(args, "oauth_clients.list", {"user": args.user} if args.user else {})
            case "delete":
                data = admin(args, "oauth_clients.delete", {"key": args.key})
                if args.output != "json":
                    print(f"OAuth client {args.key} deleted")
                    return 0
            case _:
                raise AssertionError(args.action)
        show(args, data, CLIENT_COLUMNS)
        return 0

    def creation_options(p: argparse.ArgumentParser, default_expiration: str) -> None:
        p.add_argument("-u", "--user", help="the user it acts for (needed for --role member)")
        p.add_argument("--role", choices=("admin", "member"), default="admin",
                       help="admin: the whole tailnet; member: only its user's nodes and keys")
        p.add_argument("-e", "--expiration", default=default_expiration,
                       help=f"lifetime, e.g. 24h, 90d; 0 = never (default {default_expiration})")
        p.add_argument("--description", help="what it is for")

    keys = add(sub, "apikeys", "Manage API keys of the admin HTTP API.", cmd_apikeys)
    ks = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    creation_options(add(ks, "create", "Create an API key and print it (shown once)."), "90d")
    p = add(ks, "list", "List API keys.")
    p.add_argument("-u", "--user")
    p = add(ks, "expire", "Expire an API key: it authenticates nothing from now on.")
    p.add_argument("key", help="id or prefix")
    p = add(ks, "delete", "Delete an API key.")
    p.add_argument("key", help="id or prefix")

    clients = add(sub, "oauth-clients", "Manage OAuth clients of the Tailscale-compatible API (/api/v2).", cmd_clients)
    cs = clients.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(cs, "create", "Create an OAuth client and print its secret (shown once).")
    p.add_argument("--scopes", required=True, help=f"comma-separated, some of: {', '.join(OAUTH_SCOPES)}")
    creation_options(p, "0")
    p = add(cs, "list", "List OAuth clients.")
    p.add_argument("-u", "--user")
    p = add(cs, "delete", "Delete an OAuth client (its tokens stop working).")
    p.add_argument("key", help="id (client id) or number")
