"""Human durations: ``90s``, ``30m``, ``1h30m``, ``7d``, ``2w``; ``0`` or ``never`` = none."""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["DurationError", "format_duration", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)([smhdw])")


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> timedelta | None:
    """Parse a duration; ``None`` for ``0``/``never``.

    Raises:
        DurationError: with a message naming the bad text.
    """
    t = text.strip().lower()
    if t in ("0", "never", "none"):
        return None
    pos, total = 0, 0
    for m in _PART.finditer(t):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(t) or not t:
        raise DurationError(
            f"malformed duration {text!r}: use a number and a unit (s, m, h, d, w), e.g. 90m or 1h30m"
        )
    if total == 0:
        return None
    try:
        return timedelta(seconds=total)
    except OverflowError:
        raise DurationError(f"duration {text!r} is too long") from None


def format_duration(td: timedelta) -> str:
    seconds = int(td.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "0s"
