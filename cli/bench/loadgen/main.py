"""``tailledger loadgen``'s command line: options, the runs, and the printed report.

:func:`build_parser` is included by ``tailledger`` as a parent parser;
:func:`loadgen_main` checks the options, runs :func:`~cli.bench.loadgen.phases.measure`
once per ``--nodes`` size (each in its own trio run, with the shared clock when there
are workers) and prints the table and notes of :mod:`cli.bench.loadgen.report`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import trio

from ...config import ConfigError, load_config
from ...fdlimit import raise_fd_limit
from .. import loadgen
from ..scenarios import SCENARIOS
from .options import BACKENDS, PHASES, LoadgenOptions, Results
from .phases import measure
from .report import churn_lines, cpu_lines, curve_lines, format_table, target_lines, warning_lines
from .workers import SharedClock

__all__ = ["build_parser", "loadgen_main"]


def _parse_phases(text: str) -> frozenset[str]:
    """``--phases``: comma-separated names from :data:`PHASES` (register and connect
    are accepted and ignored: they always run)."""
    names = {p.strip() for p in text.split(",") if p.strip()}
    unknown = names - set(PHASES) - {"register", "connect"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown phase(s): {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    return frozenset(names & set(PHASES))


def _parse_interval(text: str) -> tuple[float, float]:
    """``--update-interval``: ``LOW,HIGH`` seconds (or one number for both)."""
    try:
        lo, _, hi = text.partition(",")
        low, high = float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError("use LOW,HIGH in seconds, e.g. 20,40") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError("need 0 < LOW <= HIGH")
    return low, high


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def build_parser(*, add_help: bool = True) -> argparse.ArgumentParser:
    """The options of ``tailledger loadgen`` (also ``python -m cli.bench.loadgen``; the
    ``tailledger`` command includes them as a parent parser, without ``-h``)."""
    parser = argparse.ArgumentParser(
        prog="tailledger loadgen", description=loadgen.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
    )
    parser.add_argument("--nodes", default="100,1000", help="comma-separated tailnet sizes (e.g. 100,1000,5000)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="flat",
                        help="the tailnet's shape: flat (one user, allow-all) or corp (segmented; see "
                             "cli/bench/scenarios.py), or churn: corp under steady change for --duration "
                             "(instead of the join, policy and restart phases); default flat")
    parser.add_argument("--duration", type=_positive, default=30.0,
                        help="churn: seconds of background change (default 30)")
    parser.add_argument("--join-delete-every", type=_non_negative, default=1.0, metavar="S",
                        help="churn: a join or a delete (alternately) every S seconds (default 1; 0 = none)")
    parser.add_argument("--tag-every", type=_non_negative, default=10.0, metavar="S",
                        help="churn: a tagged node's tag changes every S seconds (default 10; 0 = none)")
    parser.add_argument("--policy-every", type=_non_negative, default=60.0, metavar="S",
                        help="churn: the policy is edited every S seconds (default 60; 0 = none)")
    parser.add_argument("--seed", type=int, default=19, help="churn: seeds which nodes change (default 19)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="run the simulated clients in N worker processes, pinned apart from the "
                             "server when the machine has 3 or more cores; each side's CPU is reported "
                             "(default 0: all clients in this process)")
    parser.add_argument("--backend", choices=BACKENDS, default="sqlite",
                        help="the log's store: sqlite (default: each server's own file) or postgres "
                             "(the database of --dsn, which must be empty; one --nodes size)")
    parser.add_argument("--dsn", default="", help="postgres: the database's connection string "
                        "(its password from PGPASSWORD or PGPASSFILE, never in the string)")
    parser.add_argument("--replicas", type=int, default=1, metavar="N",
                        help="postgres: N `tailledger serve` replicas on the one log, the clients split "
                             "between them; adds the presence phase (a node's endpoint change on the first "
                             "replica, timed at its peers on the others) and skips restart (default 1)")
    parser.add_argument("--json", default="loadgen-results.json", help="where to write the figures ('' = nowhere)")
    parser.add_argument("--phases", type=_parse_phases, default=frozenset(PHASES),
                        help=f"comma-separated phases after register+connect (default {','.join(PHASES)})")
    parser.add_argument("--updaters", type=int, default=None,
                        help="clients sending endpoint updates (default min(N/10, 20); 0 = none)")
    parser.add_argument("--update-interval", type=_parse_interval, default=(20.0, 40.0), metavar="LOW,HIGH",
                        help="seconds between one updater's endpoint updates (default 20,40)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="map streams being opened at once during the ramp (default 64)")
    parser.add_argument("--register-concurrency", type=int, default=LoadgenOptions.register_concurrency,
                        help=f"registrations in flight at once (default {LoadgenOptions.register_concurrency})")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every phase timeout (they already grow with N)")
    parser.add_argument("--server-setting", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a server setting over the loadgen's defaults, as in tailledger.toml "
                             "(e.g. tuning.malloc_mmap_threshold=0, to compare a [tuning] knob); "
                             "repeatable. The server ignores TAILLEDGER_* variables of this shell")
    parser.add_argument("--max-server-rss", type=int, default=0, metavar="MIB",
                        help="abort when the server's RSS passes this (default: only when the "
                             "machine runs short of memory)")
    return parser


def _database_problem(args: argparse.Namespace, sizes: list[int]) -> str | None:
    """What is wrong with ``--backend``, ``--dsn`` and ``--replicas`` together, if anything."""
    if args.replicas < 1:
        return "--replicas needs N >= 1"
    if args.backend != "postgres":
        if args.replicas > 1:
            return "--replicas needs --backend postgres (replicas share one PostgreSQL log)"
        if args.dsn:
            return "--dsn needs --backend postgres"
        return None
    if not args.dsn:
        return "--backend postgres needs --dsn (the connection string of an empty database)"
    if len(sizes) > 1:
        return "--backend postgres takes one --nodes size (each run needs an empty database)"
    if args.replicas > 1 and args.workers:
        return "--replicas does not combine with --workers"
    if args.replicas > 1 and args.scenario == "churn":
        return "--replicas does not combine with --scenario churn"
    return None


def server_settings(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``--server-setting``s as the server's environment variables
    (``tuning.malloc_mmap_threshold=0`` is ``TAILLEDGER_TUNING__MALLOC_MMAP_THRESHOLD``),
    checked as the server would check them.

    Raises:
        ValueError: one is not ``SECTION.KEY=VALUE``, or the server would refuse it.
    """
    out: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(p.isidentifier() for p in parts):
            raise ValueError(f"--server-setting {item!r}: expected SECTION.KEY=VALUE")
        out.append(("TAILLEDGER_" + "__".join(parts).upper(), value.strip()))
    try:
        load_config(None, env=dict(out))
    except ConfigError as exc:
        raise ValueError(f"--server-setting: {exc}") from None
    return tuple(out)


def loadgen_main(argv: list[str], args: argparse.Namespace | None = None) -> int:
    """Run ``tailledger loadgen`` with ``argv`` (or options already parsed by
    :func:`build_parser`); return the exit status."""
    if args is None:
        args = build_parser().parse_args(argv)
    try:
        sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        print("tailledger loadgen: --nodes takes comma-separated integers", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 1:
        print("tailledger loadgen: --nodes needs sizes >= 1", file=sys.stderr)
        return 2
    if args.workers < 0:
        print("tailledger loadgen: --workers needs N >= 0", file=sys.stderr)
        return 2
    problem = _database_problem(args, sizes)
    if problem:
        print(f"tailledger loadgen: {problem}", file=sys.stderr)
        return 2
    try:
        settings = server_settings(args.server_setting)
    except ValueError as exc:
        print(f"tailledger loadgen: {exc}", file=sys.stderr)
        return 2
    options = LoadgenOptions(
        phases=args.phases, updaters=args.updaters, update_interval=args.update_interval,
        concurrency=max(1, args.concurrency),
        register_concurrency=max(1, args.register_concurrency), timeout_scale=args.timeout_scale,
        max_server_rss=max(0, args.max_server_rss) * 2**20, scenario=args.scenario,
        duration=args.duration, join_delete_every=args.join_delete_every, tag_every=args.tag_every,
        policy_every=args.policy_every, seed=args.seed, workers=args.workers,
        backend=args.backend, dsn=args.dsn, replicas=args.replicas, server_settings=settings,
    )
    problem = raise_fd_limit(options.sockets(max(sizes)))
    if problem:
        print(f"tailledger loadgen: {problem}", file=sys.stderr)
        return 2
    rows: list[Results] = []
    with tempfile.TemporaryDirectory(prefix="tailledger-loadgen-") as tmp:
        for n in sizes:
            given = "".join(f", {name}={value}" for name, value in options.server_settings)
            print(f"# {n} simulated nodes, {options.scenario}{given} ...", flush=True)
            try:
                # With workers, times taken in several processes are compared: one clock.
                clock = SharedClock() if options.workers else None
                rows.append(trio.run(measure, n, Path(tmp), options, clock=clock))
            except RuntimeError as exc:
                print(f"tailledger loadgen: {exc}", file=sys.stderr)
                return 1
            print(format_table(rows[-1:]), flush=True)
    print()
    print(format_table(rows))
    for line in curve_lines(rows):
        print(line)
    for row in rows:
        for line in (*churn_lines(row), *cpu_lines(row)):
            print(line)
    for line in target_lines(rows[-1]):
        print(line)
    for row in rows:
        for line in warning_lines(row):
            print(f"warning: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"figures written to {args.json}")
    return 1 if any(row.get("aborted") for row in rows) else 0
