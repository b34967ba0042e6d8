"""Why events are appended: the correlation id and reason a request carries.

One request (an admin command, a client's login, a policy-file reload) may cause
several appends: they share one *correlation id*, and an admin command's ``--reason``
goes with each of them. The code that receives a request opens a cause with
:func:`caused_by`; every append made while it is open (in that task, or in tasks it
starts: a context variable) records that cause. An append outside of any cause gets a
fresh correlation id of its own.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Final

import msgspec

__all__ = ["MAX_REASON", "Cause", "caused_by", "check_reason", "current_cause", "new_correlation_id"]

#: The longest reason stored with an event (characters).
MAX_REASON: Final = 1000

_current: ContextVar[Cause | None] = ContextVar("tailledger_cause", default=None)


class Cause(msgspec.Struct, frozen=True, kw_only=True):
    """What the events of one request share."""

    correlation_id: str
    reason: str = ""


#: Correlation ids only tell requests apart (they guard nothing), so they come from a
#: generator seeded from the system's randomness, not a system call each: an append
#: that released the GIL for ``getrandom`` waited for the log's writer thread to give
#: it back (a sixth of ``tailledger bench log``'s appending side). Reseeded in a
#: forked child, which would otherwise repeat its parent's ids.
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def new_correlation_id() -> str:
    """A fresh random correlation id (16 hex digits)."""
    return f"{_ids.getrandbits(64):016x}"


def check_reason(reason: str) -> str:
    """``reason`` stripped, or :class:`ValueError` when it cannot be stored."""
    reason = reason.strip()
    if len(reason) > MAX_REASON:
        raise ValueError(f"the reason is longer than {MAX_REASON} characters")
    if any(ord(ch) < 32 and ch not in "\t" for ch in reason):
        raise ValueError("the reason must be one line of printable text")
    return reason


@contextmanager
def caused_by(*, reason: str = "", correlation_id: str | None = None) -> Iterator[Cause]:
    """Record every append made inside this block with one correlation id and reason.

    Nested blocks keep the outer correlation id unless given one, and the outer reason
    unless given one.

    Raises:
        ValueError: the reason is too long or not one line of text.
    """
    outer = _current.get()
    reason = check_reason(reason)
    cause = Cause(
        correlation_id=correlation_id or (outer.correlation_id if outer else new_correlation_id()),
        reason=reason or (outer.reason if outer else ""),
    )
    token = _current.set(cause)
    try:
        yield cause
    finally:
        _current.reset(token)


def current_cause() -> Cause | None:
    """The cause of the request being handled, if one was opened."""
    return _current.get()
