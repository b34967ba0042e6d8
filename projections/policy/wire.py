"""Output Structs whose JSON encoding is exactly tailcfg's.

Role in the pipeline: the last stage. The netmap builder embeds
``msgspec.json.encode(rules)`` as ``MapResponse.PacketFilter`` and
``msgspec.json.encode(ssh_policy)`` as ``MapResponse.SSHPolicy`` without
touching them again, so field names and omission rules must match the Go
structs in ``tailscale.com/tailcfg`` byte for byte:

* ``FilterRule``: ``SrcIPs`` is always present; ``DstPorts``, ``IPProto``
  and ``CapGrant`` are ``omitempty``.
* ``NetPortRange``: ``IP`` and ``Ports`` are always present, and
  ``PortRange`` always carries ``First`` and ``Last`` (0 included), so those
  fields have no defaults (``omit_defaults`` never drops them).
* ``SSHPolicy`` and friends use lower-case JSON names; ``principals``,
  ``sshUsers`` and ``action`` are always present on a rule.
* Capability values are ``tailcfg.RawMessage``: already-encoded JSON, held
  here as :class:`msgspec.Raw` so they are copied verbatim.

These types live in ``projections`` (not ``protocol``) because imports flow
one way: ``protocol`` may embed them, ``projections`` may not import
``protocol``.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "CapGrant",
    "FilterRule",
    "NetPortRange",
    "PortRangeWire",
    "SSHAction",
    "SSHPolicy",
    "SSHPrincipal",
    "SSHRuleWire",
]


class PortRangeWire(msgspec.Struct, frozen=True, rename="pascal"):
    """tailcfg.PortRange: ``{"First": 0, "Last": 65535}``."""

    first: int
    last: int


class NetPortRange(msgspec.Struct, frozen=True, rename={"ip": "IP", "ports": "Ports"}):
    """tailcfg.NetPortRange: a destination IP (or ``*``) and port range."""

    ip: str
    ports: PortRangeWire


class CapGrant(
    msgspec.Struct,
    frozen=True,
    omit_defaults=True,
    rename={"dsts": "Dsts", "cap_map": "CapMap"},
):
    """tailcfg.CapGrant: app capabilities granted toward ``dsts``.

    ``cap_map`` values are JSON arrays already encoded (tailcfg.RawMessage).
    """

    dsts: tuple[str, ...]
    cap_map: dict[str, msgspec.Raw | None]


class FilterRule(
    msgspec.Struct,
    frozen=True,
    omit_defaults=True,
    rename={
        "src_ips": "SrcIPs",
        "dst_ports": "DstPorts",
        "ip_proto": "IPProto",
        "cap_grant": "CapGrant",
    },
):
    """tailcfg.FilterRule: one packet-filter (or cap-grant) rule."""

    src_ips: tuple[str, ...]
    dst_ports: tuple[NetPortRange, ...] = ()
    ip_proto: tuple[int, ...] = ()
    cap_grant: tuple[CapGrant, ...] = ()


class SSHPrincipal(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """tailcfg.SSHPrincipal (this engine only emits ``nodeIP``)."""

    node: str = ""
    node_ip: str = msgspec.field(default="", name="nodeIP")
    user_login: str = ""
    any: bool = False


class SSHAction(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """tailcfg.SSHAction."""

    message: str = ""
    reject: bool = False
    accept: bool = False
    session_duration: int = 0
    allow_agent_forwarding: bool = False
    hold_and_delegate: str = ""
    allow_local_port_forwarding: bool = False
    allow_remote_port_forwarding: bool = False


class SSHRuleWire(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """tailcfg.SSHRule."""

    principals: tuple[SSHPrincipal, ...]
    ssh_users: dict[str, str]
    action: SSHAction
    accept_env: tuple[str, ...] = ()


class SSHPolicy(msgspec.Struct, frozen=True, rename="camel"):
    """tailcfg.SSHPolicy: first matching rule wins, so order is meaning."""

    rules: tuple[SSHRuleWire, ...] = ()
