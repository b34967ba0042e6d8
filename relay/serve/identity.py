"""The relay's identity at startup: its DERP key, its TLS certificate, its mesh key.

Theory of operation
-------------------
Before the first listener opens, :func:`relay.serve.serve_relay` needs three
things, all derived from the :class:`~relay.serve.config.RelayConfig`:

* the **DERP private key** (the relay's Curve25519 identity, announced in the
  ServerKey frame): ``private_key`` from the configuration, or the key file in
  ``data_dir``, created on first start (:func:`relay.certs.load_or_create_server_key`);
* the **TLS material** for the listener, by ``tls``: ``"self-signed"`` (made
  on first start for ``hostnames`` and pinned through the DERP map's
  CertName), ``"files"`` (``cert_file`` + ``key_file``), or ``"off"`` (none,
  plain HTTP behind a TLS-terminating proxy); with ``meta_cert`` the server
  context also carries the meta certificate that lets clients skip the HTTP
  upgrade round trip (fast start);
* the **mesh key** shared by the relays of a region, 32 bytes from 64 hex digits.

:func:`load_identity` does blocking file I/O (keys and certificates; see
:mod:`relay.certs`), so the adapter runs it in a worker thread.
:func:`parse_mesh_key` is pure.  Both raise
:class:`relay.errors.ConfigError` for anything unusable, before any socket
is bound, so a bad configuration changes nothing.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ..certs import (
    TlsMaterial,
    generate_meta_cert,
    load_cert_files,
    load_or_create_self_signed,
    load_or_create_server_key,
    server_ssl_context,
)
from ..errors import ConfigError
from ..keys import parse_private_key, public_key_of
from .config import RelayConfig

__all__ = ["load_identity", "parse_mesh_key"]


def load_identity(config: RelayConfig) -> tuple[bytes, TlsMaterial | None, ssl.SSLContext | None]:
    """Blocking startup work: keys and certificates (run in a worker thread)."""
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    if config.private_key is not None:
        private_key = parse_private_key(config.private_key)
    else:
        private_key = load_or_create_server_key(config.data_dir)
    material: TlsMaterial | None = None
    ctx: ssl.SSLContext | None = None
    if config.tls == "self-signed":
        material = load_or_create_self_signed(config.data_dir, config.hostnames)
    elif config.tls == "files":
        if config.cert_file is None or config.key_file is None:
            raise ConfigError('tls="files" needs cert_file and key_file')
        material = load_cert_files(config.cert_file, config.key_file)
    if material is not None:
        meta = generate_meta_cert(public_key_of(private_key)) if config.meta_cert else None
        ctx = server_ssl_context(material, config.data_dir, meta_cert_pem=meta)
    return private_key, material, ctx


def parse_mesh_key(text: str | None) -> bytes | None:
    """The region's mesh key from its 64 hex digits; ``None`` when meshing is off."""
    if text is None:
        return None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise ConfigError("mesh key must be 64 hexadecimal digits") from exc
    if len(key) != 32:
        raise ConfigError("mesh key must be 64 hexadecimal digits")
    return key
