"""The login decision: pure, one Decision for the registration and what the Hostinfo says."""

from __future__ import annotations

from datetime import timedelta

import pytest

from eventlog.events import (
    NodeHostnameChanged,
    NodeRegistered,
    PreAuthKeyUsed,
    RoutesAdvertised,
    RoutesApproved,
)
from projections import CommandError
from projections import commands as c
from projections.state import Node, TailnetState
from tests.support.builders import PLAN, T0, Recorder


def _approve_tens(state: TailnetState, node: Node) -> tuple[str, ...]:
    return tuple(r for r in node.advertised_routes if r.startswith("10."))


RULES = c.LoginRules(plan=PLAN, node_key_expiry=timedelta(days=1), auto_approve=_approve_tens)


def _key(r: Recorder, **kw: object) -> str:
    uid = r.user("alice")
    return r.run(
        lambda s: c.decide_create_preauth_key(
            s, user=str(uid), reusable=False, ephemeral=False, tags=(), expires_at=None,
            now=T0, prefix="abc123", secret="s" * 24, **kw,
        )
    )


def test_a_new_node_with_routes_is_one_decision() -> None:
    r = Recorder()
    key = _key(r)
    host = c.ReportedHost(hostname="Router One", os="linux", routes=("192.168.1.0/24", "10.1.0.0/16"))
    decision = c.decide_login_with_key(
        r.state, machine_key="m" * 64, node_key="n" * 64, auth_key=key, host=host, now=T0, rules=RULES
    )
    types = [type(e) for e in decision.events]
    assert types == [NodeRegistered, PreAuthKeyUsed, RoutesAdvertised, RoutesApproved]
    registered, _, advertised, approved = decision.events
    assert isinstance(registered, NodeRegistered) and registered.expiry == T0 + timedelta(days=1)
    assert isinstance(advertised, RoutesAdvertised) and advertised.routes == ("10.1.0.0/16", "192.168.1.0/24")
    assert isinstance(approved, RoutesApproved) and approved.routes == ("10.1.0.0/16",) and approved.auto
    # Pure: the same inputs decide the same events; the state is untouched.
    again = c.decide_login_with_key(
        r.state, machine_key="m" * 64, node_key="n" * 64, auth_key=key, host=host, now=T0, rules=RULES
    )
    assert again.events == decision.events and not r.state.nodes
    node_id = r.run(lambda s: decision)
    assert r.state.nodes[node_id].approved_routes == ("10.1.0.0/16",)


def test_invalid_routes_are_left_out_and_the_rest_recorded() -> None:
    r = Recorder()
    bob = r.user("bob")
    r.run(lambda s: c.decide_register_node(
        s, machine_key="m" * 64, node_key="n" * 64, hostname="box", user_id=bob, tags=(),
        ephemeral=False, expiry=None, auth="cli", preauth_key=None, plan=PLAN,
    ))
    node = next(iter(r.state.nodes.values()))
    host = c.ReportedHost(hostname="box-2", routes=("not a prefix",))
    decision = c.decide_login_known(r.state, node, shorten_expiry_to=None, host=host, now=T0, rules=RULES)
    assert [type(e) for e in decision.events] == [NodeHostnameChanged]
    assert "routes_refused" in decision.meta


def test_a_bad_key_refuses_the_whole_login() -> None:
    r = Recorder()
    _key(r)
    with pytest.raises(CommandError, match="invalid pre-auth key"):
        c.decide_login_with_key(
            r.state, machine_key="m" * 64, node_key="n" * 64, auth_key="tlkey-auth-abc123-wrong",
            host=c.ReportedHost(routes=("10.0.0.0/8",)), now=T0, rules=RULES,
        )
