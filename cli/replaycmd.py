"""``tailledger replay …``, ``log export|import`` and ``policy impact``: the past, offline.

Theory of operation
-------------------
These commands never talk to the server. They open the event log read-only (SQLite
``mode=ro``: the data directory is never written, not even a WAL index) or read an
export with ``--from-export FILE`` (verified line by line into a private in-memory
store), and ask :mod:`projections.replay`. Folds leave verified snapshots in a cache
*outside* the data directory (``$XDG_CACHE_HOME/tailledger/replay``, or
``--cache-dir``; ``--no-cache`` keeps them in memory), keyed by the hash of the log's
first event; a snapshot is used only when the log still holds its event with the same
hash (see :mod:`projections.replay.history`), so a stale or forged cache costs time,
never a wrong answer.

Long folds, exports and imports draw a progress bar on stderr when it is a terminal.
:func:`register` adds the subcommands to the parser built in :mod:`cli.main`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from eventlog import ChainError, EventLogError, EventStore, Head, SQLiteEventStore
from eventlog.export import export_lines, import_export
from projections.netmap import NetmapSettings
from projections.replay import (
    History,
    MemorySnapshots,
    ReplayError,
    Snapshot,
    diff_view,
    impact,
    netmap_citations,
    netmap_view,
    parse_proto,
    reach_timeline,
    state_view,
    target_for,
    who_can_reach,
)

from .cmdline import CLIError, SubParsers, add_command, add_group, admin, command_config
from .config import Config, ConfigError
from .output import print_json, print_table

__all__ = ["register"]

Handler = Callable[[argparse.Namespace], int]


class _Fail(Exception):
    pass


# -- progress --------------------------------------------------------------------------


class Progress:
    """A one-line bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, *, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {done:,}/{total:,}")
        sys.stderr.flush()
        self._drawn = True

    def done(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


# -- snapshot cache --------------------------------------------------------------------


class FileSnapshots:
    """Replay snapshots in a SQLite file outside the data directory."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._conn = sqlite3.connect(str(path), isolation_level=None)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS snapshots (seq INTEGER PRIMARY KEY, event_hash TEXT NOT NULL, "
            "content_sha256 TEXT NOT NULL, policy_seq INTEGER NOT NULL, blob BLOB NOT NULL)"
        )

    def seqs(self) -> list[int]:
        return [int(r[0]) for r in self._conn.execute("SELECT seq FROM snapshots ORDER BY seq")]

    def get(self, seq: int) -> Snapshot | None:
        row = self._conn.execute(
            "SELECT event_hash, content_sha256, policy_seq, blob FROM snapshots WHERE seq = ?", (seq,)
        ).fetchone()
        if row is None:
            return None
        return Snapshot(seq, str(row[0]), str(row[1]), bytes(row[3]), int(row[2]))

    def put(self, snapshot: Snapshot) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?)",
            (snapshot.seq, snapshot.event_hash, snapshot.content_sha256, snapshot.policy_seq, snapshot.blob),
        )


def _cache_dir(args: argparse.Namespace) -> Path:
    if args.cache_dir:
        return Path(args.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tailledger" / "replay"


# -- opening the history ---------------------------------------------------------------


def _database(args: argparse.Namespace) -> Path:
    return command_config(args).database_path


def open_store(args: argparse.Namespace) -> EventStore:
    """The log, read-only: the data directory's database or a verified export."""
    export = getattr(args, "from_export", None)
    if export:
        store = SQLiteEventStore(":memory:")
        bar = Progress("loading export")
        try:
            import_export(Path(export), store, progress=lambda n: bar(n, max(n, 1)))
        except OSError as exc:
            raise _Fail(f"cannot read {export}: {exc.strerror}") from None
        except ChainError as exc:
            raise _Fail(f"{export}: the export does not verify: {exc}") from None
        finally:
            bar.done()
        return store

    config = command_config(args)
    if config.database.type == "postgres":
        from .storage import open_store as open_configured

        try:
            shared = open_configured(config, read_only=True)
        except (EventLogError, ConfigError) as exc:
            raise _Fail(str(exc)) from None
        _opened.append(shared)
        return shared
    path = config.database_path
    if not path.exists():
        raise _Fail(f"no event log at {path}")
    # Without a WAL file no server is writing: open immutable, so not even a WAL index
    # is created. With one, a live server owns the directory; read it through WAL.
    live = Path(f"{path}-wal").exists()
    try:
        return SQLiteEventStore(path, read_only=True, immutable=not live)
    except EventLogError as exc:
        raise _Fail(str(exc)) from None


def open_history(args: argparse.Namespace) -> History:
    store = open_store(args)
    first = store.read_rows(0, 1)
    snapshots: Any = MemorySnapshots()
    if first and not args.no_cache and not getattr(args, "from_export", None):
        key = hashlib.sha256(f"{first[0].hash}".encode()).hexdigest()[:32]
        cache = _cache_dir(args)

        if cache.resolve().is_relative_to(command_config(args).data_path.resolve()):
            raise _Fail(f"--cache-dir {cache} is inside the data directory, which replay never writes")
        try:
            snapshots = FileSnapshots(cache / f"{key}.db")
        except (OSError, sqlite3.Error):
            snapshots = MemorySnapshots()  # an unusable cache only costs time
    return History(store, snapshots=snapshots, progress=Progress("folding"))


# -- output helpers --------------------------------------------------------------------


def _cell_event(ref: object) -> str:
    if not isinstance(ref, dict):
        return "-"
    reason = f" ({ref['reason']})" if ref.get("reason") else ""
    return f"#{ref['seq']} {ref['time']} {ref['type']} by {ref['actor']}{reason}"


def _short_event(ref: object) -> str:
    """A short citation for a table column: ``#seq actor``."""
    if not isinstance(ref, dict):
        return "-"
    return f"#{ref['seq']} {ref['actor']}"


def _events_text(refs: object) -> str:
    if not isinstance(refs, list) or not refs:
        return "-"
    return "; ".join(_cell_event(r) for r in refs)


# -- handlers --------------------------------------------------------------------------


def _parse_port(text: str | None) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise _Fail(f"invalid port {text!r}")
    return int(text)


def cmd_state(args: argparse.Namespace) -> int:
    history = open_history(args)
    data = state_view(history, history.point(args.at))
    if args.output == "json":
        print_json(data)
        return 0
    print(f"state after seq {data['at_seq']} (judged at {data['at_time']})\n")
    users = [{**u, "changed": _short_event(u["last_change"])} for u in data["users"]]  # type: ignore[attr-defined]
    print("Users")
    print_table(users, [("id", "ID"), ("name", "Name"), ("display_name", "Display name"), ("email", "Email"),
                        ("changed", "Changed")])
    nodes = [{**n, "changed": _short_event(n["last_change"])} for n in data["nodes"]]  # type: ignore[attr-defined]
    print("\nNodes")
    print_table(nodes, [
        ("id", "ID"), ("name", "Name"), ("user", "User"), ("tags", "Tags"), ("ipv4", "IPv4"),
        ("ipv6", "IPv6"), ("approved_routes", "Approved routes"), ("primary_routes", "Primary"),
        ("key_expiry", "Key expiry"), ("expired", "Expired"), ("changed", "Changed"),
    ])
    print("(Changed: the event that last changed the row, by seq and actor; -o json has its time, type and reason)")
    print()
    _print_policy(data["policy"])
    return 0


def _print_policy(policy: object) -> None:
    """The policy in force and the event that set it (the rules a table cites)."""
    if isinstance(policy, dict):
        digest = f", sha256 {str(policy['sha256'])[:12]}…" if policy.get("sha256") else ""
        print(f"Policy in force: set by {_cell_event(policy)}{digest}")
    else:
        print("Policy in force: none set (allow-all)")


def netmap_settings(args: argparse.Namespace) -> tuple[NetmapSettings, str]:
    """The tailnet-wide parts of a map as the configured server builds them: domain,
    DNS, the SSH check URL, and the DERP map from ``derp.paths`` files. Configuration is
    not history: it is today's, and ``derp.urls`` and the embedded relay's region are
    left out (a replay never touches the network)."""
    from .config import ConfigError
    from .settings import assemble_derp_map, dns_config

    config = command_config(args)
    files: dict[str, bytes] = {}
    for path in config.derp.paths:
        try:
            files[path] = Path(path).read_bytes()
        except OSError as exc:
            raise _Fail(f"derp.paths: cannot read {path}: {exc.strerror}") from None
    try:
        derp = assemble_derp_map(config, files=files, urls={}, embedded=None)
    except ConfigError as exc:
        raise _Fail(str(exc)) from None
    settings = NetmapSettings(domain=config.dns.base_domain, derp_map=derp, dns=dns_config(config))
    return settings, config.public_url


def cmd_netmap(args: argparse.Namespace) -> int:
    history = open_history(args)
    settings, control_url = netmap_settings(args)
    point = history.point(args.at)
    data = netmap_view(history, point, args.node, settings, control_url)
    if args.output == "json":
        if args.cite:  # the map untouched under "netmap", its citations beside it
            print_json({"netmap": data, "cites": netmap_citations(history, point, args.node, data)})
        else:
            print_json(data)  # exactly the MapResponse the server computes
        return 0
    assert isinstance(data, dict)
    cites = netmap_citations(history, point, args.node, data)
    changed = {p["id"]: p["last_change"] for p in cites["peers"]}  # type: ignore[attr-defined]
    node = data.get("Node", {})
    print(f"netmap of {node.get('Name')} (id {node.get('ID')}) addresses {','.join(node.get('Addresses') or [])}"
          f" after seq {point.seq}")
    print(f"node last changed by {_cell_event(cites['node']['last_change'])}")  # type: ignore[index]
    peers = data.get("Peers") or []
    rows = [
        {"id": p.get("ID"), "name": p.get("Name"), "allowed_ips": p.get("AllowedIPs"),
         "primary": p.get("PrimaryRoutes"), "tags": p.get("Tags"), "expiry": p.get("KeyExpiry"),
         "changed": _short_event(changed.get(p.get("ID")))}
        for p in peers
    ]
    print(f"\nPeers ({len(rows)})")
    print_table(rows, [("id", "ID"), ("name", "Name"), ("allowed_ips", "Allowed IPs"), ("primary", "Primary routes"),
                       ("tags", "Tags"), ("expiry", "Key expiry"), ("changed", "Changed")])
    rules = (data.get("PacketFilters") or {}).get("base") or []
    print(f"\nPacket filter ({len(rules)} rules)")
    for rule in rules:
        print("  " + msgspec.json.encode(rule).decode())
    ssh = data.get("SSHPolicy")
    print(f"\nSSH policy: {len((ssh or {}).get('rules') or [])} rules\n")
    _print_policy(cites["policy"])
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    history = open_history(args)
    start = history.point(args.from_)
    end = history.point(args.to)
    data = diff_view(history, start, end)
    if args.output == "json":
        print_json(data)
        return 0
    print(f"changes after seq {data['from_seq']} up to seq {data['to_seq']}\n")
    nodes = [{**n, "changes": "; ".join(n["changes"]), "events": _events_text(n["events"])} for n in data["nodes"]]  # type: ignore[attr-defined]
    print("Nodes")
    print_table(nodes, [("node", "Node"), ("id", "ID"), ("changes", "Changes"), ("events", "Caused by")])
    users = [{**u, "events": _events_text(u["events"])} for u in data["users"]]  # type: ignore[attr-defined]
    print("\nUsers")
    print_table(users, [("user", "User"), ("id", "ID"), ("change", "Change"), ("events", "Caused by")])
    policy = data["policy"]
    assert isinstance(policy, dict)
    print("\nPolicy:", "changed by " + _events_text(policy["events"]) if policy["changed"] else "unchanged")
    if policy["diff"]:
        print(policy["diff"], end="")
    for key, title in (("reach_gained", "Reachability gained"), ("reach_lost", "Reachability lost")):
        rows = [{**r, "events": _events_text(r["events"])} for r in data[key]]  # type: ignore[attr-defined]
        print(f"\n{title}")
        print_table(rows, [("src", "Source"), ("dst", "Destination"), ("proto", "Proto"), ("ports", "Ports"), ("events", "Caused by")])
    return 0


def cmd_reach(args: argparse.Namespace) -> int:
    history = open_history(args)
    port = _parse_port(args.port)
    protocols = parse_proto(args.proto, port)
    start = history.point(args.from_) if args.from_ else history.point_at_seq(0)
    end = history.point(args.to)
    timeline = reach_timeline(
        history, args.src, args.dst, port=port, protocols=protocols, proto_name=args.proto,
        start=start, end=end,
    )
    if args.format in ("svg", "html"):
        from .timeline_svg import render_html, render_svg

        svg = render_svg([timeline])
        sys.stdout.write(render_html([timeline], svg) if args.format == "html" else svg)
        return 0
    data = timeline.to_json()
    if args.output == "json":
        print_json(data)
        return 0
    what = f"port {port}" if port is not None else "any port"
    print(f"{timeline.src} -> {timeline.dst} ({args.proto or 'any protocol'}, {what}), seq {start.seq}..{end.seq}")
    rows = [{"from": _cell_event(i["from"]), "to": _cell_event(i["to"]) if i["to"] else "(still open)",
             "rule": i["rule"] + (f" via {i['via']}" if i.get("via") else "")}
            for i in data["intervals"]]  # type: ignore[attr-defined]
    if not rows:
        print("never reachable in this range")
    else:
        print_table(rows, [("from", "Opened by"), ("to", "Closed by"), ("rule", "Rule")])
    return 0


def _split_dst(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, _parse_port(rest[1:]) if rest.startswith(":") else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _parse_port(port)
    return text, None


def cmd_who_can_reach(args: argparse.Namespace) -> int:
    history = open_history(args)
    point = history.point(args.at)
    ref, port = _split_dst(args.dst)
    target = target_for(history.state_at(point.seq), ref)
    data = who_can_reach(history, point, target, port=port, protocols=parse_proto(args.proto, port))
    if args.output == "json":
        print_json(data)
        return 0
    print(f"who could reach {data['dst']} after seq {data['at_seq']}")
    sources = [{**s, "changed": _short_event(s["last_change"])} for s in data["sources"]]  # type: ignore[attr-defined]
    print_table(sources, [("node", "Source"), ("rule", "Rule"), ("via", "Via"), ("changed", "Source changed")])
    print()
    _print_policy(state_view(history, point)["policy"])  # the rules' event
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    history = open_history(args)
    start = history.point(args.from_) if args.from_ else history.point_at_seq(0)
    end = history.point(args.to)
    out = open(args.file, "wb") if args.file else sys.stdout.buffer  # noqa: SIM115
    bar = Progress("exporting")
    total = end.seq - start.seq
    try:
        for n, line in enumerate(export_lines(history.store, after_seq=start.seq, upto_seq=end.seq), 1):
            out.write(line)
            if n % 10_000 == 0:
                bar(n, total)
        bar(total, total)
    finally:
        bar.done()
        if args.file:
            out.close()
        else:
            out.flush()
    if args.file:
        print(f"exported events {start.seq + 1}..{end.seq} to {args.file}", file=sys.stderr)
    return 0


def _import_postgres(args: argparse.Namespace, config: Config) -> int:
    """Import into the configured PostgreSQL database: one transaction, so a refused
    import leaves the (append-only) log exactly as empty as it was."""
    from .storage import describe
    from .storage import open_store as open_configured

    bar = Progress("importing")
    try:
        store = open_configured(config)
        try:
            head = import_export(Path(args.file), store, progress=lambda n: bar(n, max(n, 1)))
            report = store.verify()
        finally:
            store.close()
        if not report.ok or report.head_hash != head.hash:
            raise ChainError(report.first_bad or head.seq, report.reason or "the imported head differs")
    except (ChainError, EventLogError, ConfigError, OSError) as exc:
        raise _Fail(f"import refused, nothing kept: {exc}") from None
    finally:
        bar.done()
    _print_imported(args, head, describe(config))
    return 0


def _print_imported(args: argparse.Namespace, head: Head, where: str) -> None:
    if args.output == "json":
        print_json({"events": head.seq, "head_seq": head.seq, "head_hash": head.hash})
    else:
        print(f"imported {head.seq} events into {where}; chain verified")
        print(f"head: seq {head.seq} hash {head.hash}")


def cmd_import(args: argparse.Namespace) -> int:

    config = command_config(args)
    if config.database.type == "postgres":
        return _import_postgres(args, config)
    data = Path(args.data) if args.data else None
    if data is None:
        raise _Fail("log import needs --data DIR (a new data directory)")
    if data.exists() and any(data.iterdir()):
        raise _Fail(f"{data} is not empty: import builds a fresh data directory")
    created = not data.exists()
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data, 0o700)
    path = _database(args)
    bar = Progress("importing")
    try:
        store = SQLiteEventStore(path)
        head = import_export(Path(args.file), store, progress=lambda n: bar(n, max(n, 1)))
        report = store.verify()  # read back what was written: the same chain, end to end
        store.close()
        if not report.ok or report.head_hash != head.hash:
            raise ChainError(report.first_bad or head.seq, report.reason or "the imported head differs")
    except (ChainError, EventLogError, OSError) as exc:
        bar.done()
        for leftover in sorted(data.iterdir()):
            leftover.unlink()
        if created:
            data.rmdir()
        raise _Fail(f"import refused, nothing kept: {exc}") from None
    bar.done()
    for f in data.iterdir():
        os.chmod(f, 0o600)
    _print_imported(args, head, str(path))
    return 0


def _impact_from_server(args: argparse.Namespace, text: str) -> dict[str, Any] | None:
    """Ask the running server (its live tailnet); ``None`` when none answers here."""
    from .adminsock import AdminError, call

    if args.offline or getattr(args, "from_export", None):
        return None
    config = command_config(args)
    if not config.admin_socket_path.exists():
        return None
    try:
        data = call(config.admin_socket_path, "policy.impact", {"text": text})
    except AdminError as exc:
        message = str(exc)
        if "unknown operation" in message or "no tailledger server" in message or "not accepting" in message:
            return None  # an older server, or none: answer from the log instead
        raise _Fail(f"{args.file}: {message}") from None
    return data if isinstance(data, dict) else None


def _impact_offline(args: argparse.Namespace, text: str) -> dict[str, Any]:
    from projections import commands as c
    from projections.errors import CommandError

    history = open_history(args)
    point = history.point(None)
    state = history.state_at(point.seq)
    try:
        c.check_policy_text(state, text)
    except CommandError as exc:
        raise _Fail(f"{args.file}: {exc}") from None
    return {"at_seq": point.seq, **impact(state, text, point.now)}


def cmd_policy_impact(args: argparse.Namespace) -> int:
    """``policy impact FILE`` / ``policy set --dry-run FILE``: asked of the running
    server when there is one (an operator on the group socket cannot read the data
    directory), else computed read-only from the log."""
    try:
        text = Path(args.file).read_text()
    except OSError as exc:
        raise _Fail(f"cannot read {args.file}: {exc.strerror}") from None
    data = _impact_from_server(args, text) or _impact_offline(args, text)
    if args.output == "json":
        print_json(data)
        return 0
    print(f"impact of {args.file} against the tailnet after seq {data['at_seq']} (nothing appended)")
    for key, title in (("pairs_gained", "Pairs gained"), ("pairs_lost", "Pairs lost")):
        print(f"\n{title}")
        print_table(data[key], [("src", "Source"), ("dst", "Destination"), ("proto", "Proto"), ("ports", "Ports")])
    changed = data["netmaps_changed"]
    print(f"\nNetmaps that change: {', '.join(changed) if changed else 'none'}")
    return 0


def cmd_policy_set(args: argparse.Namespace) -> int:
    """``policy set FILE``: the server checks it, computes its impact summary against
    the live tailnet and records both in the ``policy.set`` event."""
    try:
        text = Path(args.file).read_text()
    except OSError as exc:
        raise CLIError(f"cannot read {args.file}: {exc.strerror}") from None
    data = admin(args, "policy.set", {"text": text, "impact": not args.no_impact})
    if args.output == "json":
        print_json(data)
        return 0
    assert isinstance(data, dict)
    print("policy set" if data["changed"] else "policy unchanged", f"(sha256 {str(data['sha256'])[:12]}…)")
    impact = data.get("impact")
    if isinstance(impact, dict):
        nodes = impact.get("nodes") or []
        more = int(impact["netmaps_changed"]) - len(nodes)
        names = ", ".join(nodes) + (f" and {more} more" if more > 0 else "")
        print(f"impact (recorded with the event): {impact['pairs_gained']} pairs gained, "
              f"{impact['pairs_lost']} lost, {impact['netmaps_changed']} netmaps changed"
              + (f" ({names})" if names else ""))
    return 0


#: Stores opened by the running command, closed when it ends (a PostgreSQL store holds
#: connections).
_opened: list[EventStore] = []


def _guard(handler: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (_Fail, ReplayError) as exc:
            print(f"tailledger: {exc}", file=sys.stderr)
            return 1
        except ChainError as exc:
            print(f"tailledger: the log does not verify at event {exc.seq}: {exc.reason}", file=sys.stderr)
            return 1
        finally:
            while _opened:
                _opened.pop().close()

    return run


# -- registration ----------------------------------------------------------------------


def register(sub: SubParsers, *, logs: SubParsers, policy: SubParsers) -> None:
    """Add ``replay``, ``log export|import`` and ``policy impact`` (and ``policy set
    --dry-run``) to the parser built by :func:`cli.main.build_parser` (``sub``: its
    commands; ``logs``, ``policy``: the actions of ``log`` and ``policy``)."""
    add = add_command

    def source(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--from-export", metavar="FILE", help="read a log export instead of the data directory")
        p.add_argument("--cache-dir", help="where replay snapshots are kept (outside the data directory)")
        p.add_argument("--no-cache", action="store_true", help="keep snapshots in memory only")
        return p

    rs = add_group(sub, "replay", "Answer questions about the past from the log (offline, read-only).")
    at_help = "a sequence number or an RFC 3339 time (default: the head)"
    p = source(add(rs, "state", "Users, nodes and the policy in force at a point.", _guard(cmd_state)))
    p.add_argument("--at", help=at_help)
    p = source(add(rs, "netmap", "The netmap a node would have received (no presence). The table cites "
                   "the policy.set in force and the event that last changed the node and each peer; "
                   "-o json prints the MapResponse alone, exactly as the server computes it.", _guard(cmd_netmap)))
    p.add_argument("node", help="id, name or IP")
    p.add_argument("--at", help=at_help)
    p.add_argument("--cite", action="store_true",
                   help='with -o json: print {"netmap": <the MapResponse, unchanged>, "cites": {"at_seq", '
                        '"node", "policy", "peers"}}, the events the map rests on (without it, the '
                        "MapResponse alone)")
    p = source(add(rs, "diff", "What changed between two points, with the events that caused it.", _guard(cmd_diff)))
    p.add_argument("--from", dest="from_", required=True, help=at_help)
    p.add_argument("--to", help=at_help)
    p = source(add(rs, "reach", "The intervals during which SRC could reach DST.", _guard(cmd_reach)))
    p.add_argument("src", help="id, name or IP")
    p.add_argument("dst", help="id, name or IP (any address: through subnet routes and exit nodes)")
    p.add_argument("--port")
    p.add_argument("--proto", choices=["tcp", "udp", "icmp"])
    p.add_argument("--from", dest="from_", help="a sequence number or an RFC 3339 time (default: the first event)")
    p.add_argument("--to", help=at_help)
    p.add_argument("--format", choices=["text", "svg", "html"], default="text",
                   help="svg/html: draw the timeline instead")
    p = source(add(rs, "who-can-reach", "Every node that could reach DST[:PORT] at a point.", _guard(cmd_who_can_reach)))
    p.add_argument("dst", help="DST or DST:PORT ([v6]:port); DST is an id, name or IP")
    p.add_argument("--proto", choices=["tcp", "udp", "icmp"])
    p.add_argument("--at", help=at_help)

    p = source(add(logs, "export", "Write the log as JSONL (one verified event per line).", _guard(cmd_export)))
    p.add_argument("--from", dest="from_", help="start after this point (default: the first event)")
    p.add_argument("--to", help="end at this point (default: the head)")
    p.add_argument("-f", "--file", help="output file (default: stdout)")
    p = add(logs, "import", "Build a fresh log from an export, verifying the chain (a new --data directory, or the configured empty PostgreSQL database).", _guard(cmd_import))
    p.add_argument("file")

    p = source(add(policy, "impact", "What a policy file would change against the current tailnet.",
                   _guard(cmd_policy_impact)))
    p.add_argument("file")
    p.add_argument("--offline", action="store_true", help="read the log even when a server is running")
    setp = policy.choices["set"]
    source(setp)
    setp.add_argument("--dry-run", action="store_true",
                      help="print the impact against the current tailnet and append nothing")
    setp.add_argument("--offline", action="store_true", help="with --dry-run: read the log, not the server")
    setp.add_argument("--no-impact", action="store_true",
                      help="do not compute the impact summary recorded with the event (large tailnets)")

    def policy_set(args: argparse.Namespace) -> int:
        if args.dry_run:
            return _guard(cmd_policy_impact)(args)
        return cmd_policy_set(args)

    setp.set_defaults(func=policy_set)
