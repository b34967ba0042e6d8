"""``tailledger apikeys …`` and ``tailledger oauth-clients …``: credentials of the admin
HTTP API (``/api/v1``, ``/api/v2``), made and revoked through the admin socket like
every other change, so each is an event with the operator as its actor.

The secret is printed once (``tlkey-api-<prefix>-<secret>``, or for an OAuth client
``tlkey-client-<id>-<secret>`` whose ``<id>`` is its client id); the log keeps only the
prefix and a SHA-256 hash of the secret.
"""

from __future__ import annotations

import argparse

from projections.commands import OAUTH_SCOPES

from .cmdline import (
    AdminAction,
    SubParsers,
    add_command,
    add_group,
    admin_command,
    expiration_seconds,
    only_user,
    print_done,
    print_field,
    split_list,
)

__all__ = ["add_parsers"]

API_KEY_COLUMNS = [
    ("id", "ID"), ("prefix", "Prefix"), ("user", "User"), ("role", "Role"), ("description", "Description"),
    ("expiration", "Expiration"), ("expired", "Expired"), ("created", "Created"),
]
CLIENT_COLUMNS = [*API_KEY_COLUMNS[:4], ("scopes", "Scopes"), *API_KEY_COLUMNS[4:]]


def _created(args: argparse.Namespace) -> dict[str, object]:
    """What ``create`` sends for an API key or an OAuth client."""
    return {
        "user": args.user,
        "role": args.role,
        "description": args.description or "",
        "expiration_seconds": expiration_seconds(args.expiration),
    }


def _client_created(args: argparse.Namespace) -> dict[str, object]:
    return {**_created(args), "scopes": split_list(args.scopes)}


def _key(args: argparse.Namespace) -> dict[str, object]:
    return {"key": args.key}


cmd_apikeys = admin_command(API_KEY_COLUMNS, {
    "create": AdminAction("apikeys.create", _created, print_field("key")),
    "list": AdminAction("apikeys.list", only_user),
    "expire": AdminAction("apikeys.expire", _key),
    "delete": AdminAction("apikeys.delete", _key, print_done("API key {key} deleted")),
})

cmd_clients = admin_command(CLIENT_COLUMNS, {
    "create": AdminAction("oauth_clients.create", _client_created, print_field("key")),
    "list": AdminAction("oauth_clients.list", only_user),
    "delete": AdminAction("oauth_clients.delete", _key, print_done("OAuth client {key} deleted")),
})


def _creation_options(p: argparse.ArgumentParser, default_expiration: str) -> None:
    p.add_argument("-u", "--user", help="the user it acts for (needed for --role member)")
    p.add_argument("--role", choices=("admin", "member"), default="admin",
                   help="admin: the whole tailnet; member: only its user's nodes and keys")
    p.add_argument("-e", "--expiration", default=default_expiration,
                   help=f"lifetime, e.g. 24h, 90d; 0 = never (default {default_expiration})")
    p.add_argument("--description", help="what it is for")


def add_parsers(sub: SubParsers) -> None:
    """Add ``apikeys`` and ``oauth-clients`` to the top-level subcommands ``sub``."""
    add = add_command
    ks = add_group(sub, "apikeys", "Manage API keys of the admin HTTP API.", cmd_apikeys)
    _creation_options(add(ks, "create", "Create an API key and print it (shown once)."), "90d")
    p = add(ks, "list", "List API keys.")
    p.add_argument("-u", "--user")
    p = add(ks, "expire", "Expire an API key: it authenticates nothing from now on.")
    p.add_argument("key", help="id or prefix")
    p = add(ks, "delete", "Delete an API key.")
    p.add_argument("key", help="id or prefix")

    cs = add_group(sub, "oauth-clients", "Manage OAuth clients of the Tailscale-compatible API (/api/v2).", cmd_clients)
    p = add(cs, "create", "Create an OAuth client and print its secret (shown once).")
    p.add_argument("--scopes", required=True, help=f"comma-separated, some of: {', '.join(OAUTH_SCOPES)}")
    _creation_options(p, "0")
    p = add(cs, "list", "List OAuth clients.")
    p.add_argument("-u", "--user")
    p = add(cs, "delete", "Delete an OAuth client (its tokens stop working).")
    p.add_argument("key", help="id (client id) or number")
