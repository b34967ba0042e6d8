"""Audit events: facts about the log itself that an auditor must see in it."""

from __future__ import annotations

from .base import Event

__all__ = ["ChainErrorsIgnored"]


class ChainErrorsIgnored(Event, frozen=True, kw_only=True, tag="log.chain_errors_ignored"):
    """The server was started although the log failed verification
    (``serve --ignore-chain-errors``): from ``first_bad`` on, for ``reason``, it could not
    be proven. Changes no state; it is there so the override is never silent."""

    first_bad: int
    reason: str
    head_seq: int
    head_hash: str
