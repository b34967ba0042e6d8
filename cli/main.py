"""The ``tailledger`` command line.

Server commands (``serve``, ``relay``, ``config check``, ``log verify`` …) run here;
administrative commands (``users``, ``preauthkeys``, ``nodes``, ``policy set`` …) are
sent to the running server over its local admin socket, so that every change is decided
against the live state and recorded with the caller as its actor. Every command prints a
readable table, or JSON with ``-o json``; a refused command prints why on stderr and
exits with status 1 (2 for usage errors), having changed nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from eventlog.events import ROLES

from .cmdline import (
    AdminAction,
    CLIError,
    add_command,
    add_group,
    admin,
    admin_command,
    command_config,
    expiration_seconds,
    global_options,
    only_user,
    print_done,
    print_field,
    show,
    split_list,
)
from .output import print_json, terminal_safe
from .version import package_version

__all__ = ["build_parser", "main"]

USER_COLUMNS = [("id", "ID"), ("name", "Name"), ("display_name", "Display name"), ("email", "Email"), ("role", "Role"), ("created", "Created")]
KEY_COLUMNS = [
    ("id", "ID"), ("prefix", "Prefix"), ("user", "User"), ("reusable", "Reusable"),
    ("ephemeral", "Ephemeral"), ("tags", "Tags"), ("used", "Used"), ("expired", "Expired"),
    ("expiration", "Expiration"),
]
PENDING_COLUMNS = [
    ("key", "Key"), ("hostname", "Hostname"), ("os", "OS"), ("request_tags", "Requested tags"),
    ("source", "Source"), ("created", "Created"), ("expires", "Expires"), ("status", "Status"),
]
NODE_COLUMNS = [
    ("id", "ID"), ("name", "Name"), ("hostname", "Hostname"), ("user", "User"), ("ipv4", "IPv4"),
    ("ipv6", "IPv6"), ("tags", "Tags"), ("online", "Online"), ("expired", "Expired"),
]


# -- handlers --------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import run_server

    return run_server(command_config(args), ignore_chain_errors=args.ignore_chain_errors)


def cmd_loadgen(args: argparse.Namespace) -> int:
    from .bench.loadgen.main import loadgen_main

    return loadgen_main([], args)


def cmd_relay(args: argparse.Namespace) -> int:
    from .relaycmd import run_relay

    return run_relay(command_config(args))


def cmd_config_check(args: argparse.Namespace) -> int:
    config = command_config(args)
    if args.output == "json":
        from .config import redacted

        print_json(redacted(config))
    else:
        print(f"configuration OK (data in {config.data_path}, listening on {config.listen_addr})")
    return 0


cmd_users = admin_command(USER_COLUMNS, {
    "create": AdminAction("users.create", lambda a: {
        "name": a.name, "display_name": a.display_name or "", "email": a.email or "", "role": a.role,
    }),
    "set-role": AdminAction("users.set_role", lambda a: {"user": a.user, "role": a.role}),
    "list": AdminAction("users.list"),
    "rename": AdminAction("users.rename", lambda a: {"user": a.user, "new_name": a.new_name}),
    "delete": AdminAction("users.delete", lambda a: {"user": a.user}, print_done("user {user} deleted")),
})


cmd_preauthkeys = admin_command(KEY_COLUMNS, {
    "create": AdminAction("preauthkeys.create", lambda a: {
        "user": a.user,
        "reusable": a.reusable,
        "ephemeral": a.ephemeral,
        "tags": split_list(a.tags),
        "expiration_seconds": expiration_seconds(a.expiration),
    }, print_field("key")),
    "list": AdminAction("preauthkeys.list", only_user),
    "expire": AdminAction("preauthkeys.expire", lambda a: {"key": a.key}),
})


def _tag_payload(args: argparse.Namespace) -> dict[str, object]:
    payload: dict[str, object] = {"node": args.node, "tags": split_list(args.tags)}
    if args.user:
        payload["user"] = args.user
    return payload


def _print_tagged(args: argparse.Namespace, data: object) -> None:
    """The node, then which tagOwners rule allowed each tag."""
    show(args, data, NODE_COLUMNS)
    rules = data.get("allowed_by") if isinstance(data, dict) else None
    for tag, rule in sorted(rules.items()) if isinstance(rules, dict) else ():
        print(terminal_safe(f"{tag}: allowed by {rule}"))


cmd_nodes = admin_command(NODE_COLUMNS, {
    "list": AdminAction("nodes.list", only_user),
    "show": AdminAction("nodes.show", lambda a: {"node": a.node}),
    "rename": AdminAction("nodes.rename", lambda a: {"node": a.node, "new_name": a.new_name}),
    "delete": AdminAction("nodes.delete", lambda a: {"node": a.node}, print_done("node {node} deleted")),
    "expire": AdminAction("nodes.expire", lambda a: {"node": a.node}),
    "tag": AdminAction("nodes.tag", _tag_payload, _print_tagged),
    "register": AdminAction("nodes.register", lambda a: {"key": a.key, "user": a.user}),
    "pending": AdminAction("nodes.pending", columns=PENDING_COLUMNS),
    "reject": AdminAction("nodes.reject", lambda a: {"key": a.key}, print_done("registration {key} rejected")),
    "approve-routes": AdminAction(
        "nodes.approve_routes", lambda a: {"node": a.node, "routes": split_list(a.routes)}
    ),
})

ROUTE_COLUMNS = [
    ("id", "ID"), ("node", "Node"), ("advertised", "Advertised"), ("approved", "Approved"),
    ("primary", "Primary"), ("exit_node", "Exit node"),
]


def _node_routes(args: argparse.Namespace) -> dict[str, object]:
    return {"node": args.node, "routes": args.prefixes}


cmd_routes = admin_command(ROUTE_COLUMNS, {
    "list": AdminAction("routes.list"),
    "approve": AdminAction("routes.approve", _node_routes),
    "reject": AdminAction("routes.reject", _node_routes),
})

SSH_CHECK_COLUMNS = [("id", "ID"), ("from", "From"), ("to", "To"), ("local_user", "As user"), ("created", "Since")]

cmd_ssh = admin_command(SSH_CHECK_COLUMNS, {
    "pending": AdminAction("ssh.pending"),
    "approve": AdminAction("ssh.approve", lambda a: {"id": a.id}),
    # --reason is recorded with the event and shown to the SSH user.
    "reject": AdminAction("ssh.reject", lambda a: {"id": a.id, "reason": a.reason or ""}),
})


def cmd_log(args: argparse.Namespace) -> int:
    from . import logcmd

    config = command_config(args)
    match args.action:
        case "verify":
            return logcmd.verify(config, args.output, pubkey=args.pubkey, anchor_files=args.anchor or [])
        case "pubkey":
            return logcmd.pubkey(config, args.output)
        case "anchor":
            return logcmd.anchor(config, args.output)
        case "checkpoint":
            data = admin(args, "log.checkpoint")
            if args.output == "json":
                print_json(data)
            else:
                print_field("anchor")(args, data)
            return 0
        case "show":
            return logcmd.show(config, args.output, after=args.after, limit=args.limit, type_prefix=args.type)
        case "tail":
            return logcmd.tail(config, args.output, after=args.after, type_prefix=args.type)
        case _:
            raise AssertionError(args.action)


def cmd_policy(args: argparse.Namespace) -> int:
    match args.action:
        case "evaluate":
            from .policy_evaluate import evaluate_main

            return evaluate_main(args.cases, sys.stdout)
        case "get":
            data = admin(args, "policy.get")
            if args.output == "json":
                print_json(data)
            else:
                assert isinstance(data, dict)
                text = data.get("text")
                print(terminal_safe(str(text)) if text else "# no policy set: every node may reach every other (allow-all)")
            return 0
        case "set" | "check":
            try:
                text = Path(args.file).read_text()
            except OSError as exc:
                raise CLIError(f"cannot read {args.file}: {exc.strerror}") from None
            data = admin(args, f"policy.{args.action}", {"text": text})
            if args.output == "json":
                print_json(data)
            elif args.action == "check":
                print(f"{args.file}: policy OK")
            else:
                assert isinstance(data, dict)
                print("policy set" if data["changed"] else "policy unchanged", f"(sha256 {str(data['sha256'])[:12]}…)")
            return 0
        case _:
            raise AssertionError(args.action)


def cmd_bench(args: argparse.Namespace) -> int:
    rest: list[str] = args.rest
    match args.target:
        case "log":
            from .bench.log import bench_log_main

            return bench_log_main(rest)
        case "relay":
            from .bench.relay import bench_relay_main

            return bench_relay_main(rest)
        case "policy":
            from .bench.policy import bench_policy_main

            return bench_policy_main(rest)
        case "replay":
            from .bench.replay import bench_replay_main

            return bench_replay_main(rest)
        case "api":
            from .bench.api import bench_api_main

            return bench_api_main(rest)
        case "conn-memory":
            from .bench.conn_memory import main as bench_conn_memory_main

            return bench_conn_memory_main(rest)
        case "hub":
            from .bench.hub import bench_hub_main

            return bench_hub_main(rest)
        case _:
            raise AssertionError(args.target)


# -- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tailledger",
        description="A Tailscale control server whose state is a tamper-evident event log.",
        parents=[global_options(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"tailledger {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add = add_command  # every subcommand takes the global options

    p = add(sub, "serve", "Run the control server (with its embedded defaults when unconfigured).", cmd_serve)
    p.add_argument(
        "--ignore-chain-errors", action="store_true",
        help="start even though the event log fails verification (the start is recorded in the log)",
    )

    add(sub, "relay", "Run the DERP relay and STUN server alone, following the event log.", cmd_relay)

    config_sub = add_group(sub, "config", "Inspect the configuration.")
    add(config_sub, "check", "Validate the configuration and explain what is wrong.", cmd_config_check)

    us = add_group(sub, "users", "Manage users.", cmd_users)
    p = add(us, "create", "Create a user.")
    p.add_argument("name")
    p.add_argument("--display-name")
    p.add_argument("--email")
    p.add_argument("--role", choices=ROLES, help="owner, admin or member (default: owner for the first user, else member)")
    add(us, "list", "List users.")
    p = add(us, "set-role", "Give a user another role (owner, admin, member).")
    p.add_argument("user", help="name or id")
    p.add_argument("role", choices=ROLES)
    p = add(us, "rename", "Rename a user.")
    p.add_argument("user", help="name or id")
    p.add_argument("new_name")
    p = add(us, "delete", "Delete a user who owns no nodes.")
    p.add_argument("user", help="name or id")

    from .apikeycmd import add_parsers as add_apikey_parsers

    add_apikey_parsers(sub)

    ks = add_group(sub, "preauthkeys", "Manage pre-auth keys.", cmd_preauthkeys)
    p = add(ks, "create", "Create a pre-auth key and print it (shown once).")
    p.add_argument("-u", "--user", help="owner (omit for a tags-only key)")
    p.add_argument("--reusable", action="store_true", help="may register many nodes")
    p.add_argument("--ephemeral", action="store_true", help="nodes are deleted when they go away")
    p.add_argument("--tags", help="comma-separated tags, e.g. tag:server,tag:prod")
    p.add_argument("-e", "--expiration", default="1h", help="lifetime, e.g. 90m, 24h, 7d; 0 = never (default 1h)")
    p = add(ks, "list", "List pre-auth keys.")
    p.add_argument("-u", "--user")
    p = add(ks, "expire", "Expire a pre-auth key now.")
    p.add_argument("key", help="id, prefix or the full key")

    ns = add_group(sub, "nodes", "Manage nodes.", cmd_nodes)
    p = add(ns, "list", "List nodes.")
    p.add_argument("-u", "--user")
    p = add(ns, "show", "Show one node.")
    p.add_argument("node", help="id or name")
    p = add(ns, "rename", "Give a node a new MagicDNS name.")
    p.add_argument("node", help="id or name")
    p.add_argument("new_name")
    p = add(ns, "delete", "Delete a node.")
    p.add_argument("node", help="id or name")
    p = add(ns, "expire", "Expire a node's key now (the client must log in again).")
    p.add_argument("node", help="id or name")
    p = add(ns, "tag", "Set a node's tags (replacing the old ones; empty clears them). Each tag "
                       "must be defined in the policy's tagOwners; as an admin you need not own it.")
    p.add_argument("node", help="id or name")
    p.add_argument("-t", "--tags", required=True, help="comma-separated, e.g. tag:web,tag:prod")
    p.add_argument("-u", "--user", help="when clearing the tags: the user who will own the node "
                                        "(required for a node registered with a tags-only key)")
    p = add(ns, "register", "Approve a pending interactive registration.")
    p.add_argument("-k", "--key", required=True, help="the id from the client's AuthURL")
    p.add_argument("-u", "--user", required=True)
    add(ns, "pending", "List the interactive registrations waiting for approval.")
    p = add(ns, "reject", "Reject a pending interactive registration (recorded in the log; "
            "--reason is shown to the client).")
    p.add_argument("-k", "--key", required=True, help="the id from the client's AuthURL")
    p = add(ns, "approve-routes", "Set the routes approved for a node.")
    p.add_argument("node", help="id or name")
    p.add_argument("-r", "--routes", required=True, help="comma-separated prefixes; empty clears")

    rs = add_group(sub, "routes", "Subnet routes and exit nodes: list, approve, reject.", cmd_routes)
    add(rs, "list", "Each node's advertised, approved and primary routes (exit nodes marked).")
    p = add(rs, "approve", "Approve routes a node advertises (an exit route approves both).")
    p.add_argument("node", help="id or name")
    p.add_argument("prefixes", nargs="+", metavar="PREFIX")
    p = add(rs, "reject", "Withdraw the approval of a node's routes, auto-approved ones too.")
    p.add_argument("node", help="id or name")
    p.add_argument("prefixes", nargs="+", metavar="PREFIX")

    ss = add_group(sub, "ssh", "Tailscale SSH check mode: the held connections, approve or reject.", cmd_ssh)
    add(ss, "pending", "List the SSH connections waiting for a check.")
    p = add(ss, "approve", "Approve a held SSH connection (and, for the policy's checkPeriod, its source and user).")
    p.add_argument("id", help="the id from the check URL")
    p = add(ss, "reject", "Refuse a held SSH connection (--reason is shown to the SSH user).")
    p.add_argument("id", help="the id from the check URL")

    ls_ = add_group(sub, "log", "Read and verify the event log.", cmd_log)
    p = add(ls_, "show", "Print events.")
    p.add_argument("--after", type=int, default=0, help="start after this sequence number")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--type", help="only events whose type starts with this, e.g. node.")
    p = add(ls_, "tail", "Print events as they are appended (Ctrl-C to stop).")
    p.add_argument("--after", type=int, help="start after this sequence number (default: the head)")
    p.add_argument("--type", help="only events whose type starts with this")
    p = add(ls_, "verify", "Check the hash chain, the signed checkpoints and anchors; name the first event that fails.")
    p.add_argument("--pubkey", help="the public key to check signatures with (default: audit.public_key, or the signing key's)")
    p.add_argument("--anchor", action="append", metavar="FILE", help="a file of anchor lines kept elsewhere (repeatable)")
    add(ls_, "pubkey", "Print the public key the log's checkpoints are signed with.")
    add(ls_, "anchor", "Print the latest signed head as one line, to keep elsewhere.")
    add(ls_, "checkpoint", "Ask the running server to sign its head now, and print it as an anchor line.")

    ps = add_group(sub, "policy", "Read, check, set and evaluate the tailnet policy.", cmd_policy)
    add(ps, "get", "Print the policy in force.")
    p = add(ps, "set", "Check a HuJSON policy file against the tailnet and put it in force.")
    p.add_argument("file")
    p = add(ps, "check", "Check a HuJSON policy file (syntax, validation, its tests) without changing anything.")
    p.add_argument("file")
    p = add(ps, "evaluate", "Evaluate conformance case files and print what each node would receive.")
    p.add_argument("cases", nargs="+", metavar="CASE.json")

    bench = add(sub, "bench", "Run a benchmark and print its figures.", cmd_bench)
    bench.add_argument("target", choices=["log", "relay", "policy", "replay", "api", "conn-memory", "hub"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark")

    from .replaycmd import register as register_replay

    register_replay(sub, logs=ls_, policy=ps)

    from .bench.loadgen.main import build_parser as loadgen_options

    add(sub, "loadgen", "Simulate N tailscale clients over the real protocol and measure the server.",
        cmd_loadgen, parents=[loadgen_options(add_help=False)])

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except CLIError as exc:
        print(f"tailledger: {terminal_safe(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
