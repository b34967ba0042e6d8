"""What the control logic is configured with, and what its limits refused.

:class:`ControlSettings` comes from the configuration (``cli.network`` builds it once)
and is read by every part of the package: registration reads the address plan, the key
expiry and the limits; the map streams read the netmap settings and the timings (and
replace the netmap part when the DERP map or the DNS configuration changes);
Hostinfo handling reads :class:`ControlLimits`. :class:`ControlStats` is one record
shared by the parts that refuse or drop something, exported as metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from projections import AddressPlan
from projections import commands as c
from projections.netmap import NetmapSettings

__all__ = ["ControlLimits", "ControlSettings", "ControlStats"]


@dataclass(frozen=True)
class ControlLimits:
    """What one node may make the server keep or write (``[limits]`` in the config)."""

    #: Largest Hostinfo accepted, in bytes of JSON.
    max_hostinfo_bytes: int = 16384
    #: Longest host name recorded (longer ones are cut).
    max_hostname_length: int = c.MAX_HOSTNAME_LENGTH
    #: Most routes one node may advertise.
    max_advertised_routes: int = 512
    #: Log-writing updates per node: a bucket of this many...
    node_update_burst: int = 10
    #: ...regaining one every this many seconds.
    node_update_interval: float = 30.0


@dataclass
class ControlStats:
    """What the limits refused or dropped (exported as metrics)."""

    #: Requests refused because their Hostinfo was larger than the limit.
    hostinfo_too_large: int = 0
    #: Requests refused because they advertised too many routes.
    too_many_routes: int = 0
    #: Host names cut to the limit (or cleaned of control characters).
    hostnames_cleaned: int = 0
    #: Log-writing updates refused by the per-node rate limit.
    updates_rate_limited: int = 0
    #: Hostinfo updates ignored because the node's key expired or it logged out.
    expired_updates_ignored: int = 0
    #: Map long-polls ended by a newer one of the same node.
    streams_superseded: int = 0
    #: Keep-alives sent to parked map streams by their transport at once (no task).
    keepalives_direct: int = 0
    #: Keep-alives sent by map streams that were resumed (their transport could not
    #: send at once, or a publication woke them with nothing for them).
    keepalives_resumed: int = 0
    #: Updates sent to parked map streams by their transport at once (no task).
    updates_direct: int = 0


@dataclass(frozen=True)
class ControlSettings:
    """Configuration the control logic needs (from ``cli.config``)."""

    public_url: str
    plan: AddressPlan
    netmap: NetmapSettings
    node_key_expiry: timedelta | None = None
    keepalive_interval: float = 55.0
    coalesce: float = 0.05
    presence_coalesce: float = 0.5
    offline_grace: float = 5.0
    ephemeral_timeout: timedelta | None = timedelta(minutes=30)
    #: Full maps being sent at once; other new streams wait their turn (a restart's
    #: reconnect herd would otherwise buffer one full map per client at the same time).
    full_map_concurrency: int = 32
    #: Longest a full map may hold its turn (a client that stopped reading).
    full_map_turn: float = 10.0
    limits: ControlLimits = field(default_factory=ControlLimits)
