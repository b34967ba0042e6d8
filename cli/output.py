"""Printing results: readable tables by default, JSON with ``-o json``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

import msgspec

__all__ = ["print_json", "print_table", "render_table"]


def print_json(data: object, out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up per call: stdout may be redirected after import
    out.write(msgspec.json.format(msgspec.json.encode(data), indent=2).decode() + "\n")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


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
