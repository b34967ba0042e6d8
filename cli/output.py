"""Printing results: readable tables by default, JSON with ``-o json``.

Much of what is printed was written by nodes, not operators (hostnames, OS names,
routes) and may hold terminal escape sequences or bidirectional overrides meant to
rewrite the operator's screen. Every table cell, every log line and every JSON
document goes through :func:`terminal_safe` (or its JSON twin), which shows each
non-printable character as a visible escape such as ``\\x1b`` or ``\\u202e``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import TextIO

import msgspec

__all__ = ["print_json", "print_table", "render_table", "terminal_safe"]

# Characters that may be unprintable: all but printable ASCII, the newline and the tab
# (harmless; multi-line texts such as a policy hold them). Table cells escape those too.
_SUSPECT = re.compile(r"[^\x20-\x7e\n\t]")


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def terminal_safe(text: str) -> str:
    """``text`` with every character a terminal would not simply print (controls such
    as ESC, DEL and C1, bidi overrides, line separators...) shown as an escape."""
    return _SUSPECT.sub(lambda m: m.group() if m.group().isprintable() else _escape(m.group()), text)


def _json_escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON spells it
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def print_json(data: object, out: TextIO | None = None) -> None:
    """Pretty JSON; unprintable characters in strings are written as ``\\uXXXX`` escapes
    (still the same JSON value, but harmless on a terminal)."""
    out = out or sys.stdout  # looked up per call: stdout may be redirected after import
    text = msgspec.json.format(msgspec.json.encode(data), indent=2).decode()
    out.write(_SUSPECT.sub(_json_escape, text) + "\n")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return _cell(",".join(str(v) for v in value)) if value else "-"
    return terminal_safe(str(value).replace("\n", "\\n").replace("\t", "\\t"))


def render_table(rows: Sequence[dict[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain aligned table; ``columns`` are ``(key, heading)`` pairs."""
    cells = [[heading for _, heading in columns]]
    cells += [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def print_table(
    rows: Sequence[dict[str, object]], columns: Sequence[tuple[str, str]], out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    out.write(render_table(rows, columns))
