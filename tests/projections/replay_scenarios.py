"""Builders of the incident scenarios under ``replay-fixtures/`` and their questions.

Each builder drives the real command layer (``projections.commands``) through a real
in-memory log and returns the recorded events and the questions whose answers are
recorded in ``expected/answers.json``. The questions use sequence numbers and names
that the builder knows, so the answers can be reviewed against the history by hand
(each scenario's README does that).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta

from eventlog import Actor, ActorKind, AppendRequest, RecordedEvent
from projections import commands as c
from tests.support.builders import PLAN, Recorder

Question = dict[str, object]
Scenario = tuple[list[RecordedEvent], list[Question]]

OPERATOR = Actor(kind=ActorKind.ADMIN, id="carol")
FILE = Actor(kind=ActorKind.SYSTEM, id="policy-file")


class ActorRecorder(Recorder):
    """A recorder whose commands name their actor (default: admin:carol)."""

    def act(self, decide: Callable[..., object], actor: Actor = OPERATOR) -> int:
        decision = decide(self.state)
        self.now += timedelta(seconds=60)
        [result] = self.store.append_batch(
            [AppendRequest(events=decision.events, actor=actor, expected_seq=self.state.seq)],  # type: ignore[attr-defined]
            int(self.now.timestamp() * 1_000_000),
        )
        assert isinstance(result, tuple)
        from projections import apply

        for rec in result:
            self.state, _ = apply(self.state, rec)
        self.events.extend(result)
        return self.state.seq


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
    return r.events, [
        {"cmd": "state", "at": wide},
        {"cmd": "netmap", "node": "db-1", "at": wide},
        {"cmd": "diff", "from": base, "to": wide},
        {"cmd": "diff", "from": wide, "to": revert},
        {"cmd": "reach", "src": "bobs-box", "dst": "db-1", "port": 5432, "proto": "tcp"},
        {"cmd": "reach", "src": "laptop", "dst": "db-1", "port": 5432, "proto": "tcp"},
        {"cmd": "who-can-reach", "dst": "db-1", "port": 5432, "at": wide},
        {"cmd": "who-can-reach", "dst": "db-1", "port": 5432, "at": revert},
    ]


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
    return r.events, [
        {"cmd": "state", "at": tagged},
        {"cmd": "netmap", "node": "prod-1", "at": tagged},
        {"cmd": "netmap", "node": "prod-1", "at": policy},
        {"cmd": "diff", "from": policy, "to": tagged},
        {"cmd": "reach", "src": "laptop", "dst": "prod-1", "port": 22, "proto": "tcp"},
        {"cmd": "who-can-reach", "dst": "prod-1", "port": 22, "at": policy},
        {"cmd": "who-can-reach", "dst": "prod-1", "port": 22, "at": tagged},
    ]


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
    return r.events, [
        {"cmd": "state", "at": approved},
        {"cmd": "netmap", "node": "laptop", "at": approved},
        {"cmd": "diff", "from": advertised, "to": approved},
        {"cmd": "diff", "from": approved, "to": removed},
        {"cmd": "reach", "src": "laptop", "dst": "10.30.0.7", "port": 22, "proto": "tcp"},
        {"cmd": "reach", "src": "bobs-box", "dst": "10.30.0.7", "port": 22, "proto": "tcp"},
        {"cmd": "who-can-reach", "dst": "10.30.0.7", "port": 22, "at": approved},
        {"cmd": "who-can-reach", "dst": "10.30.0.7", "port": 22, "at": removed},
    ]


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
        lambda s: c.decide_rotate_node_key(s, s.node_named("srv-1"), node_key="ab" * 32, expiry=None),
        Actor(kind=ActorKind.NODE, id="srv-1"),
    )
    return r.events, [
        {"cmd": "state", "at": expired},
        {"cmd": "netmap", "node": "laptop", "at": expired},
        {"cmd": "netmap", "node": "laptop", "at": rekeyed},
        {"cmd": "diff", "from": policy, "to": expired},
        {"cmd": "diff", "from": expired, "to": rekeyed},
        {"cmd": "reach", "src": "laptop", "dst": "srv-1", "port": 443, "proto": "tcp"},
        {"cmd": "who-can-reach", "dst": "srv-1", "port": 443, "at": expired},
        {"cmd": "who-can-reach", "dst": "srv-1", "port": 443, "at": rekeyed},
    ]


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
    return r.events, [
        {"cmd": "state", "at": edited},
        {"cmd": "netmap", "node": "web-1", "at": first},
        {"cmd": "netmap", "node": "web-1", "at": edited},
        {"cmd": "diff", "from": first, "to": edited},
        {"cmd": "reach", "src": "bobs-box", "dst": "web-1", "port": 80, "proto": "tcp"},
        {"cmd": "reach", "src": "laptop", "dst": "web-1", "port": 443, "proto": "tcp"},
        {"cmd": "who-can-reach", "dst": "web-1", "port": 80, "at": first},
        {"cmd": "who-can-reach", "dst": "web-1", "port": 443, "at": edited},
    ]


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "incident-overbroad-grant": overbroad_grant,
    "incident-tag-opens-ssh": tag_opens_ssh,
    "incident-subnet-route": subnet_route,
    "incident-key-expiry": key_expiry,
    "incident-policy-file-edit": policy_file_edit,
}

assert PLAN is not None
