"""The DERP map clients receive: sources, the embedded region, and the merge (pure).

Role in the pipeline
--------------------
Every ``MapResponse`` carries a ``DERPMap`` telling clients which relays exist.
Ours is assembled from up to four kinds of source, each already *read* by
someone else (files by the config loader, URLs by :func:`relay.fetch_derp_map`);
this module only parses bytes and merges values, so it can be replayed and
tested without I/O:

1. Tailscale's default map (``https://controlplane.tailscale.com/derpmap/default``),
   unless ``omit_default_regions`` is set or any source asks for it with
   ``"omitDefaultRegions": true`` (Tailscale's own policy-file semantics).
2. Maps from files and URLs, in configuration order (JSON or HuJSON: JSON
   plus comments and trailing commas).
3. The embedded region: our own relay (:mod:`relay`), off by default as in
   Headscale, region 999 by default, built with :func:`embedded_region`.

Merge rules (:func:`merge_derp_maps`)
-------------------------------------
* Regions are keyed by ID; a *later* source replaces an earlier source's region
  with the same ID as a whole (no field-level merging, like Headscale's
  ``mergeDERPMaps``).  The embedded region comes last, so it wins.
* A source may map an ID to ``null`` to delete that region from what came
  before (this is how a Tailscale policy file removes a default region).
  ``null`` never reaches the output: the result only holds real regions
  (pitfall 6: a ``null`` region crashes older clients).
* Region IDs must be 1 ... 2^53-1 (they must survive a JavaScript number).
  A region's ``RegionID`` must equal its key and every node's ``RegionID``
  must equal its region's; zero/missing IDs are filled in from the key.
* ``HomeParams.RegionScore`` entries merge key by key, later wins; scores for
  regions absent from the result are dropped.
* The output's ``omitDefaultRegions`` is always false: the map we send is
  complete, clients have nothing to omit.

Foot-gun: a single embedded region is a single point of failure
------------------------------------------------------------------
With ``omit_default_regions`` and only the embedded relay, every client of the
tailnet depends on that one process for NAT traversal (disco goes over DERP)
and as the fallback path.  If it is down or unreachable, peers that cannot
talk directly lose each other.  Run several relays meshed into one region
(``relay.MeshPeer``), keep the default map, or add other regions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import json5
import msgspec

from .errors import ProjectionError
from .tailcfg import DERPHomeParams, DERPMap, DERPNode, DERPRegion

__all__ = [
    "DEFAULT_EMBEDDED_REGION_ID",
    "MAX_REGION_ID",
    "DERPHomeParams",
    "DERPMap",
    "DERPNode",
    "DERPRegion",
    "DerpMapError",
    "DerpMapSource",
    "embedded_region",
    "merge_derp_maps",
    "parse_derp_map",
    "single_point_of_failure",
]

MAX_REGION_ID = (1 << 53) - 1
"""Largest valid region ID (JavaScript's ``Number.MAX_SAFE_INTEGER``)."""

DEFAULT_EMBEDDED_REGION_ID = 999
"""Headscale's default for the embedded relay; 900-999 are reserved for end users."""


class DerpMapError(ProjectionError):
    """A DERP map source is unusable (syntax, invalid region ID, inconsistent IDs)."""


class DerpMapSource(msgspec.Struct, frozen=True, kw_only=True):
    """One parsed DERP map source, before merging.

    Attributes:
        name: where it came from (file path, URL), for error messages.
        regions: region ID to region, or to ``None`` meaning "delete this ID".
        omit_default_regions: the source asked to drop Tailscale's defaults.
        home_params: its ``HomeParams``, if any.
    """

    name: str
    regions: dict[int, DERPRegion | None]
    omit_default_regions: bool = False
    home_params: DERPHomeParams | None = None


# -- parsing -----------------------------------------------------------------

_MAP_FIELDS = {fl.encode_name.lower(): fl.encode_name for fl in msgspec.structs.fields(DERPMap)}
_REGION_FIELDS = {
    fl.encode_name.lower(): fl.encode_name for fl in msgspec.structs.fields(DERPRegion)
}
_NODE_FIELDS = {fl.encode_name.lower(): fl.encode_name for fl in msgspec.structs.fields(DERPNode)}


def _canonical(obj: Mapping[str, object], names: Mapping[str, str]) -> dict[str, object]:
    # Go's encoding/json (and Headscale's YAML loader) match field names
    # case-insensitively; hand-written maps use "hostname", "HostName", ...
    return {names.get(k.lower(), k): v for k, v in obj.items()}


def _valid_id(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DerpMapError(f"{where}: region ID {value!r} is not an integer")
    if not 1 <= value <= MAX_REGION_ID:
        raise DerpMapError(f"{where}: region ID {value} is outside 1..2^53-1")
    return value


def _region(raw: object, rid: int, where: str) -> DERPRegion:
    if not isinstance(raw, Mapping):
        raise DerpMapError(f"{where}: region {rid} is not an object")
    doc = _canonical(raw, _REGION_FIELDS)
    declared = doc.get("RegionID") or rid
    if _valid_id(declared, where) != rid:
        raise DerpMapError(f"{where}: region under key {rid} says RegionID {declared}")
    doc["RegionID"] = rid
    nodes = doc.get("Nodes")
    if nodes is not None:
        if not isinstance(nodes, list):
            raise DerpMapError(f"{where}: region {rid}: Nodes is not a list")
        fixed: list[dict[str, object]] = []
        for node in nodes:
            if not isinstance(node, Mapping):
                raise DerpMapError(f"{where}: region {rid}: a node is not an object")
            nd = _canonical(node, _NODE_FIELDS)
            node_rid = nd.get("RegionID") or rid
            if node_rid != rid:
                raise DerpMapError(f"{where}: node {nd.get('Name')!r} says RegionID {node_rid}")
            nd["RegionID"] = rid
            nd.setdefault("Name", f"{rid}{chr(ord('a') + len(fixed) % 26)}")
            if not nd.get("HostName"):
                raise DerpMapError(f"{where}: node {nd['Name']!r} in region {rid} has no HostName")
            fixed.append(nd)
        doc["Nodes"] = fixed
    try:
        return msgspec.convert(doc, DERPRegion)
    except msgspec.ValidationError as exc:
        raise DerpMapError(f"{where}: region {rid}: {exc}") from exc


def parse_derp_map(data: bytes | str, *, name: str = "<derp map>") -> DerpMapSource:
    """Parse one DERP map document (JSON or HuJSON) into a :class:`DerpMapSource`.

    Accepts the ``tailcfg.DERPMap`` shape (``{"Regions": {"900": {...}}}``),
    field names in any case, and ``null`` region values (deletions).

    Raises:
        DerpMapError: not parseable, or any rule in the module docstring broken.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        raw: object = json5.loads(text)
    except ValueError as exc:
        raise DerpMapError(f"{name}: not JSON/HuJSON: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise DerpMapError(f"{name}: a DERP map must be an object")
    doc = _canonical(raw, _MAP_FIELDS)
    raw_regions = doc.get("Regions") or {}
    if not isinstance(raw_regions, Mapping):
        raise DerpMapError(f"{name}: Regions must be an object")
    regions: dict[int, DERPRegion | None] = {}
    for key, value in raw_regions.items():
        try:
            rid = int(str(key), 10)
        except ValueError as exc:
            raise DerpMapError(f"{name}: region key {key!r} is not an integer") from exc
        _valid_id(rid, name)
        regions[rid] = None if value is None else _region(value, rid, name)
    omit = doc.get("omitDefaultRegions", False)
    if not isinstance(omit, bool):
        raise DerpMapError(f"{name}: omitDefaultRegions must be a boolean")
    home: DERPHomeParams | None = None
    raw_home = doc.get("HomeParams")
    if raw_home is not None:
        if not isinstance(raw_home, Mapping):
            raise DerpMapError(f"{name}: HomeParams must be an object")
        scores = _canonical(raw_home, {"regionscore": "RegionScore"}).get("RegionScore")
        try:
            home = msgspec.convert(
                {"RegionScore": scores} if scores is not None else {},
                DERPHomeParams,
                strict=False,
            )
        except msgspec.ValidationError as exc:
            raise DerpMapError(f"{name}: HomeParams: {exc}") from exc
    return DerpMapSource(name=name, regions=regions, omit_default_regions=omit, home_params=home)


def source_from_map(derp_map: DERPMap, *, name: str) -> DerpMapSource:
    """Wrap an already-typed :class:`DERPMap` (e.g. Tailscale's default) as a source.

    Raises:
        DerpMapError: a region ID is invalid or inconsistent.
    """
    regions: dict[int, DERPRegion | None] = {}
    for rid, region in (derp_map.regions or {}).items():
        _valid_id(rid, name)
        if region.region_id != rid:
            raise DerpMapError(f"{name}: region under key {rid} says RegionID {region.region_id}")
        regions[rid] = region
    return DerpMapSource(
        name=name,
        regions=regions,
        omit_default_regions=derp_map.omit_default_regions,
        home_params=derp_map.home_params,
    )


# -- the embedded region -------------------------------------------------------


def embedded_region(
    *,
    host_name: str,
    derp_port: int,
    stun_port: int = 3478,
    cert_name: str | None = None,
    region_id: int = DEFAULT_EMBEDDED_REGION_ID,
    region_code: str = "tailledger",
    region_name: str = "tailledger embedded DERP",
    ipv4: str | None = None,
    ipv6: str | None = None,
    node_name: str | None = None,
) -> DERPRegion:
    """Describe our own relay as a one-node region.

    Args:
        host_name: name (or IP literal) clients dial and check the certificate against.
        derp_port: public HTTPS port of the relay (443 is written as 0, the default).
        stun_port: public STUN port (3478 is written as 0); -1 disables STUN.
        cert_name: ``sha256-raw:<hex>`` when the relay uses its self-signed cert.
        region_id: 1..2^53-1; 999 by default.
        region_code: short code shown by ``tailscale netcheck``.
        region_name: long name.
        ipv4: force this IPv4 address instead of DNS (``"none"`` disables IPv4).
        ipv6: likewise for IPv6.
        node_name: unique node name; defaults to ``"<region_id>a"``.

    Raises:
        DerpMapError: invalid region ID or ports.
    """
    _valid_id(region_id, "embedded region")
    if not 0 < derp_port < 65536:
        raise DerpMapError(f"embedded region: invalid DERP port {derp_port}")
    if not (stun_port == -1 or 0 < stun_port < 65536):
        raise DerpMapError(f"embedded region: invalid STUN port {stun_port}")
    node = DERPNode(
        name=node_name or f"{region_id}a",
        region_id=region_id,
        host_name=host_name,
        cert_name=cert_name or "",
        ipv4=ipv4 or "",
        ipv6=ipv6 or "",
        stun_port=0 if stun_port == 3478 else stun_port,
        derp_port=0 if derp_port == 443 else derp_port,
    )
    return DERPRegion(
        region_id=region_id,
        region_code=region_code,
        region_name=region_name,
        nodes=[node],
    )


# -- merging -------------------------------------------------------------------


def merge_derp_maps(
    sources: Sequence[DerpMapSource],
    *,
    default_map: DerpMapSource | None = None,
    embedded: DERPRegion | None = None,
    omit_default_regions: bool = False,
) -> DERPMap:
    """Merge the configured sources into the map clients receive.

    Args:
        sources: parsed files and URLs, in configuration order.
        default_map: Tailscale's default map, if it was fetched; ignored when
            ``omit_default_regions`` is set or any source sets
            ``omitDefaultRegions``.
        embedded: our own relay's region (:func:`embedded_region`), or ``None``
            when the embedded relay is off (the default).
        omit_default_regions: drop Tailscale's default regions.

    Returns:
        A :class:`DERPMap` with regions sorted by ID and no ``null`` values.
        ``Regions`` is ``{}`` (not ``None``) when nothing is configured: an empty
        map is a real statement ("no relays"), ``None`` would mean "unchanged".

    Raises:
        DerpMapError: the embedded region's ID is invalid.
    """
    layers: list[DerpMapSource] = []
    omit = omit_default_regions or any(s.omit_default_regions for s in sources)
    if default_map is not None and not omit:
        layers.append(default_map)
    layers.extend(sources)
    if embedded is not None:
        rid = _valid_id(embedded.region_id, "embedded region")
        layers.append(DerpMapSource(name="embedded", regions={rid: embedded}))
    merged: dict[int, DERPRegion] = {}
    scores: dict[int, float] = {}
    saw_home = False
    for layer in layers:
        for rid, region in layer.regions.items():
            if region is None:
                merged.pop(rid, None)
            else:
                merged[rid] = region
        if layer.home_params is not None:
            saw_home = True
            scores.update(layer.home_params.region_score or {})
    home = None
    if saw_home:
        home = DERPHomeParams(region_score={k: v for k, v in sorted(scores.items()) if k in merged})
    return DERPMap(home_params=home, regions=dict(sorted(merged.items())))


def single_point_of_failure(derp_map: DERPMap) -> bool:
    """Whether the map offers exactly one DERP server (one region with one DERP node).

    The CLI warns about this at startup; see the module docstring.
    """
    regions = list((derp_map.regions or {}).values())
    nodes = [n for r in regions for n in (r.nodes or []) if not n.stun_only]
    return len(nodes) == 1


def region_ids(derp_map: DERPMap) -> Iterable[int]:
    """The region IDs of ``derp_map`` in ascending order."""
    return sorted(derp_map.regions or {})
