"""Reading a tsnet client's view of the tailnet out of its log.

Role: a Caddy/tsnet node exposes no LocalAPI to the outside (caddy-tailscale
keeps it in memory), so the e2e tests observe what a real client *received*
from our control server through the client's own debug dumps:

* ``TS_DEBUG_MAP=1`` makes ``controlclient`` log every decoded map response
  as ``MapResponse: {indented JSON}`` and every request as
  ``MapRequest: {JSON}`` (Go's ``log.Printf``; Caddy routes that into its
  JSON log, other hosts print it raw across several lines).
* ``TS_DEBUG_REGISTER=1`` logs ``RegisterRequest: {...}`` and
  ``RegisterResponse: {...}`` (through tsnet's logger, i.e. Caddy's
  ``"logger":"tailscale"`` at DEBUG level).

`log_messages` turns either log shape into plain text, `dumps` extracts the
JSON documents behind a prefix, and `fold_map_responses` replays map
responses the way the client applies them (full ``Peers`` list, then
``PeersChanged``/``PeersRemoved``/``PeersChangedPatch``/``OnlineChange``
deltas) into a `TailnetView`: the node's own record and its peers.

This module is pure (no I/O) so it is unit-tested against hand-written logs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TailnetView",
    "dumps",
    "fold_map_responses",
    "log_messages",
    "short_name",
]

# Fields of tailcfg.PeerChange that map to a differently named tailcfg.Node field.
_PATCH_RENAMES = {"DERPRegion": "HomeDERP"}


def log_messages(text: str) -> str:
    """Flatten a process log into the plain text of its messages.

    Lines that are Caddy/zap JSON entries (an object with ``msg`` and ``ts``
    or ``level``) are replaced by their ``msg``; every other line is kept
    as is, so raw multi-line dumps survive.

    Args:
        text: The log file's content.

    Returns:
        The messages, one or more lines each, joined by newlines.
    """
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("{") and stripped.endswith("}"):
            try:
                entry = json.loads(stripped)
            except ValueError:
                entry = None
            if isinstance(entry, dict) and "msg" in entry and ("ts" in entry or "level" in entry):
                out.append(str(entry["msg"]))
                continue
        out.append(line)
    return "\n".join(out)


def dumps(text: str, prefix: str) -> list[dict[str, Any]]:
    """Extract the JSON objects logged after ``"<prefix>: "``.

    Args:
        text: Plain message text (see `log_messages`), or a raw log.
        prefix: E.g. ``"MapResponse"``, ``"MapRequest"``,
            ``"RegisterRequest"``, ``"RegisterResponse"``.

    Returns:
        The decoded objects in log order. Truncated or undecodable dumps
        (a process killed mid-write) are skipped.
    """
    decoder = json.JSONDecoder()
    marker = f"{prefix}: "
    found: list[dict[str, Any]] = []
    pos = text.find(marker)
    while pos != -1:
        start = pos + len(marker)
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            end = start
        else:
            if isinstance(obj, dict):
                found.append(obj)
        pos = text.find(marker, end)
    return found


def short_name(node: Mapping[str, Any]) -> str:
    """The host label of a tailcfg.Node: first label of ``Name``, else its Hostinfo hostname."""
    name = node.get("Name") or ""
    if isinstance(name, str) and name:
        return name.split(".", 1)[0]
    hostinfo = node.get("Hostinfo") or {}
    hostname = hostinfo.get("Hostname", "") if isinstance(hostinfo, dict) else ""
    return str(hostname)


@dataclass
class TailnetView:
    """What one client believes about the tailnet, from its map responses.

    Attributes:
        self_node: The latest ``MapResponse.Node`` (tailcfg.Node JSON), if any.
        peers: Peers by ``tailcfg.NodeID``.
        derp_map: The latest ``MapResponse.DERPMap``, if any.
        dns_config: The latest ``MapResponse.DNSConfig``, if any.
        responses: How many map responses were folded in (keep-alives included).
    """

    self_node: dict[str, Any] | None = None
    peers: dict[int, dict[str, Any]] = field(default_factory=dict)
    derp_map: dict[str, Any] | None = None
    dns_config: dict[str, Any] | None = None
    responses: int = 0

    def peer_names(self) -> set[str]:
        """Host labels of all peers (see `short_name`)."""
        return {short_name(p) for p in self.peers.values()}

    def routable_peer_names(self) -> set[str]:
        """Host labels of peers that packets can be addressed to right now.

        A peer is routable once the client knows its home DERP region
        (``HomeDERP``, or the legacy ``DERP`` string) or at least one direct
        endpoint. Before that, tsnet's first WireGuard handshake to it fails
        with "no UDP or DERP addr" and is only retried after 5 s.
        """
        return {
            short_name(p)
            for p in self.peers.values()
            if p.get("HomeDERP") or p.get("DERP") or p.get("Endpoints")
        }

    def peer(self, name: str) -> dict[str, Any]:
        """The peer whose host label is `name`.

        Raises:
            KeyError: If there is no such peer.
        """
        for node in self.peers.values():
            if short_name(node) == name:
                return node
        raise KeyError(f"no peer named {name!r}; peers: {sorted(self.peer_names())}")

    def addresses(self, name: str | None = None) -> list[str]:
        """Tailnet addresses without prefix length, of a peer or (None) of self.

        Raises:
            KeyError: If the node is unknown.
        """
        if name is None:
            if self.self_node is None:
                raise KeyError("no self node received yet")
            node = self.self_node
        else:
            node = self.peer(name)
        return [str(a).split("/", 1)[0] for a in node.get("Addresses") or []]

    def ipv4(self, name: str | None = None) -> str:
        """The first IPv4 tailnet address of a peer or (None) of self.

        Raises:
            KeyError: If the node is unknown or has no IPv4 address.
        """
        for addr in self.addresses(name):
            if "." in addr:
                return addr
        raise KeyError(f"{name or 'self'} has no IPv4 address")

    def derp_region_ids(self) -> set[int]:
        """Region IDs of the latest DERP map (empty without one)."""
        regions = (self.derp_map or {}).get("Regions") or {}
        return {int(k) for k in regions}


def _apply(view: TailnetView, resp: Mapping[str, Any]) -> None:
    # Order follows controlclient's mapSession.updateStateFromResponse: full
    # Peers replace the set, then removals, changes, patches, online bits.
    if resp.get("Node") is not None:
        view.self_node = dict(resp["Node"])
    if resp.get("DERPMap") is not None:
        view.derp_map = dict(resp["DERPMap"])
    if resp.get("DNSConfig") is not None:
        view.dns_config = dict(resp["DNSConfig"])
    if resp.get("Peers") is not None:
        view.peers = {int(p["ID"]): dict(p) for p in resp["Peers"]}
    for node_id in resp.get("PeersRemoved") or []:
        view.peers.pop(int(node_id), None)
    for p in resp.get("PeersChanged") or []:
        view.peers[int(p["ID"])] = dict(p)
    for patch in resp.get("PeersChangedPatch") or []:
        node = view.peers.get(int(patch["NodeID"]))
        if node is None:
            continue
        for key, value in patch.items():
            if key != "NodeID":
                node[_PATCH_RENAMES.get(key, key)] = value
    for node_id, online in (resp.get("OnlineChange") or {}).items():
        if (node := view.peers.get(int(node_id))) is not None:
            node["Online"] = online


def fold_map_responses(responses: Sequence[Mapping[str, Any]]) -> TailnetView:
    """Replay map responses, in order, into the client's view.

    Args:
        responses: Decoded ``MapResponse`` objects (see `dumps`).

    Returns:
        The resulting view.
    """
    view = TailnetView()
    for resp in responses:
        _apply(view, resp)
        view.responses += 1
    return view
