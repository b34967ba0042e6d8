"""The signing key and the log's proof, as the server and the CLI use them.

The key file is ``audit.signing_key_file`` (outside the data directory; see
:class:`cli.config.AuditConfig`). The server creates it on its first start; the CLI only
reads it, to learn the public key when none is configured.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from eventlog.signing import (
    Signer,
    anchor_path,
    load_or_create_signing_key,
    load_signing_key,
    parse_public_key,
)

from .config import Config, default_signing_key_path

__all__ = ["SigningKeyError", "anchor_file", "key_path", "mac_key_for", "open_signer", "trusted_public_key"]

log = logging.getLogger("tailledger")


class SigningKeyError(Exception):
    """The signing or public key cannot be had; the message says why."""


def key_path(config: Config) -> Path:
    """The signing key's file (its default when a Config was built without
    :func:`~cli.config.load_config`, which fills it in)."""
    if config.audit.signing_key_file:
        return Path(config.audit.signing_key_file)
    return default_signing_key_path(None, os.environ)


def anchor_file(config: Config) -> Path:
    """Where the server keeps the newest anchor line of its log (beside the key)."""
    return anchor_path(key_path(config), config.database_path)


def open_signer(config: Config) -> Signer:
    """The server's signer, creating the key (0600) on the first start.

    Raises:
        SigningKeyError: the key file cannot be read or created, or holds no key.
    """
    path = key_path(config)
    try:
        signer, created = load_or_create_signing_key(path)
    except (OSError, ValueError) as exc:
        raise SigningKeyError(f"audit.signing_key_file: {exc}") from None
    if created:
        log.warning(
            "created the log signing key %s (public key %s); keep a copy of the public key "
            "elsewhere to verify the log with",
            path, signer.public_key,
        )
    log.info("log signing key %s, public key %s", path, signer.public_key)
    return signer


def mac_key_for(config: Config) -> bytes | None:
    """The projection checkpoints' MAC key, when the signing key can be read."""
    try:
        signer = load_signing_key(key_path(config))
    except (OSError, ValueError):
        return None
    return signer.mac_key()


def trusted_public_key(config: Config, override: str | None = None) -> str | None:
    """The public key to verify with: ``--pubkey``, ``audit.public_key``, or the public
    half of the signing key when it can be read; ``None`` when none is available.

    Raises:
        SigningKeyError: ``override`` is not a public key.
    """
    text = override or config.audit.public_key
    if text:
        try:
            return parse_public_key(text)
        except ValueError as exc:
            raise SigningKeyError(f"--pubkey: {exc}") from None
    try:
        return load_signing_key(key_path(config)).public_key
    except (OSError, ValueError):
        return None

