"""Wire structs mirroring Tailscale's ``tailcfg`` package (msgspec, JSON).

Role in the pipeline: the vocabulary shared by the netmap builder (pure, in
:mod:`projections`) and the control protocol (:mod:`protocol`, which imports it
from here). The builder produces :class:`MapResponse` values, the protocol
layer encodes them and decodes :class:`RegisterRequest` / :class:`MapRequest`
bodies. It lives in ``projections`` because imports only
point ``projections -> protocol`` (style rule 1).

Conventions (style rule 16; docs/control-protocol.md §6, §8.5, §9):

* **Names.** Python fields are snake_case; :func:`go_name` maps them to the Go
  field names, which are the JSON keys (``node_id -> NodeID``,
  ``derp_map -> DERPMap``, ``ip_proto -> IPProto``, ``home_derp -> HomeDERP``).
  Go's handful of explicit JSON tags (``sshHostKeys``, ``DERP``,
  ``omitDefaultRegions``, the camelCase ``/key`` and early-payload bodies) are
  listed in :data:`_EXPLICIT_NAMES` or use ``rename="camel"``.
* **Absent vs empty.** Every struct uses ``omit_defaults=True``: a field at
  its default is not emitted. ``None`` means *absent / unchanged*; ``[]`` and
  ``{}`` are emitted and mean *empty*. That difference carries meaning in delta
  map responses (``Peers: []`` is a no-op, ``PacketFilter: []`` is deny-all,
  ``AllowedIPs: []`` routes nothing). Exception: :class:`RegisterResponse`
  emits all its fields, as Go does (it has no ``omitempty`` tags).
* **Lenient decoding.** No ``forbid_unknown_fields``: clients are newer than
  us and send fields we do not know. Go itself fails a whole message on a
  malformed key or time, and so do we (key patterns, RFC 3339 with offset).
* **Keys** stay in their wire text form (``"nodekey:" + 64 hex``), validated by
  pattern on decode. :func:`parse_key` / :func:`format_key` convert to and
  from raw bytes; an all-zero key (clients send ``nodekey:000...`` for "none")
  parses to ``None``.
* **Times** are timezone-aware ``datetime``s. Clients send offsets
  (``1970-01-01T01:02:03+01:00`` for logout), Go's zero time is
  ``0001-01-01T00:00:00Z`` (:data:`ZERO_TIME`); :func:`is_zero_time` treats it
  like absent. Never put a naive datetime in a struct: it would encode without
  an offset, which Go rejects.
* **Pre-encoded JSON.** ``MapResponse.PacketFilter``, the values of
  ``MapResponse.PacketFilters`` and ``MapResponse.SSHPolicy`` are
  :class:`msgspec.Raw`: the policy engine encodes them once per policy and the
  server splices the bytes into every node's map. See :data:`OptionalRaw`.

Structs are frozen values with ``gc=False`` (they never form reference cycles;
a netmap with thousands of nodes should not burden the cycle collector).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Final, TypeVar

import msgspec

from .state import shared_str

__all__ = [
    "PEER_HOSTINFO_FIELDS",
    "RAW_NULL",
    "ZERO_TIME",
    "ChallengeKeyText",
    "ClientVersion",
    "ControlDialPlan",
    "ControlIPCandidate",
    "DERPHomeParams",
    "DERPMap",
    "DERPNode",
    "DERPRegion",
    "DNSConfig",
    "DNSRecord",
    "DNSResolver",
    "Debug",
    "DiscoKeyText",
    "DisplayMessage",
    "DisplayMessageAction",
    "EarlyNoise",
    "Hostinfo",
    "KeyFormatError",
    "KeyPrefix",
    "Location",
    "Login",
    "MachineKeyText",
    "MapRequest",
    "MapResponse",
    "NLKeyText",
    "NetInfo",
    "Node",
    "NodeKeyText",
    "OptionalRaw",
    "OverTLSPublicKeyResponse",
    "PeerChange",
    "PeerHostinfo",
    "PingRequest",
    "RegisterRequest",
    "RegisterResponse",
    "RegisterResponseAuth",
    "Service",
    "TKAInfo",
    "TPMInfo",
    "Time",
    "User",
    "UserProfile",
    "decode",
    "decode_map_request",
    "decode_map_response",
    "decode_register_request",
    "decode_register_response",
    "encode",
    "format_key",
    "format_time",
    "go_name",
    "is_zero_key",
    "is_zero_time",
    "parse_key",
    "parse_time",
    "peer_hostinfo",
    "time_or_none",
    "zero_key",
]

# ---------------------------------------------------------------------------
# Go naming
# ---------------------------------------------------------------------------

#: snake_case word -> Go spelling, for Go's initialisms (and a few odd words).
_WORDS: Final[Mapping[str, str]] = {
    "ace": "ACE",
    "api": "API",
    "derp": "DERP",
    "dns": "DNS",
    "icmpv4": "ICMPv4",
    "id": "ID",
    "ids": "IDs",
    "ip": "IP",
    "ips": "IPs",
    "ipn": "IPN",
    "ipv4": "IPv4",
    "ipv6": "IPv6",
    "macs": "MACs",
    "nl": "NL",
    "os": "OS",
    "pcp": "PCP",
    "pmp": "PMP",
    "ssh": "SSH",
    "stun": "STUN",
    "tka": "TKA",
    "tpm": "TPM",
    "udp": "UDP",
    "upnp": "UPnP",
    "url": "URL",
    "wireguard": "WireGuard",
    "wol": "WoL",
}

#: Fields whose JSON key is set by an explicit Go struct tag.
_EXPLICIT_NAMES: Final[Mapping[str, str]] = {
    "deprecated_default_auto_update": "DefaultAutoUpdate",  # MapResponse
    "legacy_derp_string": "DERP",  # Node.LegacyDERPString
    "omit_default_regions": "omitDefaultRegions",  # DERPMap
    "ssh_host_keys": "sshHostKeys",  # Hostinfo.SSH_HostKeys
}


def go_name(name: str) -> str:
    """Map a snake_case field name to its Go / JSON name.

    >>> go_name("node_id"), go_name("derp_map"), go_name("working_icmpv4")
    ('NodeID', 'DERPMap', 'WorkingICMPv4')
    """
    explicit = _EXPLICIT_NAMES.get(name)
    if explicit is not None:
        return explicit
    return "".join(_WORDS.get(word) or word[:1].upper() + word[1:] for word in name.split("_"))


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


class KeyPrefix(StrEnum):
    """Text prefixes of Tailscale's 32-byte key types (``types/key``)."""

    NODE = "nodekey:"  #: key.NodePublic: WireGuard key of a node
    MACHINE = "mkey:"  #: key.MachinePublic: machine / Noise control keys
    DISCO = "discokey:"  #: key.DiscoPublic: magicsock disco key
    NL = "nlpub:"  #: key.NLPublic: tailnet-lock key (ed25519)
    CHALLENGE = "chalpub:"  #: key.ChallengePublic: early-payload challenge


class KeyFormatError(ValueError):
    """A key string lacks the expected prefix or is not exactly 64 hex digits."""


_KEY_LEN: Final = 32
_HEX64: Final = "[0-9a-fA-F]{64}"
_ZERO_HEX: Final = "0" * 64

# Validated text forms, used as field types (Go fails a whole message on a
# malformed key, and so does msgspec with these patterns).
NodeKeyText = Annotated[str, msgspec.Meta(pattern=f"^nodekey:{_HEX64}$")]
MachineKeyText = Annotated[str, msgspec.Meta(pattern=f"^mkey:{_HEX64}$")]
DiscoKeyText = Annotated[str, msgspec.Meta(pattern=f"^discokey:{_HEX64}$")]
NLKeyText = Annotated[str, msgspec.Meta(pattern=f"^nlpub:{_HEX64}$")]
ChallengeKeyText = Annotated[str, msgspec.Meta(pattern=f"^chalpub:{_HEX64}$")]

_HEX64_RE: Final = re.compile(_HEX64)


def format_key(prefix: KeyPrefix, raw: bytes) -> str:
    """Render 32 raw key bytes as ``prefix + 64 lower-case hex``.

    Raises:
        ValueError: ``raw`` is not 32 bytes long.
    """
    if len(raw) != _KEY_LEN:
        raise ValueError(f"a key is {_KEY_LEN} bytes, got {len(raw)}")
    return prefix + raw.hex()


def zero_key(prefix: KeyPrefix) -> str:
    """The all-zero key, which clients send for "no key" (e.g. ``OldNodeKey``)."""
    return prefix + _ZERO_HEX


def parse_key(prefix: KeyPrefix, text: str | None) -> bytes | None:
    """Parse a key string into 32 raw bytes; absent or all-zero gives ``None``.

    Args:
        prefix: The expected type prefix.
        text: The wire string, or ``None`` when the field was absent.

    Raises:
        KeyFormatError: Wrong prefix, or not exactly 64 hex digits.
    """
    if text is None:
        return None
    if not text.startswith(prefix):
        raise KeyFormatError(f"key {text[:16]!r} does not start with {prefix.value!r}")
    digits = text[len(prefix) :]
    if _HEX64_RE.fullmatch(digits) is None:
        raise KeyFormatError(f"{prefix.value} key must be 64 hex digits")
    raw = bytes.fromhex(digits)
    return None if raw == bytes(_KEY_LEN) else raw


def is_zero_key(text: str | None) -> bool:
    """True for an absent key or a key text whose 64 digits are all zero."""
    return text is None or text.partition(":")[2] == _ZERO_HEX


# ---------------------------------------------------------------------------
# Times
# ---------------------------------------------------------------------------

#: A timezone-aware datetime; naive values are rejected on decode (RFC 3339
#: requires ``Z`` or an offset, and Go fails the message without one).
Time = Annotated[datetime, msgspec.Meta(tz=True)]

#: Go's zero ``time.Time`` as it appears on the wire: ``0001-01-01T00:00:00Z``.
ZERO_TIME: Final = datetime(1, 1, 1, tzinfo=UTC)

_time_decoder: Final = msgspec.json.Decoder(Time)


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 time with ``Z`` or a numeric offset.

    Raises:
        ValueError: Not RFC 3339, or no offset.
    """
    try:
        return _time_decoder.decode(msgspec.json.encode(text))
    except msgspec.ValidationError as exc:
        raise ValueError(f"not an RFC 3339 time with offset: {text[:40]!r}") from exc


def format_time(value: datetime) -> str:
    """Render an aware datetime as RFC 3339 (UTC as ``Z``), like Go.

    Raises:
        ValueError: ``value`` is naive.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime cannot be sent: Go requires an offset")
    return msgspec.json.encode(value).decode("ascii")[1:-1]


def is_zero_time(value: datetime | None) -> bool:
    """True for an absent time or Go's zero time (at any offset)."""
    return value is None or value == ZERO_TIME


def time_or_none(value: datetime | None) -> datetime | None:
    """Normalise Go's zero time to ``None`` (absent)."""
    return None if is_zero_time(value) else value


# ---------------------------------------------------------------------------
# Pre-encoded JSON fields
# ---------------------------------------------------------------------------

if TYPE_CHECKING:
    OptionalRaw = msgspec.Raw | None
else:
    # msgspec cannot decode ``Raw`` inside a union, so at runtime the field
    # type is plain ``Raw`` with a ``None`` default: absent -> None (and, with
    # omit_defaults, None is never emitted), present -> Raw (``null`` included,
    # as Raw(b"null")). mypy sees the honest ``Raw | None``.
    OptionalRaw = msgspec.Raw

#: Pre-encoded JSON ``null``, e.g. to delete a named ``PacketFilters`` chunk.
RAW_NULL: Final = msgspec.Raw(b"null")


def _check_raw(value: msgspec.Raw | None, field: str) -> None:
    # An empty Raw would splice nothing and produce invalid JSON ('"x":}').
    if value is not None and len(value) == 0:
        raise ValueError(f"{field}: empty msgspec.Raw; use None for absent")


# ---------------------------------------------------------------------------
# Structs
# ---------------------------------------------------------------------------


class _Wire(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename=go_name, gc=False
):
    """Base of all wire structs: frozen, keyword-only, Go names, compact."""


# -- /key and the early payload ---------------------------------------------


class OverTLSPublicKeyResponse(_Wire, frozen=True, kw_only=True, rename="camel"):
    """Body of ``GET /key?v=N`` (docs/control-protocol.md §2).

    Attributes:
        legacy_public_key: Retired NaCl-box key; send :func:`zero_key`, never "".
        public_key: The server's Noise static key. Must be non-zero.
    """

    legacy_public_key: MachineKeyText
    public_key: MachineKeyText


class EarlyNoise(_Wire, frozen=True, kw_only=True, rename="camel"):
    """JSON of the early payload sent inside Noise before HTTP/2 (§5.1)."""

    node_key_challenge: ChallengeKeyText


# -- users ----------------------------------------------------------------


class User(_Wire, frozen=True, kw_only=True):
    """``tailcfg.User`` as returned in :class:`RegisterResponse`."""

    id: int = 0
    display_name: str = ""
    profile_pic_url: str = ""
    created: Time | None = None


class Login(_Wire, frozen=True, kw_only=True):
    """``tailcfg.Login`` as returned in :class:`RegisterResponse`."""

    id: int = 0
    provider: str = ""
    login_name: str = ""
    display_name: str = ""
    profile_pic_url: str = ""


class UserProfile(_Wire, frozen=True, kw_only=True):
    """``tailcfg.UserProfile``; every ``Node.User`` needs one in the map."""

    id: int
    login_name: str = ""
    display_name: str = ""
    profile_pic_url: str = ""
    groups: list[str] | None = None


# -- host information -------------------------------------------------------


class Service(_Wire, frozen=True, kw_only=True):
    """A service listening on the host (``Hostinfo.Services``)."""

    proto: str = ""  # "tcp", "udp", "peerapi4", "peerapi6", "peerapi-dns-proxy"
    port: int = 0
    description: str = ""


class Location(_Wire, frozen=True, kw_only=True):
    """Geographic hint of a node (``Hostinfo.Location``)."""

    country: str = ""
    country_code: str = ""
    city: str = ""
    city_code: str = ""
    latitude: float = 0.0
    longitude: float = 0.0
    priority: int = 0


class TPMInfo(_Wire, frozen=True, kw_only=True):
    """TPM metadata (``Hostinfo.TPM``)."""

    manufacturer: str = ""
    vendor: str = ""
    model: int = 0
    firmware_version: int = 0
    spec_revision: int = 0
    family_indicator: str = ""


class NetInfo(_Wire, frozen=True, kw_only=True):
    """``tailcfg.NetInfo``: network conditions reported by the client.

    Since client 1.66 it is only sent when it changed: a server must keep the
    previous value when a Hostinfo arrives without it (pitfall 12).
    ``opt.Bool`` fields are ``bool | None`` (``None`` = unknown).
    """

    mapping_varies_by_dest_ip: bool | None = None
    working_ipv6: bool | None = None
    os_has_ipv6: bool | None = None
    working_udp: bool | None = None
    working_icmpv4: bool | None = None
    have_port_map: bool = False
    upnp: bool | None = None
    pmp: bool | None = None
    pcp: bool | None = None
    preferred_derp: int = 0  # becomes the peers' Node.HomeDERP
    link_type: str = ""
    derp_latency: dict[str, float] | None = None
    firewall_mode: str = ""


class Hostinfo(_Wire, frozen=True, kw_only=True):
    """``tailcfg.Hostinfo``; passed through to peers as ``Node.Hostinfo``."""

    ipn_version: str = ""
    frontend_log_id: str = ""
    backend_log_id: str = ""
    os: str = ""
    os_version: str = ""
    container: bool | None = None
    env: str = ""
    distro: str = ""
    distro_version: str = ""
    distro_code_name: str = ""
    app: str = ""
    desktop: bool | None = None
    package: str = ""
    device_model: str = ""
    push_device_token: str = ""
    hostname: str = ""
    shields_up: bool = False
    sharee_node: bool = False
    no_logs_no_support: bool = False
    remote_config: bool = False
    wire_ingress: bool = False
    ingress_enabled: bool = False
    allows_update: bool = False
    machine: str = ""
    go_arch: str = ""
    go_arch_var: str = ""
    go_version: str = ""
    routable_ips: list[str] | None = None  # prefixes, e.g. "10.0.0.0/24"
    request_tags: list[str] | None = None
    wol_macs: list[str] | None = None
    services: list[Service] | None = None
    net_info: NetInfo | None = None
    ssh_host_keys: list[str] | None = None  # JSON "sshHostKeys"
    cloud: str = ""
    userspace: bool | None = None
    userspace_router: bool | None = None
    app_connector: bool | None = None
    services_hash: str = ""
    peer_relay: bool = False
    exit_node_id: str = ""
    location: Location | None = None
    tpm: TPMInfo | None = None
    state_encrypted: bool | None = None


class PeerHostinfo(_Wire, frozen=True, kw_only=True):
    """A :class:`Hostinfo` as the server keeps it and peers see it (``Node.Hostinfo``).

    What peers' clients read (names and platform for status and UIs, peerapi
    ``Services``, ``sshHostKeys`` for Tailscale SSH, ``WoLMACs`` to wake it, ``Location``
    and the app-connector and peer-relay flags to pick nodes, the routes and tags it
    asks for) and what the server itself records (host name, OS, routes). Everything
    else stays with the node: log ids, the push token, the exit node it uses, TPM and
    posture data, and ``NetInfo`` (its DERP home is kept apart, as ``HomeDERP``).

    Its own type, not a trimmed :class:`Hostinfo`: one is kept per node, and a struct
    with only these fields is half the size. The fields keep Hostinfo's names, types,
    defaults and relative order, so both encode to the same bytes (omitted defaults).
    """

    ipn_version: str = ""
    os: str = ""
    os_version: str = ""
    distro: str = ""
    distro_version: str = ""
    app: str = ""
    package: str = ""
    device_model: str = ""
    hostname: str = ""
    shields_up: bool = False
    wire_ingress: bool = False
    ingress_enabled: bool = False
    routable_ips: list[str] | None = None
    request_tags: list[str] | None = None
    wol_macs: list[str] | None = None
    services: list[Service] | None = None
    ssh_host_keys: list[str] | None = None
    userspace: bool | None = None
    userspace_router: bool | None = None
    app_connector: bool | None = None
    services_hash: str = ""
    peer_relay: bool = False
    location: Location | None = None


#: The kept fields whose values most nodes repeat (client version, OS, distribution,
#: app): one shared string each, not one per node (see projections.state.shared_str).
SHARED_HOSTINFO_FIELDS: Final = (
    "ipn_version",
    "os",
    "os_version",
    "distro",
    "distro_version",
    "app",
    "package",
    "device_model",
)

#: The Hostinfo fields the server keeps and shows to peers: :class:`PeerHostinfo`'s.
PEER_HOSTINFO_FIELDS: Final = PeerHostinfo.__struct_fields__


def peer_hostinfo(hostinfo: Hostinfo, **changes: object) -> PeerHostinfo:
    """``hostinfo`` trimmed to :data:`PEER_HOSTINFO_FIELDS` (with ``changes`` applied),
    as the server stores it and copies it into peers' maps."""
    kept = {name: getattr(hostinfo, name) for name in PEER_HOSTINFO_FIELDS}
    kept.update(changes)
    for name in SHARED_HOSTINFO_FIELDS:
        value = kept[name]
        if isinstance(value, str):
            kept[name] = shared_str(value)
    return PeerHostinfo(**kept)


# -- register ---------------------------------------------------------------


class RegisterResponseAuth(_Wire, frozen=True, kw_only=True):
    """``RegisterRequest.Auth``: a pre-auth key (or a pre-1.66 Android token)."""

    oauth2_token: OptionalRaw = None
    auth_key: str = ""


class RegisterRequest(_Wire, frozen=True, kw_only=True):
    """Body of ``POST /machine/register`` (§7.1).

    Attributes:
        expiry: Zero = no request; in the past = logout (clients send
            ``1970-01-01T00:02:03Z`` at their local offset); in the future =
            "shorten my expiry". Use :func:`time_or_none`.
        followup: Non-empty = block until this AuthURL is completed.
        old_node_key: All-zero unless the client rotated its key.
    """

    version: int = 0
    node_key: NodeKeyText | None = None
    old_node_key: NodeKeyText | None = None
    nl_key: NLKeyText | None = None
    auth: RegisterResponseAuth | None = None
    expiry: Time | None = None
    followup: str = ""
    hostinfo: Hostinfo | None = None
    ephemeral: bool = False
    node_key_signature: bytes | None = None
    signature_type: int = 0
    timestamp: Time | None = None
    device_cert: bytes | None = None
    signature: bytes | None = None
    tailnet: str = ""


class RegisterResponse(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False, rename=go_name, gc=False
):
    """Answer to ``POST /machine/register`` (§7.2).

    Go's struct has no ``omitempty`` tags, so every field is emitted
    (``"AuthURL":""``, ``"NodeKeySignature":null``), matching Headscale.
    The client checks, in order: ``Error``, ``NodeKeySignature``,
    ``NodeKeyExpired``, then stores ``User``/``Login``, then ``AuthURL``.
    """

    user: User = msgspec.field(default_factory=User)
    login: Login = msgspec.field(default_factory=Login)
    node_key_expired: bool = False
    machine_authorized: bool = False
    auth_url: str = ""
    node_key_signature: bytes | None = None
    error: str = ""


# -- map request --------------------------------------------------------------


class MapRequest(_Wire, frozen=True, kw_only=True):
    """Body of ``POST /machine/map`` (§8.1).

    Three shapes: long poll (``stream``), lite update (``omit_peers`` and not
    ``stream``), one-shot (neither). ``endpoint_types`` parallels
    ``endpoints``: 0 unknown, 1 local, 2 stun, 3 portmap, 4 stun4localport,
    5 explicitconf.
    """

    version: int = 0
    compress: str = ""  # "zstd" for every v1.90+/HEAD client
    keep_alive: bool = False
    node_key: NodeKeyText | None = None
    disco_key: DiscoKeyText | None = None
    hardware_attestation_key: str = ""
    hardware_attestation_key_signature: bytes | None = None
    hardware_attestation_key_signature_timestamp: Time | None = None
    stream: bool = False
    hostinfo: Hostinfo | None = None
    map_session_handle: str = ""
    map_session_seq: int = 0
    endpoints: list[str] | None = None  # "ip:port"
    endpoint_types: list[int] | None = None
    tka_head: str = ""
    read_only: bool = False
    omit_peers: bool = False
    debug_flags: list[str] | None = None
    connection_handle_for_test: str = ""


# -- DERP ---------------------------------------------------------------------


class DERPNode(_Wire, frozen=True, kw_only=True):
    """One DERP/STUN server (``tailcfg.DERPNode``).

    ``stun_port``: 0 = 3478, -1 = off. ``derp_port``: 0 = 443.
    ``ipv4``/``ipv6``: ``"none"`` disables that family.
    """

    name: str
    region_id: int
    host_name: str
    cert_name: str = ""
    ipv4: str = ""
    ipv6: str = ""
    stun_port: int = 0
    stun_only: bool = False
    derp_port: int = 0
    insecure_for_tests: bool = False
    stun_test_ip: str = ""
    can_port80: bool = False


class DERPRegion(_Wire, frozen=True, kw_only=True):
    """A DERP region (``tailcfg.DERPRegion``); IDs are 1 ... 2^53-1."""

    region_id: int
    region_code: str = ""
    region_name: str = ""
    latitude: float = 0.0
    longitude: float = 0.0
    avoid: bool = False
    no_measure_no_home: bool = False
    nodes: list[DERPNode] | None = None


class DERPHomeParams(_Wire, frozen=True, kw_only=True):
    """``DERPMap.HomeParams``: per-region score multipliers."""

    region_score: dict[int, float] | None = None


class DERPMap(_Wire, frozen=True, kw_only=True):
    """``tailcfg.DERPMap``; sticky per stream, ``regions=None`` keeps the old ones.

    Never put a ``null`` region value (pitfall 6): the dict only holds real regions.
    """

    home_params: DERPHomeParams | None = None
    regions: dict[int, DERPRegion] | None = None
    omit_default_regions: bool = False  # JSON "omitDefaultRegions"


# -- DNS ----------------------------------------------------------------------


class DNSResolver(_Wire, frozen=True, kw_only=True):
    """``dnstype.Resolver``: ``addr`` is an IP, ``ip:port``, or a DoH/DoT URL."""

    addr: str = ""
    bootstrap_resolution: list[str] | None = None
    use_with_exit_node: bool = False


class DNSRecord(_Wire, frozen=True, kw_only=True):
    """An extra MagicDNS record (``DNSConfig.ExtraRecords``)."""

    name: str
    type: str = ""  # "" = A or AAAA, from the value
    value: str = ""


class DNSConfig(_Wire, frozen=True, kw_only=True):
    """``tailcfg.DNSConfig``; sticky per stream.

    ``routes`` values: an empty list means "answered by 100.100.100.100".
    """

    resolvers: list[DNSResolver] | None = None
    routes: dict[str, list[DNSResolver] | None] | None = None
    fallback_resolvers: list[DNSResolver] | None = None
    domains: list[str] | None = None
    proxied: bool = False  # MagicDNS on
    nameservers: list[str] | None = None
    cert_domains: list[str] | None = None
    extra_records: list[DNSRecord] | None = None
    exit_node_filtered_set: list[str] | None = None
    temp_corp_issue13969: str = ""


# -- nodes ----------------------------------------------------------------------


class Node(_Wire, frozen=True, kw_only=True):
    """``tailcfg.Node``: the self node or a peer (§9.1).

    Attributes:
        name: FQDN with a trailing dot; the self node's defines the MagicDNS suffix.
        addresses: The node's own tailnet prefixes (``/32``, ``/128``).
        allowed_ips: ``None`` = same as ``addresses`` (cap >= 112); ``[]``
            routes *nothing*. Add approved subnet/exit routes here.
        home_derp: From the node's ``NetInfo.PreferredDERP``.
        cap: The node's *own* capability version.
        online: ``None`` = unknown.
        last_seen: Only for offline nodes (pitfall 13).
        cap_map: Capability -> list of raw JSON values (or null).
    """

    id: int
    stable_id: str = ""
    name: str = ""
    user: int = 0
    sharer: int = 0
    key: NodeKeyText | None = None
    key_expiry: Time | None = None  # None / zero = never expires
    key_signature: bytes | None = None
    machine: MachineKeyText | None = None
    disco_key: DiscoKeyText | None = None
    addresses: list[str] | None = None
    allowed_ips: list[str] | None = None
    endpoints: list[str] | None = None
    legacy_derp_string: str = ""  # JSON "DERP", "127.3.3.40:<region>"; deprecated
    home_derp: int = 0
    hostinfo: PeerHostinfo | None = None
    created: Time | None = None
    cap: int = 0
    tags: list[str] | None = None
    primary_routes: list[str] | None = None
    last_seen: Time | None = None
    online: bool | None = None
    machine_authorized: bool = False  # self: must be true to reach Running
    capabilities: list[str] | None = None
    cap_map: dict[str, list[msgspec.Raw] | None] | None = None
    unsigned_peer_api_only: bool = False
    computed_name: str = ""  # client-computed; never send
    computed_name_with_host: str = ""  # client-computed; never send
    data_plane_audit_log_id: str = ""
    expired: bool = False
    self_node_v4_masq_addr_for_this_peer: str | None = None
    self_node_v6_masq_addr_for_this_peer: str | None = None
    is_wireguard_only: bool = False
    is_jailed: bool = False
    exit_node_dns_resolvers: list[DNSResolver] | None = None


class PeerChange(_Wire, frozen=True, kw_only=True):
    """A field patch for a known peer (``MapResponse.PeersChangedPatch``).

    Absent / zero fields mean "unchanged". When patching ``disco_key`` of an
    offline peer, HEAD clients also want a newer ``last_seen`` (§8.6).
    """

    node_id: int
    derp_region: int = 0
    cap: int = 0
    cap_map: dict[str, list[msgspec.Raw] | None] | None = None
    endpoints: list[str] | None = None
    key: NodeKeyText | None = None
    key_signature: bytes | None = None
    disco_key: DiscoKeyText | None = None
    online: bool | None = None
    last_seen: Time | None = None
    key_expiry: Time | None = None


# -- map response helpers -------------------------------------------------------


class PingRequest(_Wire, frozen=True, kw_only=True):
    """Server-initiated ping / c2n request (``MapResponse.PingRequest``)."""

    url: str
    url_is_noise: bool = False
    log: bool = False
    types: str = ""  # "" = HEAD url; "c2n"; or "disco,TSMP,ICMP,peerapi"
    ip: str = ""
    payload: bytes | None = None


class DisplayMessageAction(_Wire, frozen=True, kw_only=True):
    """Button of a :class:`DisplayMessage`."""

    url: str
    label: str


class DisplayMessage(_Wire, frozen=True, kw_only=True):
    """A health message shown by the client (cap >= 117)."""

    title: str
    text: str = ""
    severity: str = ""  # "high", "medium", "low"
    impacts_connectivity: bool = False
    primary_action: DisplayMessageAction | None = None


class ClientVersion(_Wire, frozen=True, kw_only=True):
    """Update information (``MapResponse.ClientVersion``)."""

    running_latest: bool = False
    latest_version: str = ""
    urgent_security_update: bool = False
    notify: bool = False
    notify_url: str = ""
    notify_text: str = ""


class ControlIPCandidate(_Wire, frozen=True, kw_only=True):
    """One way to reach control (``ControlDialPlan.Candidates``)."""

    ip: str = ""
    ace_host: str = ""
    dial_start_delay_sec: float = 0.0
    dial_timeout_sec: float = 0.0
    priority: int = 0


class ControlDialPlan(_Wire, frozen=True, kw_only=True):
    """``MapResponse.ControlDialPlan``; sticky."""

    candidates: list[ControlIPCandidate] | None = None


class TKAInfo(_Wire, frozen=True, kw_only=True):
    """Tailnet-lock state; ``None`` in the first map = tailnet lock off."""

    head: str = ""
    disabled: bool = False


class Debug(_Wire, frozen=True, kw_only=True):
    """``MapResponse.Debug``; send ``disable_log_tail=True`` (pitfall 19)."""

    sleep_seconds: float = 0.0
    disable_log_tail: bool = False
    exit: int | None = None


class MapResponse(_Wire, frozen=True, kw_only=True):
    """One message of the ``/machine/map`` stream (§8.5).

    "Sticky" fields, when absent, keep their value from earlier messages of
    the same stream. The first non-keep-alive message must contain ``node``.
    ``peers`` replaces the whole peer list and is only honoured when
    non-empty; use ``peers_removed`` to reach zero peers.

    Attributes:
        packet_filter: Pre-encoded ``[]FilterRule``; ``Raw(b"[]")`` = deny all.
        packet_filters: Name -> pre-encoded ``[]FilterRule``; a
            :data:`RAW_NULL` value deletes that name, ``"*": RAW_NULL`` clears all.
        ssh_policy: Pre-encoded ``tailcfg.SSHPolicy``.
        peer_seen_change: Node ID -> True (LastSeen = now) / False (cleared).
        online_change: Node ID -> online.
    """

    map_session_handle: str = ""
    seq: int = 0
    keep_alive: bool = False
    ping_request: PingRequest | None = None
    pop_browser_url: str = ""
    node: Node | None = None
    derp_map: DERPMap | None = None
    peers: list[Node] | None = None
    peers_changed: list[Node] | None = None
    peers_removed: list[int] | None = None
    peers_changed_patch: list[PeerChange] | None = None
    peer_seen_change: dict[int, bool] | None = None
    online_change: dict[int, bool] | None = None
    dns_config: DNSConfig | None = None
    domain: str = ""
    collect_services: bool | None = None
    packet_filter: OptionalRaw = None
    packet_filters: dict[str, msgspec.Raw] | None = None
    user_profiles: list[UserProfile] | None = None
    health: list[str] | None = None
    display_messages: dict[str, DisplayMessage | None] | None = None
    ssh_policy: OptionalRaw = None
    control_time: Time | None = None
    tka_info: TKAInfo | None = None
    domain_data_plane_audit_log_id: str = ""
    debug: Debug | None = None
    control_dial_plan: ControlDialPlan | None = None
    client_version: ClientVersion | None = None
    deprecated_default_auto_update: bool | None = None  # JSON "DefaultAutoUpdate"

    def __post_init__(self) -> None:
        _check_raw(self.packet_filter, "PacketFilter")
        _check_raw(self.ssh_policy, "SSHPolicy")
        if self.packet_filters is not None:
            for name, rules in self.packet_filters.items():
                _check_raw(rules, f"PacketFilters[{name!r}]")


# ---------------------------------------------------------------------------
# Encoding and decoding
# ---------------------------------------------------------------------------

_encoder: Final = msgspec.json.Encoder()

_T = TypeVar("_T", bound=msgspec.Struct)
_decoders: dict[type[msgspec.Struct], msgspec.json.Decoder[msgspec.Struct]] = {}


def encode(value: msgspec.Struct) -> bytes:
    """Encode a wire struct to compact JSON bytes."""
    return _encoder.encode(value)


def decode(data: bytes | bytearray | memoryview, kind: type[_T]) -> _T:
    """Decode JSON into ``kind`` with a cached decoder (unknown fields ignored).

    Raises:
        msgspec.DecodeError: Not JSON.
        msgspec.ValidationError: Wrong types, malformed keys or times.
    """
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    result = decoder.decode(data)
    assert isinstance(result, kind)
    return result


def decode_register_request(data: bytes | bytearray | memoryview) -> RegisterRequest:
    """Decode a ``/machine/register`` body; see :func:`decode` for errors."""
    return decode(data, RegisterRequest)


def decode_register_response(data: bytes | bytearray | memoryview) -> RegisterResponse:
    """Decode a register answer (client side)."""
    return decode(data, RegisterResponse)


def decode_map_request(data: bytes | bytearray | memoryview) -> MapRequest:
    """Decode a ``/machine/map`` body; see :func:`decode` for errors."""
    return decode(data, MapRequest)


def decode_map_response(data: bytes | bytearray | memoryview) -> MapResponse:
    """Decode one (decompressed) map message (client side)."""
    return decode(data, MapResponse)
