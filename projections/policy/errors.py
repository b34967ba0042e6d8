"""Errors raised by the policy engine.

Role in the pipeline: the policy is user input. Everything wrong with it
surfaces as a :class:`PolicyError` carrying the message Tailscale's control
plane would answer with (``api_response_body.message`` in the conformance
cases) plus, where the text lets us know it, the 1-based line and column of
the offending key or value. Adapters turn these into an HTTP 400 with
``{"message": ...}``; nothing in this package catches them.

The hierarchy is deliberately small (style rule 20):

* :class:`PolicySyntaxError` -- the text is not HuJSON.
* :class:`PolicyValidationError` -- well-formed but invalid (unknown key,
  undefined tag, bad port range, autogroup where it is not allowed, ...).
* :class:`PolicyTestFailure` -- the policy's own ``tests``/``sshTests``
  block failed; the message is Tailscale's literal ``test(s) failed`` and
  :attr:`PolicyTestFailure.failures` holds the per-assertion detail.
"""

from __future__ import annotations

__all__ = [
    "PolicyError",
    "PolicySyntaxError",
    "PolicyTestFailure",
    "PolicyValidationError",
]


class PolicyError(Exception):
    """Base class: a policy was rejected.

    Attributes:
        message: the Tailscale-compatible message (what ``str(err)`` gives).
        line: 1-based line of the offending token, or None when unknown.
        column: 1-based column of the offending token, or None.
    """

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column

    def __str__(self) -> str:
        return self.message

    def located(self) -> str:
        """The message prefixed with ``line:column:`` when a location is known."""
        if self.line is None:
            return self.message
        return f"{self.line}:{self.column}: {self.message}"


class PolicySyntaxError(PolicyError):
    """The policy text is not valid HuJSON (JSON with comments and trailing commas)."""


class PolicyValidationError(PolicyError):
    """The policy parsed but breaks one of Tailscale's validation rules."""


class PolicyTestFailure(PolicyError):
    """An assertion in the policy's ``tests`` or ``sshTests`` block failed.

    Attributes:
        failures: human-readable detail, one line per failed assertion. The
            message itself stays Tailscale's terse ``test(s) failed``.
    """

    def __init__(
        self,
        failures: tuple[str, ...],
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__("test(s) failed", line, column)
        self.failures = failures
