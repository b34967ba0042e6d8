"""``tailledger policy evaluate CASE.json ...``: run conformance cases.

Role: a thin adapter over :mod:`projections.policy`. For each case file it
builds the tailnet (users, nodes with their addresses, tags, advertised and
approved routes), loads the policy through the same path the server uses
(parse, check, compile) and prints one JSON line::

    {"id": ..., "accepted": bool, "error": str | null,
     "nodes": {name: {"packet_filter": [...], "peers": {...}, "cap_map": {...},
                      "ssh_policy": {...} | null, "whois_cap_map": {...},
                      "self_allowed_ips": [...], "self_primary_routes": [...]}}}

A rejected policy leaves the tailnet on its previous policy; for a case that
is Tailscale's default (allow everything), so ``nodes`` shows what the
server would still send.

Node ids. Ids order registration, and registration decides route failover:
the lowest id serving a prefix is primary ("first advertiser wins"). A case
node may carry an ``id`` (used as is) or a ``created`` timestamp (when every
node has one, nodes are numbered in that order); otherwise nodes are numbered
in file order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import msgspec

from projections.policy import (
    CompiledPolicy,
    PolicyError,
    PolicyNode,
    PolicyUser,
    Tailnet,
    compile_policy,
    parse_policy,
)
from projections.policy.check import check_policy_against

__all__ = ["CONTROL_URL", "evaluate_case", "evaluate_main"]

#: Server URL used in SSH check-mode callbacks. The conformance captures
#: were anonymised to this placeholder.
CONTROL_URL = "https://unused"

#: A decoded JSON value.
JSON = object


def evaluate_main(paths: list[str], out: TextIO) -> int:
    """Evaluate each case file in order, printing one JSON line per case.

    Args:
        paths: case files.
        out: where the JSON lines go.

    Returns:
        0 when every case was evaluated (rejected policies included); 1 when
        a file could not be read or is not a case.
    """
    status = 0
    for path in paths:
        try:
            case = json.loads(Path(path).read_text(encoding="utf-8"))
            result = evaluate_case(case)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            out.write(
                json.dumps({"id": None, "path": path, "error": f"cannot evaluate: {exc}"}) + "\n"
            )
            status = 1
            continue
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
    return status


def evaluate_case(case: Mapping[str, JSON]) -> dict[str, JSON]:
    """Evaluate one decoded case.

    Args:
        case: the case object (``policy``, ``users``, ``nodes``, ...).

    Returns:
        The result object of the command contract.
    """
    tailnet = build_tailnet(case)
    text = _policy_text(case["policy"])
    accepted, error = True, None
    try:
        policy = parse_policy(text)
        check_policy_against(policy, tailnet)
    except PolicyError as exc:
        accepted, error = False, exc.message
        policy = parse_policy("{}")
    compiled = compile_policy(policy, tailnet, control_url=CONTROL_URL)
    return {
        "id": case.get("id"),
        "accepted": accepted,
        "error": error,
        "nodes": render_nodes(compiled),
    }


def _policy_text(policy: JSON) -> str:
    # Cases carry the policy either as HuJSON text or as an already decoded object.
    if isinstance(policy, str):
        return policy
    return json.dumps(policy, indent=2, ensure_ascii=False)


def build_tailnet(case: Mapping[str, JSON]) -> Tailnet:
    """Users and nodes of a case as a :class:`Tailnet`, numbered in join order."""
    raw_users = case.get("users") or []
    raw_nodes = case.get("nodes") or {}
    assert isinstance(raw_users, list) and isinstance(raw_nodes, dict)
    users = [
        PolicyUser(
            id=int(u["id"]),
            login=str(u.get("email") or u["name"]),
            name=str(u["name"]),
            role=str(u.get("role") or "member"),
        )
        for u in raw_users
    ]
    by_name = {u.name: u.id for u in users}
    names = list(raw_nodes)
    if all("created" in raw_nodes[n] for n in names):
        names.sort(key=lambda n: _created_key(str(raw_nodes[n]["created"])))
    nodes: list[PolicyNode] = []
    for index, name in enumerate(names, start=1):
        spec = raw_nodes[name]
        user = spec.get("user")
        nodes.append(
            PolicyNode(
                id=int(spec.get("id", index)),
                name=name,
                user_id=by_name.get(user) if isinstance(user, str) else None,
                tags=tuple(spec.get("tags") or ()),
                ipv4=spec.get("ipv4"),
                ipv6=spec.get("ipv6"),
                routable_ips=tuple(spec.get("routable_ips") or ()),
                approved_routes=tuple(spec.get("approved_routes") or ()),
            )
        )
    return Tailnet(users, nodes)


def _created_key(text: str) -> tuple[datetime, int]:
    """An RFC 3339 time as (whole seconds, nanoseconds), for ordering.

    Go writes ``created`` with up to nine fractional digits and drops trailing
    zeros, so the strings do not sort as text (``.5Z`` is before ``.55Z``).

    Raises:
        ValueError: the text is not an RFC 3339 time.
    """
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"created: {text!r} is not an RFC 3339 time")
    whole = datetime.fromisoformat(match["whole"] + match["zone"].replace("z", "Z"))
    if whole.tzinfo is None:
        raise ValueError(f"created: {text!r} has no time zone")
    nanos = int((match["frac"] or "").ljust(9, "0")[:9] or "0")
    return whole.astimezone(UTC), nanos


_RFC3339 = re.compile(
    r"(?P<whole>\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d+))?"
    r"(?P<zone>[Zz]|[+-]\d{2}:\d{2})"
)


def render_nodes(compiled: CompiledPolicy) -> dict[str, JSON]:
    """Every node's policy output as plain JSON values, keyed by node name."""
    names = {i: info.node.name for i, info in compiled.tailnet.nodes.items()}
    out: dict[str, JSON] = {}
    for node_id in sorted(names, key=names.__getitem__):
        view = compiled.netmap(node_id)
        out[names[node_id]] = {
            "packet_filter": _plain(view.packet_filter),
            "peers": {
                names[p.node_id]: {
                    "allowed_ips": list(p.allowed_ips),
                    "primary_routes": list(p.primary_routes),
                    "cap_map": _plain(p.cap_map),
                }
                for p in view.peers
            },
            "cap_map": _plain(view.cap_map),
            "ssh_policy": _plain(view.ssh_policy),
            "whois_cap_map": _plain(view.whois_cap_map),
            "self_allowed_ips": list(view.allowed_ips),
            "self_primary_routes": list(view.primary_routes),
        }
    return out


def _plain(value: object) -> JSON:
    """Structs (and Raw cap values) to plain JSON values."""
    return json.loads(msgspec.json.encode(value))
