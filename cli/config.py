"""Server configuration: defaults, a TOML file, and environment variables.

Precedence, lowest first: built-in defaults, the TOML file (``--config FILE`` or
``$TAILLEDGER_CONFIG``), then environment variables. ``$TAILLEDGER_DATA`` sets the data
directory; any other key can be set as ``TAILLEDGER_<SECTION>__<KEY>`` (double
underscore between levels), e.g. ``TAILLEDGER_LISTEN_ADDR=0.0.0.0:8080`` or
``TAILLEDGER_DERP__SERVER__ENABLED=true``; values are read as TOML scalars when they
parse as one (``true``, ``42``, ``"text"``) and as plain strings otherwise.

With no configuration at all ``tailledger serve`` keeps its data in
``./tailledger-data`` and listens on ``127.0.0.1:8080``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from pathlib import Path

import msgspec

from .durations import DurationError, parse_duration
from .gcpolicy import MMAP_THRESHOLD_MAX

__all__ = ["Config", "ConfigError", "Durations", "load_config"]


#: Where ``/metrics`` is served unless configured (Headscale's default too): localhost only.
DEFAULT_METRICS_LISTEN_ADDR = "127.0.0.1:9090"
#: Where ``tailledger relay`` listens when ``derp.server.listen_addr`` is empty.
DEFAULT_RELAY_LISTEN_ADDR = "127.0.0.1:3340"
#: The STUN port when ``derp.server.stun_listen_addr`` is empty (Tailscale's default).
DEFAULT_STUN_PORT = 3478


class ConfigError(Exception):
    """The configuration is invalid; the message explains what and where."""


class TLSConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    cert_file: str = ""
    key_file: str = ""


class PrefixConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    v4: str = "100.64.0.0/10"
    v6: str = "fd7a:115c:a1e0::/48"
    allocation: str = "sequential"


class DNSConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    magic_dns: bool = True
    base_domain: str = "tailnet.internal"
    nameservers: list[str] = msgspec.field(default_factory=list)
    split: dict[str, list[str]] = msgspec.field(default_factory=dict)
    search_domains: list[str] = msgspec.field(default_factory=list)
    override_local_dns: bool = False
    # Extra MagicDNS records, Headscale's form: [{name = "grafana.example", type = "A",
    # value = "100.64.0.3"}], or in a JSON file (a list of such objects) that is
    # watched (not both). Every change is recorded in the log (dns.extra_records_set).
    extra_records: list[dict[str, str]] = msgspec.field(default_factory=list)
    extra_records_path: str = ""


class PolicyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    mode: str = "database"  # "database" or "file"
    path: str = ""


class DerpMeshPeerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Another relay of the same region (``[[derp.server.mesh_with]]``)."""

    url: str  # https://host:port/derp (http:// behind a TLS-terminating proxy)
    cert_name: str = ""  # sha256-raw:<hex> pin when that relay is self-signed
    dial_host: str = ""  # connect here instead of the URL's host (private address)


class DerpServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # The embedded relay is on by default, so that a tailnet works with no configuration
    # (a Tailscale client with no DERP region never reaches Running).
    enabled: bool = True
    region_id: int = 999
    region_code: str = "tailledger"
    region_name: str = "tailledger embedded DERP"
    node_name: str = ""  # this relay's node name in the region; default "<region_id>a"
    # "" (default): served on the control port at /derp, named in the DERP map by the
    # server URL's host and port. HOST:PORT: a listener of its own (``tailledger relay``
    # defaults to DEFAULT_RELAY_LISTEN_ADDR).
    listen_addr: str = ""
    # STUN (UDP). "": the control port's host, port 3478; when that default port is
    # taken the server runs without STUN (a warning). An address set here must be free.
    stun: bool = True
    stun_listen_addr: str = ""
    hostname: str = ""  # what clients dial; default: the server URL's host (or the listen host)
    # Ports announced in the DERP map when a proxy or NAT sits in front (0 = the bound port).
    public_derp_port: int = 0
    public_stun_port: int = 0
    ipv4: str = ""
    tls: bool = True  # serve DERP over TLS (self-signed unless cert/key files are given)
    cert_file: str = ""
    key_file: str = ""
    # Meshing: the relays of one region share a key and forward packets to each other.
    mesh_key: str = ""  # 64 hex digits, shared by every relay of the region
    mesh_key_file: str = ""  # or a file holding it (like derper's --mesh-psk-file)
    mesh_with: list[DerpMeshPeerConfig] = msgspec.field(default_factory=list)
    # Abuse bounds: what one authorised node can take from the others (relay/derp/server.py).
    # Bytes per second each node key may send through the relay (0 = unlimited), and the
    # burst it may send at once (at least 65 573 bytes, one maximum-size packet). Announced
    # to clients, which pace themselves; excess is dropped (metric drops{reason="rate_limited"}).
    rate_limit: int = 8 << 20
    rate_burst: int = 1 << 20
    # Concurrent connections one node key may hold (0 = unlimited, like derper). Beyond it,
    # "close_oldest" closes the key's oldest connection (a client that reconnects while its
    # dead connections linger always gets in; metric closed_key_limit) and "refuse_new"
    # refuses the newcomer (metric refused_key_limit).
    max_conns_per_key: int = 4
    key_limit_policy: str = "close_oldest"


class DerpConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    server: DerpServerConfig = msgspec.field(default_factory=DerpServerConfig)
    urls: list[str] = msgspec.field(default_factory=list)
    paths: list[str] = msgspec.field(default_factory=list)
    omit_default_regions: bool = False
    auto_update_interval: str = "24h"


class TaildropConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Taildrop (file sharing between a user's devices), Headscale's ``taildrop``."""

    enabled: bool = True


class CapabilitiesConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Tailnet-wide capabilities every node gets in its CapMap (projections/policy/capmap.py)."""

    # Tailscale SSH (the ssh section of the policy still says who may connect).
    ssh: bool = True
    # Approved exit nodes are offered as suggestions (suggest-exit-node).
    suggest_exit_nodes: bool = True
    # "auto-update new devices": true or false is sent to every node; unset sends nothing.
    auto_update_default: bool | None = None


class DatabaseConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    type: str = "sqlite"  # "sqlite" (embedded) or "postgres" (shared by replicas)
    path: str = ""  # sqlite: default <data_dir>/ledger.db
    synchronous: str = "FULL"  # sqlite
    # postgres: a libpq connection string or URI, and/or its parts (the parts win).
    # The password never goes in here: it comes from password_file or the environment
    # variable named by password_env (or libpq's own PGPASSWORD / PGPASSFILE).
    dsn: str = ""
    host: str = ""  # a host name, an address or a Unix socket directory
    port: int = 0  # 0: libpq's default (5432)
    name: str = ""  # the database
    user: str = ""
    password_file: str = ""
    password_env: str = ""
    connect_timeout: str = "5s"


class TuningConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Full maps sent at once; more new streams (a reconnect herd) wait their turn.
    full_map_concurrency: int = 32
    # A client that stops reading its full map gives its turn up after this long.
    full_map_turn_timeout: str = "10s"
    # Longest silence on an idle map stream before a keep-alive message.
    map_keepalive_interval: str = "55s"
    # Subnet routers fail over when their primary is offline, but not in this long after
    # start-up, while nodes reconnect ("0": at once; protocol/ha.py).
    route_failover_grace: str = "10s"
    # Keep the long-lived heap out of garbage collections (see cli/gcpolicy.py).
    gc_freeze: bool = True
    # Buffers of at least this many bytes get their own memory mapping, returned to the
    # system when freed (glibc's M_MMAP_THRESHOLD, kept fixed; cli/gcpolicy.py). Above
    # a full map of 10,000 peers, which every stream of a reconnect herd has its own of.
    # 0: glibc's default, a threshold that grows with the largest buffer freed.
    malloc_mmap_threshold: int = 4 * 1024 * 1024


class LimitsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bounds on what clients and operators can make the server hold or write.

    Every limit here is counted in metrics when it bites. Sections of the hardening
    work fill it in; each field says what it bounds.
    """

    # -- connections (protocol/serve/) ------------------------------------------------
    # A whole HTTP/1.1 request head (slowloris: a byte now and then does not renew it);
    # also how long a kept-alive /key connection may wait for its next request.
    head_timeout: str = "10s"
    # A request body once its head arrived: inside the tunnel per stream (answered
    # 408), on the web port (hypercorn) for the whole request (connection closed).
    body_timeout: str = "30s"
    # A Noise tunnel with no request being handled and no map long poll open is closed
    # after this long. A node's long poll counts as open however quiet it is, so only
    # tunnels nobody uses are cut; keep it above tuning.map_keepalive_interval.
    tunnel_idle_timeout: str = "3m"
    # A connection that takes nothing we send (socket writes, or HTTP/2 flow-control
    # window for a response) for this long is closed as a slow reader.
    write_timeout: str = "30s"
    # Bytes one connection may leave us holding, not yet taken (queued for flow-control
    # window or the socket); more closes it as a slow reader. Above the largest full map.
    max_outgoing_buffer: int = 16 << 20
    # Connections open at once; more are closed as soon as they are accepted.
    max_connections: int = 10_000
    # Connections open at once from one address (IPv6: one /64). Raise it when many
    # nodes share one public address (an office behind one NAT).
    max_connections_per_address: int = 512
    # Addresses only max_connections limits: a reverse proxy on this host sends every
    # client from its own address. Empty it when clients connect from loopback.
    connection_cap_exempt: list[str] = msgspec.field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"]
    )
    # The TLS handshake (with tls.cert_file).
    tls_handshake_timeout: str = "10s"

    # -- map streams and node updates (protocol/control/) --------------------------------
    # Largest Hostinfo a node may send (bytes of JSON); a larger one is refused (register
    # answers an error, map requests a 413) and nothing of it is kept. What is kept is
    # trimmed to the fields peers get (projections.tailcfg.PeerHostinfo).
    max_hostinfo_bytes: int = 16384
    # Longest host name recorded (characters; Tailscale's DNS label length). Longer
    # names are cut, control characters dropped.
    max_hostname_length: int = 63
    # Most routes one node may advertise (Hostinfo.RoutableIPs); more are refused.
    max_advertised_routes: int = 512
    # Per node, updates that append to the log (host name, routes, key expiry, re-keys)
    # are rate-limited by a token bucket: burst tokens, one more every interval. An
    # update without a token is refused (HTTP 429 / a register error) and not appended.
    node_update_burst: int = 10
    node_update_interval: str = "30s"

    # -- pending interactive registrations ------------------------------------------------
    # Machines waiting for an admin's approval (``tailscale up`` without a key), at most
    # this many at once; more are refused until some are approved, rejected or expire.
    pending_registrations_max: int = 256
    # ... and at most this many from one source address (an IPv6 /64 counts as one).
    pending_registrations_per_address: int = 8
    # A request nobody approved or rejected within this long expires (the client must
    # log in again).
    pending_registration_ttl: str = "30m"


class AuditConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Signed checkpoints of the log head (see ``eventlog/signing.py``).

    The signing key must live outside the data directory, so that whoever can write the
    data directory cannot re-sign an edited history. Default (filled in by
    :func:`load_config`): ``tailledger-signing.key`` beside the configuration file when
    there is one (and it is not in the data directory); else ``/etc/tailledger/signing.key`` when running as root; else
    ``$XDG_CONFIG_HOME/tailledger/signing.key`` (``~/.config/tailledger/signing.key``).
    It is generated (0600) on the first start when absent.
    """

    signing_key_file: str = ""
    # The server signs its head after this many new events …
    checkpoint_events: int = 1000
    # … and at least this often while events arrive (and at shutdown, and on demand).
    checkpoint_interval: str = "10m"
    # Where the public key is read from by ``log verify`` (default: the signing key's
    # public half, or the verify key stored beside it); overridden by ``--pubkey``.
    public_key: str = ""


class AdminConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The local admin socket.

    ``socket_group``: a Unix group whose members may use the admin socket (mode 0660),
    each recorded under their own account (``SO_PEERCRED``). The data directory is 0700,
    so a group socket must live elsewhere: set ``admin_socket`` too (for example
    ``/run/tailledger/admin.sock``; its directory is created 0750 for the group).
    """

    socket_group: str = ""


class PKCEConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    method: str = "S256"  # or "plain" (only for a provider that knows no better)


class OIDCConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sign-in with an OpenID Connect provider (``[oidc]``; off while ``issuer`` is "").

    Names follow Headscale's ``oidc:`` section where they mean the same. See
    ``docs/oidc.md``.
    """

    # The provider's issuer URL; its /.well-known/openid-configuration is read.
    issuer: str = ""
    client_id: str = ""
    # The client secret, or a file holding it (give one; the file is better: the
    # secret then stays out of the configuration and of the environment).
    client_secret: str = ""
    client_secret_path: str = ""
    scope: list[str] = msgspec.field(default_factory=lambda: ["openid", "profile", "email"])
    # More parameters of the authorization request (e.g. domain_hint, prompt).
    extra_params: dict[str, str] = msgspec.field(default_factory=dict)
    pkce: PKCEConfig = msgspec.field(default_factory=PKCEConfig)
    # Who may sign in (each list empty = no restriction by it): e-mail domains, e-mail
    # addresses, and groups from the ``groups_claim`` claim of the token.
    allowed_domains: list[str] = msgspec.field(default_factory=list)
    allowed_users: list[str] = msgspec.field(default_factory=list)
    allowed_groups: list[str] = msgspec.field(default_factory=list)
    groups_claim: str = "groups"
    # Members of these groups become admins of the tailnet when they sign in.
    admin_groups: list[str] = msgspec.field(default_factory=list)
    # Refuse a login whose e-mail the provider has not verified (email_verified).
    email_verified_required: bool = True
    # Key expiry of nodes registered by a sign-in ("" = node_key_expiry), or, with
    # use_expiry_from_token, the expiry of the ID token.
    expiry: str = ""
    use_expiry_from_token: bool = False
    # User names without the e-mail's domain (alice, not alice@example.com).
    strip_email_domain: bool = False
    # Trust this CA bundle for the provider (a private CA). Verification is never off
    # unless tls_insecure_skip_verify is set, which only tests should do.
    ca_file: str = ""
    tls_insecure_skip_verify: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)


@dataclass(frozen=True)
class Durations:
    """Every duration of the configuration, parsed once (:attr:`Config.durations`).

    ``None`` is ``0``/``never`` (off). A duration that must be positive is given in
    seconds; it is never ``None``.
    """

    node_key_expiry: timedelta | None
    ephemeral_node_inactivity_timeout: timedelta | None
    derp_auto_update_interval: timedelta | None
    route_failover_grace: timedelta | None
    full_map_turn_timeout: float
    map_keepalive_interval: float
    checkpoint_interval: float
    node_update_interval: float
    pending_registration_ttl: float
    head_timeout: float
    body_timeout: float
    tunnel_idle_timeout: float
    write_timeout: float
    tls_handshake_timeout: float
    #: Only read (and checked) with ``database.type = "postgres"``; else the default 5 s.
    database_connect_timeout: float
    #: ``oidc.expiry``: the key expiry of nodes registered by a sign-in (None: as
    #: ``node_key_expiry``).
    oidc_expiry: timedelta | None = None


def _duration(what: str, text: str) -> timedelta | None:
    """A duration of the configuration key ``what``; ``None`` for ``0``/``never``.

    Raises:
        ConfigError: malformed (the message names the key).
    """
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _positive(what: str, text: str) -> float:
    """A positive duration of the configuration key ``what``, in seconds.

    Raises:
        ConfigError: malformed, or zero (the message names the key).
    """
    duration = _duration(what, text)
    if duration is None or duration.total_seconds() <= 0:
        raise ConfigError(f"{what}: must be a positive duration")
    return duration.total_seconds()


def parse_durations(config: Config) -> Durations:
    """The durations of ``config`` (use :attr:`Config.durations`, which keeps them).

    Raises:
        ConfigError: one is malformed, or zero where it must be positive.
    """
    limits = config.limits
    return Durations(
        node_key_expiry=_duration("node_key_expiry", config.node_key_expiry),
        ephemeral_node_inactivity_timeout=_duration(
            "ephemeral_node_inactivity_timeout", config.ephemeral_node_inactivity_timeout
        ),
        derp_auto_update_interval=_duration("derp.auto_update_interval", config.derp.auto_update_interval),
        route_failover_grace=_duration("tuning.route_failover_grace", config.tuning.route_failover_grace),
        full_map_turn_timeout=_positive("tuning.full_map_turn_timeout", config.tuning.full_map_turn_timeout),
        map_keepalive_interval=_positive("tuning.map_keepalive_interval", config.tuning.map_keepalive_interval),
        checkpoint_interval=_positive("audit.checkpoint_interval", config.audit.checkpoint_interval),
        node_update_interval=_positive("limits.node_update_interval", limits.node_update_interval),
        pending_registration_ttl=_positive("limits.pending_registration_ttl", limits.pending_registration_ttl),
        head_timeout=_positive("limits.head_timeout", limits.head_timeout),
        body_timeout=_positive("limits.body_timeout", limits.body_timeout),
        tunnel_idle_timeout=_positive("limits.tunnel_idle_timeout", limits.tunnel_idle_timeout),
        write_timeout=_positive("limits.write_timeout", limits.write_timeout),
        tls_handshake_timeout=_positive("limits.tls_handshake_timeout", limits.tls_handshake_timeout),
        database_connect_timeout=(
            _positive("database.connect_timeout", config.database.connect_timeout)
            if config.database.type == "postgres"
            else 5.0
        ),
        oidc_expiry=_duration("oidc.expiry", config.oidc.expiry) if config.oidc.expiry else None,
    )


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, dict=True):
    data_dir: str = "./tailledger-data"
    listen_addr: str = "127.0.0.1:8080"
    server_url: str = ""  # default: http://<listen_addr>
    admin_socket: str = ""  # default: <data_dir>/admin.sock
    log_level: str = "info"
    node_key_expiry: str = "0"  # default expiry of node keys; 0 = never
    ephemeral_node_inactivity_timeout: str = "30m"
    # Prometheus /metrics, never on the public control port; "" turns it off. When the
    # default address is taken the server starts without metrics (a warning); an
    # address set explicitly must be free.
    metrics_listen_addr: str = DEFAULT_METRICS_LISTEN_ADDR
    tls: TLSConfig = msgspec.field(default_factory=TLSConfig)
    prefixes: PrefixConfig = msgspec.field(default_factory=PrefixConfig)
    dns: DNSConfig = msgspec.field(default_factory=DNSConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    derp: DerpConfig = msgspec.field(default_factory=DerpConfig)
    taildrop: TaildropConfig = msgspec.field(default_factory=TaildropConfig)
    capabilities: CapabilitiesConfig = msgspec.field(default_factory=CapabilitiesConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    tuning: TuningConfig = msgspec.field(default_factory=TuningConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    oidc: OIDCConfig = msgspec.field(default_factory=OIDCConfig)

    # -- derived ------------------------------------------------------------------

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def database_path(self) -> Path:
        return Path(self.database.path) if self.database.path else self.data_path / "ledger.db"

    @property
    def admin_socket_path(self) -> Path:
        return Path(self.admin_socket) if self.admin_socket else self.data_path / "admin.sock"

    @property
    def public_url(self) -> str:
        if self.server_url:
            return self.server_url.rstrip("/")
        scheme = "https" if self.tls.cert_file else "http"
        return f"{scheme}://{self.listen_addr}"

    @property
    def listen(self) -> tuple[str, int]:
        return split_host_port(self.listen_addr, "listen_addr")

    @cached_property
    def durations(self) -> Durations:
        """Every duration of the configuration, parsed on first use and kept (the
        validation of :func:`load_config` is that first use).

        Raises:
            ConfigError: a duration is malformed, or zero where it must be positive.
        """
        return parse_durations(self)


#: What a secret value is shown as (``config check -o json``).
REDACTED = "<redacted>"


def _validate_postgres(db: DatabaseConfig) -> None:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    if not (db.dsn or db.host or db.name):
        raise ConfigError("database: type 'postgres' needs a dsn, or a host and a name")
    try:
        parts = conninfo_to_dict(db.dsn)
    except ProgrammingError as exc:
        raise ConfigError(f"database.dsn: not a connection string: {exc}") from None
    if "password" in parts:
        raise ConfigError(
            "database.dsn: holds a password; put it in database.password_file or the "
            "environment variable named by database.password_env"
        )
    if db.password_file and db.password_env:
        raise ConfigError("database: give password_file or password_env, not both")
    if not 0 <= db.port <= 65535:
        raise ConfigError("database.port: must be between 1 and 65535")


def postgres_conninfo(db: DatabaseConfig, env: Mapping[str, str] | None = None) -> str:
    """The libpq connection string of ``database`` with its password read now.

    Raises:
        ConfigError: the password file cannot be read or the variable is not set.
    """
    from psycopg.conninfo import make_conninfo

    env = os.environ if env is None else env
    parts: dict[str, str | int] = {}
    if db.host:
        parts["host"] = db.host
    if db.port:
        parts["port"] = db.port
    if db.name:
        parts["dbname"] = db.name
    if db.user:
        parts["user"] = db.user
    if db.password_file:
        try:
            parts["password"] = Path(db.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"database.password_file: cannot read it: {exc.strerror}") from None
    elif db.password_env:
        if db.password_env not in env:
            raise ConfigError(f"database.password_env: the variable {db.password_env} is not set")
        parts["password"] = env[db.password_env]
    return make_conninfo(db.dsn, **parts)


def _is_secret(name: str) -> bool:
    """Whether a key of this name holds a secret (not a path to one, not a public key)."""
    n = name.lower()
    if n.endswith(("_file", "_path", "_addr", "_url", "_expiry")) or n.startswith("public"):
        return False
    return n.endswith("key") or any(w in n for w in ("secret", "password", "passwd", "token", "psk", "credential"))


def redacted(config: Config) -> dict[str, object]:
    """The configuration as plain data with every secret value replaced by ``<redacted>``
    (the DERP mesh key, and any future key, secret, token or password), for printing."""

    def scrub(value: object, name: str = "") -> object:
        if isinstance(value, dict):
            return {k: scrub(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v, name) for v in value]
        if _is_secret(name) and value not in ("", None) and not isinstance(value, bool):
            return REDACTED
        return value

    data = scrub(msgspec.to_builtins(config))
    assert isinstance(data, dict)
    return data


def split_host_port(addr: str, what: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {addr!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class _Where:
    source: str


def _env_overrides(env: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, raw in env.items():
        if not name.startswith("TAILLEDGER_") or name in ("TAILLEDGER_CONFIG",):
            continue
        key = name[len("TAILLEDGER_") :].lower()
        if key == "data":
            key = "data_dir"
        path = key.split("__")
        try:
            value: object = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name} conflicts with another")
            node = child
        node[path[-1]] = value
    return out


def _merge(base: dict[str, object], over: Mapping[str, object]) -> dict[str, object]:
    merged = dict(base)
    for key, value in over.items():
        current = merged.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            merged[key] = _merge(current, value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from defaults, the file and the environment.

    Raises:
        ConfigError: the file is unreadable or not TOML, a key is unknown, a value has
            the wrong type, or a value is semantically wrong (a bad prefix, duration …).
    """
    env = os.environ if env is None else env
    raw: dict[str, object] = {}
    path = path or env.get("TAILLEDGER_CONFIG") or None
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    raw = _merge(raw, _env_overrides(env))
    try:
        config = msgspec.convert(raw, type=Config)
    except msgspec.ValidationError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{_bare_duration(str(exc), raw) or _explain(str(exc))}") from None
    if not config.audit.signing_key_file:
        key_path = default_signing_key_path(path, env)
        if _inside(key_path, config.data_path):  # a config file kept in the data directory
            key_path = default_signing_key_path(None, env)
        audit = msgspec.structs.replace(config.audit, signing_key_file=str(key_path))
        config = msgspec.structs.replace(config, audit=audit)
    validate(config)
    return config


def default_signing_key_path(config_file: str | Path | None, env: Mapping[str, str]) -> Path:
    """Where the signing key lives when ``audit.signing_key_file`` is not set."""
    if config_file:
        return Path(config_file).resolve().parent / "tailledger-signing.key"
    if os.geteuid() == 0:
        return Path("/etc/tailledger/signing.key")
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "tailledger" / "signing.key"


def _bare_duration(msg: str, raw: Mapping[str, object]) -> str | None:
    """The explanation of a number given where a duration is due (``55`` for
    ``"55s"``): durations are text with a unit. ``None`` for any other error."""
    text, _, at = msgspec_msg_split(msg)
    if not text.startswith("Expected `str`, got `") or not at:
        return None
    default: object = Config()
    value: object = raw
    for part in at.split("."):
        default = getattr(default, part, None)
        value = value.get(part) if isinstance(value, Mapping) else None
    if not isinstance(default, str) or not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        parse_duration(default)
    except DurationError:
        return None
    if not default or default[-1] not in "smhdw0":
        return None
    number = f"{value:g}"
    return (f"{at}: a duration is text with a unit: write \"{number}s\" for {number} seconds "
            f"(units s, m, h, d, w; \"0\" for none), not the bare number {number}")


def _explain(msg: str) -> str:
    # msgspec says "... - at `$.derp.server`"; say it with the TOML key path.
    text, _, at = msgspec_msg_split(msg)
    return f"{text} (at {at})" if at else text


def msgspec_msg_split(msg: str) -> tuple[str, str, str]:
    text, sep, at = msg.partition(" - at `$")
    return text, sep, at.rstrip("`").lstrip(".") or ("top level" if sep else "")


def validate(config: Config) -> None:
    """Semantic checks beyond types."""
    config.listen  # noqa: B018 - raises ConfigError when malformed
    metrics = split_host_port(config.metrics_listen_addr, "metrics_listen_addr") if config.metrics_listen_addr else None
    if metrics is not None and metrics == config.listen and metrics[1]:
        raise ConfigError(
            "metrics_listen_addr: must differ from listen_addr (metrics are not served on the "
            "public control port); use a local address such as 127.0.0.1:9090, or \"\" for none"
        )
    for what, text, version in (("prefixes.v4", config.prefixes.v4, 4), ("prefixes.v6", config.prefixes.v6, 6)):
        if not text:
            continue
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ConfigError(f"{what}: {exc}") from None
        if net.version != version:
            raise ConfigError(f"{what}: {text} is not an IPv{version} prefix")
    if not config.prefixes.v4 and not config.prefixes.v6:
        raise ConfigError("prefixes: at least one of v4 and v6 is needed")
    if config.prefixes.allocation not in ("sequential", "random"):
        raise ConfigError(
            f"prefixes.allocation: {config.prefixes.allocation!r} is not 'sequential' or 'random'"
        )
    config.durations  # noqa: B018 - parses every duration; raises ConfigError for a bad one
    if config.tuning.full_map_concurrency < 1:
        raise ConfigError("tuning.full_map_concurrency: must be at least 1")
    if not 0 <= config.tuning.malloc_mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise ConfigError(f"tuning.malloc_mmap_threshold: must be 0 (glibc's default) to {MMAP_THRESHOLD_MAX} bytes")
    _validate_limits(config.limits)
    _validate_connection_limits(config.limits)
    if config.policy.mode not in ("database", "file"):
        raise ConfigError(f"policy.mode: {config.policy.mode!r} is not 'database' or 'file'")
    if config.policy.mode == "file" and not config.policy.path:
        raise ConfigError("policy.path: policy.mode is 'file' but no path is given")
    if bool(config.tls.cert_file) != bool(config.tls.key_file):
        raise ConfigError("tls: give both cert_file and key_file, or neither")
    if config.database.type not in ("sqlite", "postgres"):
        raise ConfigError(f"database.type: {config.database.type!r} is not 'sqlite' or 'postgres'")
    if config.database.type == "postgres":
        _validate_postgres(config.database)
    if config.database.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError("database.synchronous: use FULL, EXTRA or NORMAL")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: {config.log_level!r} is not debug, info, warning or error")
    if config.derp.server.listen_addr:
        split_host_port(config.derp.server.listen_addr, "derp.server.listen_addr")
    if config.derp.server.stun_listen_addr:
        split_host_port(config.derp.server.stun_listen_addr, "derp.server.stun_listen_addr")
    if config.derp.server.enabled and not 1 <= config.derp.server.region_id < 2**53:
        raise ConfigError("derp.server.region_id: must be between 1 and 2^53-1")
    for what, value in (
        ("derp.server.public_derp_port", config.derp.server.public_derp_port),
        ("derp.server.public_stun_port", config.derp.server.public_stun_port),
    ):
        if not 0 <= value <= 65535:
            raise ConfigError(f"{what}: {value} is not a port (0 = the bound port)")
    _validate_mesh(config.derp.server)
    _validate_relay_limits(config.derp.server)
    if config.dns.extra_records and config.dns.extra_records_path:
        raise ConfigError("dns: give extra_records or extra_records_path, not both")
    if config.dns.extra_records:
        from projections.commands import parse_extra_records
        from projections.errors import CommandError

        try:
            parse_extra_records(config.dns.extra_records, where="dns.extra_records")
        except CommandError as exc:
            raise ConfigError(str(exc)) from None
    if config.dns.override_local_dns and not config.dns.nameservers:
        # As Headscale: overriding the clients' DNS with nothing would leave them none.
        raise ConfigError("dns.override_local_dns: needs dns.nameservers (the resolvers clients are to use)")
    if not config.dns.base_domain and config.dns.magic_dns:
        raise ConfigError("dns.base_domain: MagicDNS needs a base domain")
    _validate_audit(config)
    _validate_oidc(config.oidc)


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def _validate_audit(config: Config) -> None:
    audit = config.audit
    if audit.checkpoint_events < 1:
        raise ConfigError("audit.checkpoint_events: must be at least 1")
    if audit.signing_key_file and _inside(Path(audit.signing_key_file), config.data_path):
        raise ConfigError(
            f"audit.signing_key_file: {audit.signing_key_file} is inside the data directory; "
            "whoever can edit the log could then re-sign it. Keep the key elsewhere."
        )
    if audit.public_key:
        text = audit.public_key.strip()
        if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
            raise ConfigError("audit.public_key: must be 64 hexadecimal digits (an Ed25519 public key)")
    if config.admin.socket_group:
        if _inside(config.admin_socket_path, config.data_path):
            raise ConfigError(
                "admin.socket_group: the data directory is private (0700), so a group socket "
                "must live elsewhere: set admin_socket too, e.g. /run/tailledger/admin.sock"
            )
        import grp

        group = config.admin.socket_group
        try:
            grp.getgrnam(group)
        except KeyError:
            if not (group.isascii() and group.isdigit()):
                raise ConfigError(f"admin.socket_group: no Unix group named {group!r}") from None


def _validate_oidc(oidc: OIDCConfig) -> None:
    from urllib.parse import urlsplit

    if not oidc.enabled:
        return
    url = urlsplit(oidc.issuer)
    loopback = url.hostname in ("localhost", "127.0.0.1", "::1")
    if url.scheme != "https" and not (url.scheme == "http" and loopback):
        raise ConfigError(f"oidc.issuer: {oidc.issuer!r} is not an https:// URL")
    if not oidc.client_id:
        raise ConfigError("oidc.client_id: needed with oidc.issuer")
    if bool(oidc.client_secret) == bool(oidc.client_secret_path):
        raise ConfigError("oidc: give client_secret or client_secret_path (one of them)")
    read_client_secret(oidc)
    if "openid" not in oidc.scope:
        raise ConfigError("oidc.scope: must include \"openid\"")
    if oidc.pkce.method not in ("S256", "plain"):
        raise ConfigError(f"oidc.pkce.method: {oidc.pkce.method!r} is not S256 or plain")
    if not oidc.groups_claim:
        raise ConfigError("oidc.groups_claim: must name a claim")
    if oidc.ca_file and not Path(oidc.ca_file).is_file():
        raise ConfigError(f"oidc.ca_file: {oidc.ca_file} is not a readable file")
    for i, domain in enumerate(oidc.allowed_domains):
        if not domain or "@" in domain:
            raise ConfigError(f"oidc.allowed_domains[{i}]: {domain!r} is not a domain")


def read_client_secret(oidc: OIDCConfig) -> str:
    """The OIDC client secret from ``client_secret`` or ``client_secret_path``.

    Raises:
        ConfigError: the file is unreadable or empty (the message never holds the secret).
    """
    if oidc.client_secret:
        return oidc.client_secret
    try:
        text = Path(oidc.client_secret_path).read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"oidc.client_secret_path: cannot read {oidc.client_secret_path}: {exc.strerror}"
        ) from None
    if not text:
        raise ConfigError(f"oidc.client_secret_path: {oidc.client_secret_path} is empty")
    return text


def _validate_limits(limits: LimitsConfig) -> None:
    for what, value, least in (
        ("limits.max_hostinfo_bytes", limits.max_hostinfo_bytes, 1024),
        ("limits.max_hostname_length", limits.max_hostname_length, 1),
        ("limits.max_advertised_routes", limits.max_advertised_routes, 0),
        ("limits.node_update_burst", limits.node_update_burst, 1),
    ):
        if value < least:
            raise ConfigError(f"{what}: must be at least {least}")
    for what, count in (
        ("limits.pending_registrations_max", limits.pending_registrations_max),
        ("limits.pending_registrations_per_address", limits.pending_registrations_per_address),
    ):
        if count < 1:
            raise ConfigError(f"{what}: must be at least 1")


def _validate_connection_limits(limits: LimitsConfig) -> None:
    for name in ("max_outgoing_buffer", "max_connections", "max_connections_per_address"):
        if getattr(limits, name) < 1:
            raise ConfigError(f"limits.{name}: must be at least 1")
    for i, text in enumerate(limits.connection_cap_exempt):
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise ConfigError(f"limits.connection_cap_exempt[{i}]: {exc}") from None


def _validate_mesh(ds: DerpServerConfig) -> None:
    if ds.mesh_key and ds.mesh_key_file:
        raise ConfigError("derp.server: give mesh_key or mesh_key_file, not both")
    if ds.mesh_key and not _is_mesh_key(ds.mesh_key):
        raise ConfigError("derp.server.mesh_key: must be 64 hexadecimal digits")
    if ds.mesh_with and not (ds.mesh_key or ds.mesh_key_file):
        raise ConfigError("derp.server.mesh_with: meshing needs mesh_key or mesh_key_file")
    for i, peer in enumerate(ds.mesh_with):
        scheme = peer.url.partition("://")[0]
        if scheme not in ("http", "https") or "://" not in peer.url:
            raise ConfigError(f"derp.server.mesh_with[{i}].url: {peer.url!r} is not an http(s):// DERP URL")
        if peer.cert_name and not peer.cert_name.startswith("sha256-raw:"):
            raise ConfigError(f"derp.server.mesh_with[{i}].cert_name: only sha256-raw:<hex> pins are supported")


def _validate_relay_limits(ds: DerpServerConfig) -> None:
    from relay.derp.server import MIN_RATE_BURST

    if ds.rate_limit < 0:
        raise ConfigError("derp.server.rate_limit: must be 0 (unlimited) or bytes per second")
    if ds.rate_limit and ds.rate_burst < MIN_RATE_BURST:
        raise ConfigError(
            f"derp.server.rate_burst: {ds.rate_burst} is less than one maximum-size packet ({MIN_RATE_BURST} bytes)"
        )
    if ds.max_conns_per_key < 0:
        raise ConfigError("derp.server.max_conns_per_key: must be 0 (unlimited) or a positive count")
    if ds.key_limit_policy not in ("close_oldest", "refuse_new"):
        raise ConfigError(f"derp.server.key_limit_policy: {ds.key_limit_policy!r} is not 'close_oldest' or 'refuse_new'")


def _is_mesh_key(text: str) -> bool:
    text = text.strip()
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def read_mesh_key(ds: DerpServerConfig) -> str | None:
    """The region's mesh key from ``mesh_key`` or ``mesh_key_file``; ``None`` when not meshing.

    Raises:
        ConfigError: the file is unreadable or does not hold 64 hexadecimal digits.
    """
    if ds.mesh_key:
        return ds.mesh_key.strip()
    if not ds.mesh_key_file:
        return None
    try:
        text = Path(ds.mesh_key_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"derp.server.mesh_key_file: cannot read {ds.mesh_key_file}: {exc.strerror}") from None
    if not _is_mesh_key(text):
        raise ConfigError(f"derp.server.mesh_key_file: {ds.mesh_key_file} does not hold 64 hexadecimal digits")
    return text
