"""Errors of the projections package.

:class:`CommandError` is what a refused command raises: its message is shown to the
person or client that asked, unchanged, and nothing was appended.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CommandError",
    "ConflictError",
    "NotFoundError",
    "ProjectionError",
    "UnavailableError",
]


class ProjectionError(Exception):
    """Base class of the errors raised here."""


class CommandError(ProjectionError):
    """A command was refused; the message says why, for the person who asked."""


class NotFoundError(CommandError):
    """The command names a user, node or key that does not exist."""


class ConflictError(CommandError):
    """The command would break a uniqueness rule (a duplicate name, a reused key)."""


class UnavailableError(CommandError):
    """The command was decided but the log could not record it (a full disk, a failed
    store): nothing was appended, and the same command may succeed later."""


class CheckpointError(ProjectionError):
    """A checkpoint could not be saved. Checkpoints are only a cache: the next start
    folds a longer tail, nothing else changes."""
