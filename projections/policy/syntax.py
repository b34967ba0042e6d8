"""Small grammars inside policy strings: aliases, ports, protocols, durations.

Role in the pipeline: ``parse.py`` walks the JSON structure and hands every
leaf string to one of these functions. They are pure and raise
:class:`SyntaxProblem` with Tailscale's wording *without* location or
context; the caller wraps the text with the context Tailscale adds (for
example ``dst="tag:server:ssh": port range "ssh": invalid first integer``)
and the source position.

References: Tailscale's policy syntax (tailscale.com/kb/1337) and
headscale's ``policy/v2/types.go`` (``parseAlias``, ``parsePortRange``,
``Protocol``), whose messages were aligned with the hosted control plane.
"""

from __future__ import annotations

import re
from typing import Final

from .document import ALL_PORTS, Alias, AliasKind, PortRange
from .ipset import parse_prefix

__all__ = [
    "PROTOCOL_NAMES",
    "SyntaxProblem",
    "format_go_duration",
    "parse_alias",
    "parse_go_duration",
    "parse_ports",
    "parse_protocol",
    "split_host_port",
]


class SyntaxProblem(Exception):
    """A leaf string is malformed; ``str()`` is Tailscale's wording."""


#: Protocol names Tailscale accepts in ``proto`` and grant ``ip`` entries,
#: with their IANA numbers. ``icmp`` means ICMPv4 only (use ``ipv6-icmp``).
PROTOCOL_NAMES: Final[dict[str, int]] = {
    "icmp": 1,
    "igmp": 2,
    "ipv4": 4,
    "ip-in-ip": 4,
    "tcp": 6,
    "egp": 8,
    "igp": 9,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "sctp": 132,
    "fc": 133,
}

_KNOWN_AUTOGROUPS: Final = frozenset(
    {
        "autogroup:internet",
        "autogroup:member",
        "autogroup:members",
        "autogroup:tagged",
        "autogroup:self",
        "autogroup:nonroot",
        "autogroup:danger-all",
        "autogroup:admin",
        "autogroup:owner",
        "autogroup:it-admin",
        "autogroup:network-admin",
        "autogroup:billing-admin",
        "autogroup:auditor",
        "autogroup:shared",
    }
)


def parse_alias(raw: str) -> Alias:
    """Classify one alias string (surrounding whitespace is ignored).

    Precedence follows Tailscale: IP/CIDR, ``*``, ``user:*@domain``,
    anything with ``@`` (a login), ``group:``, ``tag:``, ``autogroup:``, and
    finally a bare name, which must be a ``hosts`` entry.

    Raises:
        SyntaxProblem: for a string no rule accepts (e.g. ``foo:bar``).
    """
    text = raw.strip()
    if not text:
        raise SyntaxProblem('"": invalid address')
    if _looks_like_ip(text):
        try:
            parse_prefix(text)
        except ValueError:
            pass
        else:
            return Alias(AliasKind.PREFIX, text)
    if text == "*":
        return Alias(AliasKind.WILDCARD, "*")
    if text.startswith("user:"):
        rest = text[len("user:") :]
        if rest.startswith("*@"):
            return Alias(AliasKind.USER_DOMAIN, rest[2:])
        return Alias(AliasKind.USER, rest)
    if "@" in text:
        return Alias(AliasKind.USER, text)
    if text.startswith("group:"):
        return Alias(AliasKind.GROUP, text)
    if text.startswith("tag:"):
        return Alias(AliasKind.TAG, text)
    if text.startswith("autogroup:"):
        return Alias(AliasKind.AUTOGROUP, text)
    if ":" not in text and _HOST_NAME.match(text):
        return Alias(AliasKind.HOST, text)
    raise SyntaxProblem(f'"{text}": invalid address')


def is_known_autogroup(text: str) -> bool:
    """Report whether ``text`` names an autogroup Tailscale defines."""
    return text in _KNOWN_AUTOGROUPS


_HOST_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _looks_like_ip(text: str) -> bool:
    head = text.split("/", 1)[0]
    return bool(head) and (head[0].isdigit() or ":" in head) and not text.startswith("tag:")


def split_host_port(text: str) -> tuple[str, str]:
    """Split an ACL destination ``host:ports`` at the last colon.

    ``[v6]:port`` brackets are honoured. Splitting at the *last* colon is why
    ``autogroup:self`` without a port reports port range ``"self"``.

    Raises:
        SyntaxProblem: when there is no colon at all.
    """
    stripped = text.strip()
    if stripped.startswith("["):
        close = stripped.find("]")
        if close > 0 and stripped[close + 1 : close + 2] == ":":
            return stripped[1:close], stripped[close + 2 :]
    idx = stripped.rfind(":")
    if idx < 0:
        raise SyntaxProblem("missing port")
    return stripped[:idx], stripped[idx + 1 :]


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """Parse ``*``, ``22``, ``80-90`` or a comma list of those.

    Raises:
        SyntaxProblem: with the reason only (``invalid first integer``,
            ``first port must be >0, or use '*' for wildcard`` ...); callers
            add the ``port range "..."`` context.
    """
    if text == "*":
        return (ALL_PORTS,)
    out: list[PortRange] = []
    for part in text.split(","):
        first_text, dash, last_text = part.partition("-")
        first = _port_number(first_text, "first")
        last = _port_number(last_text, "last") if dash else first
        if first == 0:
            raise SyntaxProblem("first port must be >0, or use '*' for wildcard")
        if last < first:
            raise SyntaxProblem("last port must be >= first port")
        out.append(PortRange(first, last))
    return tuple(out)


def _port_number(text: str, which: str) -> int:
    # Go's strconv.ParseUint(text, 10, 16): digits only, at most 65535.
    if not text.isdigit() or not text.isascii() or int(text) > 65535:
        raise SyntaxProblem(f"invalid {which} integer")
    return int(text)


def parse_protocol(text: str) -> tuple[int, ...]:
    """Parse a ``proto`` value: a name, an IANA number, or "" (default set).

    Returns:
        ``()`` for the default set, else a one-element tuple.

    Raises:
        SyntaxProblem: for ``*``, an unknown name, a leading zero or a
            number outside 0-255.
    """
    value = text.strip().lower()
    if value == "":
        return ()
    if value in PROTOCOL_NAMES:
        return (PROTOCOL_NAMES[value],)
    if value == "*":
        raise SyntaxProblem(
            'proto name "*" not known; use protocol number 0-255 or protocol name (icmp, tcp, udp, etc.)'
        )
    if value.isdigit() and value.isascii():
        if value[0] == "0":
            raise SyntaxProblem(f'leading 0 not permitted in protocol number "{value}"')
        number = int(value)
        if number > 255:
            raise SyntaxProblem(f"protocol number out of range (0-255): {number}")
        return (number,)
    raise SyntaxProblem(
        f'proto name "{value}" not known; use protocol number 0-255 or protocol name (icmp, tcp, udp, etc.)'
    )


# ---------------------------------------------------------------------------
# Go durations (time.ParseDuration / Duration.String), used by checkPeriod.

_UNITS: Final[dict[str, int]] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART: Final = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def parse_go_duration(text: str) -> int:
    """Parse like Go's ``time.ParseDuration``; returns nanoseconds.

    Raises:
        SyntaxProblem: ``time: invalid duration "abc"`` and friends.
    """
    quoted = f'"{text}"'
    rest = text
    sign = 1
    if rest[:1] in "+-" and rest:
        sign = -1 if rest[0] == "-" else 1
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise SyntaxProblem(f"time: invalid duration {quoted}")
    total = 0
    while rest:
        match = _DURATION_PART.match(rest)
        if match is None or match.end() == 0:
            raise SyntaxProblem(f"time: invalid duration {quoted}")
        whole, frac, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not frac:
            raise SyntaxProblem(f"time: invalid duration {quoted}")
        if not unit:
            raise SyntaxProblem(f"time: missing unit in duration {quoted}")
        if unit not in _UNITS:
            raise SyntaxProblem(f'time: unknown unit "{unit}" in duration {quoted}')
        scale = _UNITS[unit]
        value = int(whole or "0") * scale
        if frac:
            value += int(frac) * scale // (10 ** len(frac))
        total += value
        rest = rest[match.end() :]
    return sign * total


def format_go_duration(nanoseconds: int) -> str:
    """Render nanoseconds like Go's ``time.Duration.String``."""
    if nanoseconds == 0:
        return "0s"
    sign = "-" if nanoseconds < 0 else ""
    ns = abs(nanoseconds)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("\u00b5s", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _decimal(ns, size) + unit
    hours, rem = divmod(ns, 3_600_000_000_000)
    minutes, rem = divmod(rem, 60_000_000_000)
    seconds = _decimal(rem, 1_000_000_000)
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{sign}{minutes}m{seconds}s"
    return f"{sign}{seconds}s"


def _decimal(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}." + f"{frac:0{digits}d}".rstrip("0")
