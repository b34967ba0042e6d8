"""Builders of the incident scenarios under ``replay-fixtures/`` and their questions.

Each builder drives the real command layer (``projections.commands``) through a real
in-memory log and returns the recorded events and the questions whose answers are
recorded in ``expected/answers.json``. The questions use sequence numbers and names
that the builder knows, so the answers can be reviewed against the history by hand
(each scenario's README does that).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

from eventlog import Actor, ActorKind, RecordedEvent
from projections import Decision, Node, TailnetState
from projections import commands as c
from tests.support.builders import PLAN, Recorder

T = TypeVar("T")
Question = dict[str, object]
Scenario = tuple[list[RecordedEvent], list[Question]]

OPERATOR = Actor(kind=ActorKind.ADMIN, id="carol")
FILE = Actor(kind=ActorKind.SYSTEM, id="policy-file")


class ActorRecorder(Recorder):
    """A recorder whose commands name their actor (default: admin:carol), a minute apart."""

    def act(self, decide: Callable[[TailnetState], Decision[T]], actor: Actor = OPERATOR) -> int:
        """Record ``decide``'s events; return the sequence number they end at."""
        self.run(decide, actor=actor, step=timedelta(minutes=1))
        return self.state.seq


def _questions(
    *,
    state: int,
    netmaps: Sequence[tuple[str, int]],
    diffs: Sequence[tuple[int, int]],
    reach: Sequence[tuple[str, str, int]],
    who_can_reach: Sequence[tuple[str, int, int]],
) -> list[Question]:
    """A scenario's questions, in the order of the recorded answers: the state at one
    point, netmaps of (node, at), diffs (from, to), TCP reach (src, dst, port) and
    who can reach (dst, port, at)."""
    return [
        {"cmd": "state", "at": state},
        *({"cmd": "netmap", "node": node, "at": at} for node, at in netmaps),
        *({"cmd": "diff", "from": start, "to": end} for start, end in diffs),
        *({"cmd": "reach", "src": src, "dst": dst, "port": port, "proto": "tcp"} for src, dst, port in reach),
        *({"cmd": "who-can-reach", "dst": dst, "port": port, "at": at} for dst, port, at in who_can_reach),
    ]


def _node(state: TailnetState, name: str) -> Node:
    node = state.node_named(name)
    assert node is not None, name
    return node


def _seeded() -> ActorRecorder:
    random.seed(13)
    return ActorRecorder()


OVERBROAD_BASE = """{
  "groups": {"group:eng": ["alice@"]},
  "tagOwners": {"tag:db": ["alice@"]},
  "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:db:5432"]}]
}"""

OVERBROAD_WIDE = """{
  "groups": {"group:eng": ["alice@"]},
  "tagOwners": {"tag:db": ["alice@"]},
  "grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}],
  "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:db:5432"]}]
}"""


def overbroad_grant() -> Scenario:
    """An operator adds a grant from everyone to everything, then reverts it."""
    r = _seeded()
    alice, bob = r.user("alice"), r.user("bob")
    r.node(alice, "laptop")
    r.node(alice, "db-1", tags=("tag:db",))
    r.node(bob, "bobs-box")
    base = r.act(lambda s: c.decide_set_policy(s, OVERBROAD_BASE, source="db"))
    wide = r.act(lambda s: c.decide_set_policy(s, OVERBROAD_WIDE, source="db"))
    revert = r.act(lambda s: c.decide_set_policy(s, OVERBROAD_BASE, source="db"))
    return r.events, _questions(
        state=wide,
        netmaps=[("db-1", wide)],
        diffs=[(base, wide), (wide, revert)],
        reach=[("bobs-box", "db-1", 5432), ("laptop", "db-1", 5432)],
        who_can_reach=[("db-1", 5432, wide), ("db-1", 5432, revert)],
    )


SSH_POLICY = """{
  "tagOwners": {"tag:jump": ["alice@"], "tag:prod": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["tag:jump"], "dst": ["tag:prod:22"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}
  ],
  "ssh": [{"action": "accept", "src": ["tag:jump"], "dst": ["tag:prod"], "users": ["root"]}]
}"""


def tag_opens_ssh() -> Scenario:
    """Tagging a laptop ``tag:jump`` gives it SSH (port 22) to every ``tag:prod`` node."""
    r = _seeded()
    alice = r.user("alice")
    r.node(alice, "laptop")
    r.node(alice, "prod-1", tags=("tag:prod",))
    policy = r.act(lambda s: c.decide_set_policy(s, SSH_POLICY, source="db"))
    tagged = r.act(lambda s: c.decide_set_tags(s, "laptop", ("tag:jump",)))
    return r.events, _questions(
        state=tagged,
        netmaps=[("prod-1", tagged), ("prod-1", policy)],
        diffs=[(policy, tagged)],
        reach=[("laptop", "prod-1", 22)],
        who_can_reach=[("prod-1", 22, policy), ("prod-1", 22, tagged)],
    )


SUBNET_POLICY = """{
  "groups": {"group:eng": ["alice@"]},
  "tagOwners": {"tag:router": ["alice@"]},
  "hosts": {"lab": "10.30.0.0/24"},
  "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["lab:22"]}]
}"""


def subnet_route() -> Scenario:
    """A router's advertised subnet route is approved by an admin, later removed."""
    r = _seeded()
    alice, bob = r.user("alice"), r.user("bob")
    r.node(alice, "laptop")
    r.node(bob, "bobs-box")
    router = r.node(alice, "router", tags=("tag:router",))
    r.act(lambda s: c.decide_set_policy(s, SUBNET_POLICY, source="db"))
    advertised = r.act(
        lambda s: c.decide_advertise_routes(s, s.nodes[router], ("10.30.0.0/24",)), Actor(kind=ActorKind.NODE, id="router")
    )
    approved = r.act(lambda s: c.decide_approve_routes(s, "router", ("10.30.0.0/24",)))
    removed = r.act(lambda s: c.decide_approve_routes(s, "router", ()))
    return r.events, _questions(
        state=approved,
        netmaps=[("laptop", approved)],
        diffs=[(advertised, approved), (approved, removed)],
        reach=[("laptop", "10.30.0.7", 22), ("bobs-box", "10.30.0.7", 22)],
        who_can_reach=[("10.30.0.7", 22, approved), ("10.30.0.7", 22, removed)],
    )


EXPIRY_POLICY = """{
  "acls": [{"action": "accept", "src": ["alice@"], "dst": ["tag:srv:443"]}],
  "tagOwners": {"tag:srv": ["alice@"]}
}"""


def key_expiry() -> Scenario:
    """A server's node key is expired by an admin, and the server re-keys."""
    r = _seeded()
    alice = r.user("alice")
    r.node(alice, "laptop")
    r.node(alice, "srv-1", tags=("tag:srv",))
    policy = r.act(lambda s: c.decide_set_policy(s, EXPIRY_POLICY, source="db"))
    expired = r.act(lambda s: c.decide_expire_node(s, "srv-1", now=r.now))
    rekeyed = r.act(
        lambda s: c.decide_rotate_node_key(s, _node(s, "srv-1"), node_key="ab" * 32, expiry=None),
        Actor(kind=ActorKind.NODE, id="srv-1"),
    )
    return r.events, _questions(
        state=expired,
        netmaps=[("laptop", expired), ("laptop", rekeyed)],
        diffs=[(policy, expired), (expired, rekeyed)],
        reach=[("laptop", "srv-1", 443)],
        who_can_reach=[("srv-1", 443, expired), ("srv-1", 443, rekeyed)],
    )


FILE_POLICY_1 = """// policy.hujson, first version
{
  "groups": {"group:eng": ["alice@", "bob@"]},
  "tagOwners": {"tag:web": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:80"]},
  ],
}
"""

FILE_POLICY_2 = """// policy.hujson, edited: HTTPS only, bob left the team
{
  "groups": {"group:eng": ["alice@"]},
  "tagOwners": {"tag:web": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443"]},
  ],
}
"""


def policy_file_edit() -> Scenario:
    """The policy file is loaded, then edited on disk and reloaded by the server."""
    r = _seeded()
    alice, bob = r.user("alice"), r.user("bob")
    r.node(alice, "laptop")
    r.node(bob, "bobs-box")
    r.node(alice, "web-1", tags=("tag:web",))
    first = r.act(lambda s: c.decide_set_policy(s, FILE_POLICY_1, source="file"), FILE)
    edited = r.act(lambda s: c.decide_set_policy(s, FILE_POLICY_2, source="file"), FILE)
    return r.events, _questions(
        state=edited,
        netmaps=[("web-1", first), ("web-1", edited)],
        diffs=[(first, edited)],
        reach=[("bobs-box", "web-1", 80), ("laptop", "web-1", 443)],
        who_can_reach=[("web-1", 80, first), ("web-1", 443, edited)],
    )


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "incident-overbroad-grant": overbroad_grant,
    "incident-tag-opens-ssh": tag_opens_ssh,
    "incident-subnet-route": subnet_route,
    "incident-key-expiry": key_expiry,
    "incident-policy-file-edit": policy_file_edit,
}

assert PLAN is not None
