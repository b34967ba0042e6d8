"""The order in which each capture topology's nodes joined the tailnet.

The conformance cases record every node's addresses, tags and routes but not
when it registered, and route failover depends on exactly that: the hosted
control plane makes the first router to serve a prefix its primary (our
engine: the lowest node id). The orders below are the capture tailnets'
registration orders, read from the ``Created`` timestamps of the netmaps in
the full captures the cases were reduced from (headscale
``hscontrol/policy/v2/testdata/*_results``). They are inputs, like node
addresses -- not expected outputs -- and they apply to every case of a
topology.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["REGISTRATION_ORDERS", "registration_order"]

REGISTRATION_ORDERS: Final[tuple[tuple[str, ...], ...]] = (
    # acl and policytest captures
    ("charmander", "squirtle", "weedle", "kakuna", "beedrill", "ivysaur", "venusaur", "bulbasaur"),
    # grant, ssh and sshtest captures
    (
        "pidgey",
        "pidgeotto",
        "charmander",
        "rattata",
        "raticate",
        "blastoise",
        "spearow",
        "fearow",
        "squirtle",
        "weedle",
        "kakuna",
        "beedrill",
        "ivysaur",
        "venusaur",
        "bulbasaur",
    ),
    # routes captures
    (
        "caterpie",
        "charmander",
        "metapod",
        "butterfree",
        "wartortle",
        "squirtle",
        "weedle",
        "kakuna",
        "beedrill",
        "ivysaur",
        "venusaur",
        "bulbasaur",
    ),
    # nodeattrs captures
    ("client", "exit", "prod", "router", "server", "ivysaur", "venusaur", "user-tid"),
    # via-grant captures with their own small topologies
    ("client-a", "client-b", "ha-a1", "ha-a2", "ha-b1", "ha-b2"),
    ("client-a", "client-b", "spearow", "fearow"),
    ("client-a", "router-6via"),
)


def registration_order(names: Iterable[str]) -> tuple[str, ...] | None:
    """The join order of the topology with exactly these node names, if known."""
    wanted = set(names)
    for order in REGISTRATION_ORDERS:
        if set(order) == wanted:
            return order
    return None
