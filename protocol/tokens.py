"""Unguessable ids that an administrator may paste into a command line."""

from __future__ import annotations

import secrets

__all__ = ["pasteable_token"]


def pasteable_token(nbytes: int) -> str:
    """``secrets.token_urlsafe(nbytes)`` that never begins with ``-``: an id pasted as a
    command's argument (``nodes register --key ID``, ``ssh approve ID``) is taken by
    argparse for an option when it does (one id in 64)."""
    while (token := secrets.token_urlsafe(nbytes)).startswith("-"):
        pass
    return token
