"""Relay identity on disk: the DERP server key, the TLS certificate, the meta certificate.

Role in the pipeline
--------------------
Startup helpers for :mod:`relay.serve.identity`.  They are synchronous (file I/O plus
some crypto); the adapter runs them in a worker thread.

Files in the relay's data directory::

    derp-server.key     "privkey:<64 hex>"  the DERP server's Curve25519 key (0600)
    derp-tls-cert.pem   self-signed certificate (only in self-signed mode)
    derp-tls-key.pem    its EC P-256 private key (0600)
    derp-tls-chain.pem  what the TLS listener actually presents: the leaf (and
                        any chain from a cert file), then the meta certificate;
                        rewritten at every start

Self-signed mode and ``CertName``
---------------------------------
A DERP node in the DERP map may carry ``CertName = "sha256-raw:<hex>"``; the
Tailscale client then accepts exactly the certificate whose DER encoding has
that SHA-256, instead of asking a CA (``tlsdial.SetConfigExpectedCertHash``).
It still checks the host name it dialled against the certificate's SANs and
the validity period, so the generated certificate names every configured host
name and IP address (plus ``localhost`` and the loopback addresses) and is valid
for ten years.  The certificate is generated once and reused, so the CertName
published in the DERP map stays stable across restarts; it is regenerated only
when the configured names are no longer all covered.

The meta certificate
--------------------
Tailscale's derper appends a throw-away self-signed certificate whose subject
CN is ``derpkey<server public key hex>`` and whose serial number is the DERP
protocol version.  Under TLS 1.3 the certificate list is encrypted, and a
client that finds this certificate knows the server's DERP key before sending
its HTTP request, so it sends ``Derp-Fast-Start: 1`` and its ClientInfo at once
and saves a round trip.  Clients skip it when checking ``sha256-raw`` pins and
CA chains ignore it.  We generate a fresh one (Ed25519, 30 days either side of
now) at every start.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import warnings
from collections.abc import Sequence
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from .derp.frames import PROTOCOL_VERSION
from .errors import ConfigError
from .keys import format_private_key, generate_private_key, parse_private_key

__all__ = [
    "META_CERT_CN_PREFIX",
    "TlsMaterial",
    "cert_name_for",
    "generate_meta_cert",
    "generate_self_signed",
    "load_cert_files",
    "load_or_create_self_signed",
    "load_or_create_server_key",
    "server_ssl_context",
]

META_CERT_CN_PREFIX = "derpkey"
"""Subject CN prefix of the meta certificate (Tailscale's ``derpconst``)."""

SERVER_KEY_FILE = "derp-server.key"
SELF_SIGNED_CERT_FILE = "derp-tls-cert.pem"
SELF_SIGNED_KEY_FILE = "derp-tls-key.pem"
CHAIN_FILE = "derp-tls-chain.pem"

_DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


class TlsMaterial(msgspec.Struct, frozen=True, kw_only=True):
    """A certificate the relay can serve.

    Attributes:
        cert_pem: the certificate file's content (leaf first, then any chain).
        key_path: path of the PEM private key.
        cert_der: DER encoding of the leaf certificate.
        cert_name: ``sha256-raw:<hex>`` of ``cert_der``, for the DERP map.
        self_signed: whether we generated it.
    """

    cert_pem: bytes
    key_path: str
    cert_der: bytes
    cert_name: str
    self_signed: bool


def cert_name_for(cert_der: bytes) -> str:
    """Return the DERP map ``CertName`` that pins exactly this certificate."""
    return "sha256-raw:" + hashlib.sha256(cert_der).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def load_or_create_server_key(data_dir: str | os.PathLike[str]) -> bytes:
    """Return the relay's DERP private key, creating ``derp-server.key`` on first use.

    Raises:
        ConfigError: the file exists but does not hold a valid key.
    """
    path = Path(data_dir) / SERVER_KEY_FILE
    if path.exists():
        return parse_private_key(path.read_text(encoding="ascii"))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    _write_private(path, (format_private_key(key) + "\n").encode())
    return key


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in (*names, *_DEFAULT_NAMES):
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def generate_self_signed(
    names: Sequence[str],
    *,
    valid_days: int = 3650,
    ca: bool = False,
) -> tuple[bytes, bytes]:
    """Generate a self-signed EC P-256 certificate for ``names``.

    It carries subject and authority key identifiers, so verifiers in strict X.509
    mode (Python 3.13's default context) accept it as a trust anchor.

    Args:
        names: host names and IP literals clients will dial; ``localhost``,
            ``127.0.0.1`` and ``::1`` are always added.
        valid_days: validity period from one hour ago.
        ca: mark it a CA (``BasicConstraints ca=True``), for a peer that is given
            this certificate as its CA file (``oidc.ca_file``) rather than pinning it.

    Returns:
        ``(cert_pem, key_pem)``.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    first = next((n for n in names if n), "localhost")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        # macOS insists on BasicConstraints when subject == issuer.
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _covers(cert: x509.Certificate, names: Sequence[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    have |= set(san.get_values_for_type(x509.DNSName))
    for name in names:
        if not name:
            continue
        try:
            if str(ipaddress.ip_address(name)) not in have:
                return False
        except ValueError:
            if name not in have:
                return False
    return True


def load_or_create_self_signed(
    data_dir: str | os.PathLike[str],
    names: Sequence[str],
) -> TlsMaterial:
    """Return the self-signed certificate in ``data_dir``, creating it if needed.

    An existing certificate is reused (keeping ``CertName`` stable) unless it
    has expired or does not cover every name in ``names``.
    """
    directory = Path(data_dir)
    cert_path = directory / SELF_SIGNED_CERT_FILE
    key_path = directory / SELF_SIGNED_KEY_FILE
    if cert_path.exists() and key_path.exists():
        pem = cert_path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        now = datetime.datetime.now(datetime.UTC)
        if _covers(cert, names) and cert.not_valid_after_utc > now:
            der = cert.public_bytes(serialization.Encoding.DER)
            return TlsMaterial(
                cert_pem=pem,
                key_path=str(key_path),
                cert_der=der,
                cert_name=cert_name_for(der),
                self_signed=True,
            )
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = generate_self_signed(names)
    _write_private(key_path, key_pem)
    cert_path.write_bytes(cert_pem)
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return TlsMaterial(
        cert_pem=cert_pem,
        key_path=str(key_path),
        cert_der=der,
        cert_name=cert_name_for(der),
        self_signed=True,
    )


def load_cert_files(
    cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]
) -> TlsMaterial:
    """Load an operator-provided certificate (leaf first, then its chain) and key.

    Raises:
        ConfigError: a file is missing or the certificate does not parse.
    """
    try:
        pem = Path(cert_file).read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert_file}: {exc}") from exc
    if not Path(key_file).exists():
        raise ConfigError(f"TLS key file {key_file} does not exist")
    der = cert.public_bytes(serialization.Encoding.DER)
    return TlsMaterial(
        cert_pem=pem,
        key_path=str(key_file),
        cert_der=der,
        cert_name=cert_name_for(der),
        self_signed=False,
    )


def generate_meta_cert(server_public: bytes) -> bytes:
    """Return a PEM meta certificate announcing ``server_public`` (see module docs)."""
    key = ed25519.Ed25519PrivateKey.generate()
    # "derpkey" + 64 hex digits is 71 characters, over X.520's 64-character
    # CN bound that cryptography enforces by default; Go (the client) does
    # not care, and the CN is what carries the key, so skip the check.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the length warning, see above
        cn = x509.NameAttribute(
            NameOID.COMMON_NAME, META_CERT_CN_PREFIX + server_public.hex(), _validate=False
        )
    name = x509.Name([cn])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(PROTOCOL_VERSION)
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def server_ssl_context(
    material: TlsMaterial,
    data_dir: str | os.PathLike[str],
    *,
    meta_cert_pem: bytes | None = None,
) -> ssl.SSLContext:
    """Build the listener's TLS context (TLS 1.2+, ALPN ``http/1.1``).

    The presented chain (leaf, chain, meta certificate) is written to
    ``derp-tls-chain.pem`` in ``data_dir`` because :mod:`ssl` loads chains
    from files only.

    Raises:
        ConfigError: the key does not match the certificate.
    """
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    chain = material.cert_pem
    if not chain.endswith(b"\n"):
        chain += b"\n"
    if meta_cert_pem is not None:
        chain += meta_cert_pem
    chain_path = directory / CHAIN_FILE
    chain_path.write_bytes(chain)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(certfile=str(chain_path), keyfile=material.key_path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot use TLS certificate/key: {exc}") from exc
    return ctx
