"""Compare engine output with a conformance case's ``expect``.

The rules are the conformance README's: content is compared strictly, order
leniently -- every list is a set except the SSH ``rules`` list, whose order
is meaning; an empty value equals an absent one; cap maps keep their
null-valued keys (the key's presence is the capability). Capabilities that
describe hosted-only tailnet state are removed from both sides first.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

__all__ = ["CONFORMANCE_DIR", "HOSTED_ONLY_CAPS", "case_paths", "diff_case", "normalise"]

#: ``../shared/conformance`` relative to the repository root, or the folder
#: ``TAILLEDGER_CONFORMANCE_DIR`` names (for a checkout elsewhere, e.g. a worktree).
CONFORMANCE_DIR: Final = Path(
    os.environ.get("TAILLEDGER_CONFORMANCE_DIR")
    or Path(__file__).resolve().parents[3].parent / "shared" / "conformance"
)

#: Hosted-only SelfNode/peer caps (README list). ``default-auto-update`` is
#: added: its presence follows a tailnet setting the cases do not record
#: (``tailnet_settings.settings`` is empty in every case, yet 159 cases carry
#: the cap and 460 do not).
HOSTED_ONLY_CAPS: Final = frozenset(
    {
        "https://tailscale.com/cap/is-admin",
        "https://tailscale.com/cap/is-owner",
        "https://tailscale.com/cap/tailnet-lock",
        "tailnet-display-name",
        "probe-udp-lifetime",
        "ssh-behavior-v1",
        "ssh-env-vars",
        "store-appc-routes",
        "https://tailscale.com/cap/max-key-duration",
        "max-key-duration",
        "native-ipv4",
        "service-host",
        "https://tailscale.com/cap/warn-funnel-no-https",
        "warn-funnel-no-https",
        "default-auto-update",
    }
)
_HOSTED_PREFIXES: Final = ("https://tailscale.com/cap/funnel-ports",)

#: Categories whose captures recorded WhoIs answers. The capture tool only
#: queried WhoIs for grant scenarios (its ``capture_whois`` option); elsewhere
#: an absent ``whois_cap_map`` means "not recorded", not "empty".
WHOIS_CATEGORIES: Final = frozenset({"grant"})

#: The capture anonymiser rewrote the tailnet's original user domain to
#: ``example.com`` in policies and topologies but not in API error bodies.
#: Expected messages get the same rewrite (case preserved) before comparing.
_ANONYMISED_DOMAINS: Final = (("passkey", "example.com"),)

#: Keys whose dict values are capability maps (null values are meaningful).
_CAP_MAP_KEYS: Final = frozenset({"cap_map", "CapMap"})


def case_paths() -> list[Path]:
    """Every case file, sorted by category then name."""
    return sorted(CONFORMANCE_DIR.glob("*/*.json"))


def _strip_hosted(caps: Mapping[str, object]) -> dict[str, object]:
    return {
        k: v
        for k, v in caps.items()
        if k not in HOSTED_ONLY_CAPS and not k.startswith(_HOSTED_PREFIXES)
    }


def normalise(value: object, *, key: str = "", ordered: bool = False) -> object:
    """Canonical form: empties dropped, lists as sorted sets (except SSH rules).

    Inside a capability map (``key`` in ``cap_map``/``CapMap``) a null value
    is kept: the key's presence is the capability.
    """
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            n = normalise(v, key=k, ordered=(k == "rules"))
            if key not in _CAP_MAP_KEYS and (n is None or n == [] or n == {}):
                continue
            out[k] = n
        return out
    if isinstance(value, list):
        items = [normalise(v, key=key) for v in value]
        if ordered:
            return items
        return sorted({json.dumps(i, sort_keys=True) for i in items})
    return value


def _node_view(raw: Mapping[str, object]) -> dict[str, object]:
    peers = raw.get("peers") or {}
    assert isinstance(peers, dict)
    caps = raw.get("cap_map") or {}
    assert isinstance(caps, dict)
    whois = raw.get("whois_cap_map") or {}
    assert isinstance(whois, dict)
    view = {
        "packet_filter": normalise(raw.get("packet_filter") or []),
        "peers": {
            name: normalise(
                {
                    "allowed_ips": p.get("allowed_ips") or [],
                    "primary_routes": p.get("primary_routes") or [],
                    "cap_map": _strip_hosted(p.get("cap_map") or {}),
                }
            )
            for name, p in peers.items()
        },
        "cap_map": normalise(_strip_hosted(caps), key="cap_map"),
        "self_allowed_ips": normalise(raw.get("self_allowed_ips") or []),
        "self_primary_routes": normalise(raw.get("self_primary_routes") or []),
        "ssh_policy": normalise({"ssh_policy": raw.get("ssh_policy")}),
        "whois_cap_map": {ip: normalise(c, key="cap_map") for ip, c in whois.items()},
    }
    return view


def anonymise(message: str) -> str:
    """Apply the capture's domain anonymisation to an API error message."""
    for original, replacement in _ANONYMISED_DOMAINS:

        def swap(match: re.Match[str], replacement: str = replacement) -> str:
            return replacement.upper() if match.group(0).isupper() else replacement

        message = re.sub(original, swap, message, flags=re.IGNORECASE)
    return message


def diff_case(case: Mapping[str, object], result: Mapping[str, object]) -> list[str]:
    """Differences between ``expect`` and the evaluator's ``result``.

    Returns:
        Human-readable differences; empty when the case fully matches.
    """
    problems: list[str] = []
    if bool(case["accepted"]) != bool(result["accepted"]):
        problems.append(
            f"verdict: want accepted={case['accepted']} got {result['accepted']} ({result['error']})"
        )
        return problems
    if not case["accepted"]:
        body = case.get("api_response_body") or {}
        want = body.get("message") if isinstance(body, dict) else None
        if want is not None:
            want = anonymise(want)
        if want != result["error"]:
            problems.append(f"error: want {want!r} got {result['error']!r}")
    expect = case["expect"]
    nodes = result["nodes"]
    assert isinstance(expect, dict) and isinstance(nodes, dict)
    for name, raw in expect.items():
        got_raw = nodes.get(name)
        if got_raw is None:
            problems.append(f"{name}: node missing from output")
            continue
        want_view = _node_view(raw)
        got_view = _node_view(got_raw)
        for field, want_value in want_view.items():
            if field == "whois_cap_map" and case.get("category") not in WHOIS_CATEGORIES:
                continue
            got_value = got_view[field]
            if field == "peers":
                assert isinstance(want_value, dict) and isinstance(got_value, dict)
                for peer in sorted(set(want_value) | set(got_value)):
                    if peer not in got_value:
                        problems.append(f"{name}: peer {peer} not visible")
                    elif peer not in want_value:
                        problems.append(f"{name}: peer {peer} visible but should not be")
                    elif want_value[peer] != got_value[peer]:
                        problems.append(
                            f"{name}: peer {peer}: want {json.dumps(want_value[peer])} got {json.dumps(got_value[peer])}"
                        )
            elif want_value != got_value:
                problems.append(
                    f"{name}: {field}: want {json.dumps(want_value)} got {json.dumps(got_value)}"
                )
    return problems
