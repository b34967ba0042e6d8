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
from collections.abc import Callable, Sequence
from pathlib import Path

from eventlog.events import ROLES

from .cmdline import CLIError, admin, command_config, show, split_list
from .durations import DurationError, parse_duration
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


def cmd_users(args: argparse.Namespace) -> int:
    match args.action:
        case "create":
            data = admin(args, "users.create", {"name": args.name, "display_name": args.display_name or "", "email": args.email or "", "role": args.role})
        case "set-role":
            data = admin(args, "users.set_role", {"user": args.user, "role": args.role})
        case "list":
            data = admin(args, "users.list")
        case "rename":
            data = admin(args, "users.rename", {"user": args.user, "new_name": args.new_name})
        case "delete":
            data = admin(args, "users.delete", {"user": args.user})
            if args.output != "json":
                print(f"user {args.user} deleted")
                return 0
        case _:
            raise AssertionError(args.action)
    show(args, data, USER_COLUMNS)
    return 0


def cmd_preauthkeys(args: argparse.Namespace) -> int:
    match args.action:
        case "create":
            try:
                expiration = parse_duration(args.expiration)
            except DurationError as exc:
                raise CLIError(f"--expiration: {exc}") from None
            data = admin(
                args,
                "preauthkeys.create",
                {
                    "user": args.user,
                    "reusable": args.reusable,
                    "ephemeral": args.ephemeral,
                    "tags": split_list(args.tags),
                    "expiration_seconds": int(expiration.total_seconds()) if expiration else None,
                },
            )
            if args.output == "json":
                print_json(data)
            else:
                assert isinstance(data, dict)
                print(data["key"])
            return 0
        case "list":
            data = admin(args, "preauthkeys.list", {"user": args.user} if args.user else {})
        case "expire":
            data = admin(args, "preauthkeys.expire", {"key": args.key})
        case _:
            raise AssertionError(args.action)
    show(args, data, KEY_COLUMNS)
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    match args.action:
        case "list":
            data = admin(args, "nodes.list", {"user": args.user} if args.user else {})
        case "show":
            data = admin(args, "nodes.show", {"node": args.node})
        case "rename":
            data = admin(args, "nodes.rename", {"node": args.node, "new_name": args.new_name})
        case "delete":
            data = admin(args, "nodes.delete", {"node": args.node})
            if args.output != "json":
                print(f"node {args.node} deleted")
                return 0
        case "expire":
            data = admin(args, "nodes.expire", {"node": args.node})
        case "tag":
            payload: dict[str, object] = {"node": args.node, "tags": split_list(args.tags)}
            if args.user:
                payload["user"] = args.user
            data = admin(args, "nodes.tag", payload)
            if args.output != "json" and isinstance(data, dict):
                show(args, data, NODE_COLUMNS)
                rules = data.get("allowed_by")
                for tag, rule in sorted(rules.items()) if isinstance(rules, dict) else ():
                    print(terminal_safe(f"{tag}: allowed by {rule}"))
                return 0
        case "register":
            data = admin(args, "nodes.register", {"key": args.key, "user": args.user})
        case "pending":
            show(args, admin(args, "nodes.pending"), PENDING_COLUMNS)
            return 0
        case "reject":
            data = admin(args, "nodes.reject", {"key": args.key})
            if args.output != "json":
                print(f"registration {args.key} rejected")
                return 0
        case "approve-routes":
            data = admin(args, "nodes.approve_routes", {"node": args.node, "routes": split_list(args.routes)})
        case _:
            raise AssertionError(args.action)
    show(args, data, NODE_COLUMNS)
    return 0


ROUTE_COLUMNS = [
    ("id", "ID"), ("node", "Node"), ("advertised", "Advertised"), ("approved", "Approved"),
    ("primary", "Primary"), ("exit_node", "Exit node"),
]


def cmd_routes(args: argparse.Namespace) -> int:
    match args.action:
        case "list":
            data = admin(args, "routes.list")
        case "approve" | "reject":
            data = admin(args, f"routes.{args.action}", {"node": args.node, "routes": args.prefixes})
        case _:
            raise AssertionError(args.action)
    show(args, data, ROUTE_COLUMNS)
    return 0


SSH_CHECK_COLUMNS = [("id", "ID"), ("from", "From"), ("to", "To"), ("local_user", "As user"), ("created", "Since")]


def cmd_ssh(args: argparse.Namespace) -> int:
    match args.action:
        case "pending":
            data = admin(args, "ssh.pending")
        case "approve":
            data = admin(args, "ssh.approve", {"id": args.id})
        case "reject":
            # --reason is recorded with the event and shown to the SSH user.
            data = admin(args, "ssh.reject", {"id": args.id, "reason": args.reason or ""})
        case _:
            raise AssertionError(args.action)
    show(args, data, SSH_CHECK_COLUMNS)
    return 0


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
                assert isinstance(data, dict)
                print(data["anchor"])
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
        case _:
            raise AssertionError(args.target)


# -- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
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

    common = global_options(top=False)

    parser = argparse.ArgumentParser(
        prog="tailledger",
        description="A Tailscale control server whose state is a tamper-evident event log.",
        parents=[global_options(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"tailledger {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_: str,
            func: Callable[[argparse.Namespace], int] | None = None) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_, description=help_, parents=[common])
        if func is not None:
            p.set_defaults(func=func)
        return p

    p = add(sub, "serve", "Run the control server (with its embedded defaults when unconfigured).", cmd_serve)
    p.add_argument(
        "--ignore-chain-errors", action="store_true",
        help="start even though the event log fails verification (the start is recorded in the log)",
    )

    add(sub, "relay", "Run the DERP relay and STUN server alone, following the event log.", cmd_relay)

    config = add(sub, "config", "Inspect the configuration.")
    config_sub = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    add(config_sub, "check", "Validate the configuration and explain what is wrong.", cmd_config_check)

    users = add(sub, "users", "Manage users.", cmd_users)
    us = users.add_subparsers(dest="action", required=True, metavar="ACTION")
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

    add_apikey_parsers(sub, add, admin, show, CLIError)

    keys = add(sub, "preauthkeys", "Manage pre-auth keys.", cmd_preauthkeys)
    ks = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
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

    nodes = add(sub, "nodes", "Manage nodes.", cmd_nodes)
    ns = nodes.add_subparsers(dest="action", required=True, metavar="ACTION")
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

    routes = add(sub, "routes", "Subnet routes and exit nodes: list, approve, reject.", cmd_routes)
    rs = routes.add_subparsers(dest="action", required=True, metavar="ACTION")
    add(rs, "list", "Each node's advertised, approved and primary routes (exit nodes marked).")
    p = add(rs, "approve", "Approve routes a node advertises (an exit route approves both).")
    p.add_argument("node", help="id or name")
    p.add_argument("prefixes", nargs="+", metavar="PREFIX")
    p = add(rs, "reject", "Withdraw the approval of a node's routes, auto-approved ones too.")
    p.add_argument("node", help="id or name")
    p.add_argument("prefixes", nargs="+", metavar="PREFIX")

    sshp = add(sub, "ssh", "Tailscale SSH check mode: the held connections, approve or reject.", cmd_ssh)
    ss = sshp.add_subparsers(dest="action", required=True, metavar="ACTION")
    add(ss, "pending", "List the SSH connections waiting for a check.")
    p = add(ss, "approve", "Approve a held SSH connection (and, for the policy's checkPeriod, its source and user).")
    p.add_argument("id", help="the id from the check URL")
    p = add(ss, "reject", "Refuse a held SSH connection (--reason is shown to the SSH user).")
    p.add_argument("id", help="the id from the check URL")

    logp = add(sub, "log", "Read and verify the event log.", cmd_log)
    ls_ = logp.add_subparsers(dest="action", required=True, metavar="ACTION")
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

    pol = add(sub, "policy", "Read, check, set and evaluate the tailnet policy.", cmd_policy)
    ps = pol.add_subparsers(dest="action", required=True, metavar="ACTION")
    add(ps, "get", "Print the policy in force.")
    p = add(ps, "set", "Check a HuJSON policy file against the tailnet and put it in force.")
    p.add_argument("file")
    p = add(ps, "check", "Check a HuJSON policy file (syntax, validation, its tests) without changing anything.")
    p.add_argument("file")
    p = add(ps, "evaluate", "Evaluate conformance case files and print what each node would receive.")
    p.add_argument("cases", nargs="+", metavar="CASE.json")

    bench = add(sub, "bench", "Run a benchmark and print its figures.", cmd_bench)
    bench.add_argument("target", choices=["log", "relay", "policy", "replay", "api", "conn-memory"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark")

    from .replaycmd import register as register_replay

    register_replay(sub, add, logs=ls_, policy=ps)

    from .bench.loadgen.main import build_parser as loadgen_options

    about = "Simulate N tailscale clients over the real protocol and measure the server."
    loadgen = sub.add_parser("loadgen", help=about, description=about,
                             parents=[common, loadgen_options(add_help=False)])
    loadgen.set_defaults(func=cmd_loadgen)

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
