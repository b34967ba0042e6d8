"""Validation, domain checks and the policy's own tests blocks."""

from __future__ import annotations

import json

import pytest

from projections.policy import (
    PolicyNode,
    PolicyTestFailure,
    PolicyUser,
    PolicyValidationError,
    TailnetSettings,
    check_policy,
    parse_policy,
    validate_policy,
)

USERS = [
    PolicyUser(id=1, login="odin@example.com", name="odin"),
    PolicyUser(id=2, login="thor@example.org", name="thor"),
]
NODES = [
    PolicyNode(id=1, name="laptop", user_id=1, ipv4="100.64.0.1", ipv6="fd7a:115c:a1e0::1"),
    PolicyNode(id=2, name="phone", user_id=2, ipv4="100.64.0.2", ipv6="fd7a:115c:a1e0::2"),
    PolicyNode(
        id=3, name="server", tags=("tag:server",), ipv4="100.64.0.3", ipv6="fd7a:115c:a1e0::3"
    ),
]
BASE = {
    "groups": {"group:admins": ["odin@example.com"]},
    "tagOwners": {"tag:server": ["group:admins"], "tag:prod": ["odin@example.com"]},
    "hosts": {"web": "100.64.0.3", "net": "10.0.0.0/8"},
}


def policy_text(**sections: object) -> str:
    return json.dumps({**BASE, **sections}, indent=2)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"acls": [{"action": "accept", "src": ["tag:nope"], "dst": ["*:*"]}]},
            'src=tag not found: "tag:nope"',
        ),
        (
            {"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:nope:22"]}]},
            'dst="tag:nope": tag not found: "tag:nope"',
        ),
        (
            {"acls": [{"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}]},
            '"autogroup:self" not valid on the src side of a rule',
        ),
        (
            {"acls": [{"action": "accept", "src": ["tag:server"], "dst": ["autogroup:self:*"]}]},
            "autogroup:self can only be used with users, groups, or supported autogroups",
        ),
        (
            {"grants": [{"src": ["*"], "dst": ["autogroup:self"], "ip": ["*"]}]},
            "autogroup:self can only be used with users, groups, or supported autogroups",
        ),
        (
            {"grants": [{"src": ["*"], "dst": ["autogroup:danger-all"], "ip": ["*"]}]},
            "cannot use autogroup:danger-all as a dst",
        ),
        ({"grants": [{"src": ["*"], "dst": ["*"], "app": {}}]}, "ip and app can not both be empty"),
        (
            {"grants": [{"src": ["*"], "dst": ["*"], "app": {"tailscale.com/cap/ingress": [{}]}}]},
            "capability name must not be in the tailscale.com domain",
        ),
        (
            {"grants": [{"src": ["*"], "dst": ["autogroup:internet"], "app": {"a.com/x": [{}]}}]},
            "cannot use app grants with autogroup:internet",
        ),
        (
            {"grants": [{"src": ["*"], "dst": ["::/0"], "ip": ["*"]}]},
            'dst "::/0": to allow all IP addresses, use "*" or "autogroup:internet"',
        ),
        (
            {"grants": [{"src": ["*"], "dst": ["net"], "ip": ["*"], "via": ["tag:nope"]}]},
            'tag "tag:nope" not found',
        ),
        (
            {"nodeAttrs": [{"target": ["tag:nope"], "attr": ["funnel"]}]},
            'tag not found: "tag:nope"',
        ),
        (
            {"nodeAttrs": [{"target": ["*"], "ipPool": ["100.100.100.0/24"]}]},
            "IPPool(100.100.100.0/24): network within reserved range",
        ),
        (
            {
                "ssh": [
                    {
                        "action": "accept",
                        "src": ["odin@example.com"],
                        "dst": ["web"],
                        "users": ["root"],
                    }
                ]
            },
            'invalid dst "web"',
        ),
        (
            {
                "sshTests": [
                    {"src": "odin@example.com", "dst": ["autogroup:internet"], "accept": ["root"]}
                ]
            },
            'SSH tests dst contains disallowed element "autogroup:internet"',
        ),
    ],
)
def test_validation_messages(sections: dict[str, object], message: str) -> None:
    policy = parse_policy(policy_text(**sections))
    with pytest.raises(PolicyValidationError) as info:
        validate_policy(policy)
    assert info.value.message == message
    assert info.value.line is not None


def test_validation_points_at_the_alias() -> None:
    text = policy_text(acls=[{"action": "accept", "src": ["*"], "dst": ["tag:nope:22"]}])
    with pytest.raises(PolicyValidationError) as info:
        validate_policy(parse_policy(text))
    lines = text.splitlines()
    assert info.value.line is not None
    assert info.value.column is not None
    assert lines[info.value.line - 1][info.value.column - 1 :].startswith('"tag:nope:22"')


def test_valid_policy_passes() -> None:
    text = policy_text(
        acls=[
            {"action": "accept", "src": ["group:admins"], "dst": ["tag:server:22", "net:*"]},
            {"action": "accept", "src": ["*"], "dst": ["autogroup:self:*"]},
        ],
        grants=[
            {"src": ["autogroup:member"], "dst": ["tag:server"], "app": {"example.com/cap/x": [{}]}}
        ],
        ssh=[
            {
                "action": "check",
                "src": ["autogroup:member"],
                "dst": ["autogroup:self"],
                "users": ["root"],
            }
        ],
    )
    check_policy(parse_policy(text), USERS, NODES)


def test_unknown_localpart_domain_is_rejected() -> None:
    text = policy_text(
        ssh=[
            {
                "action": "accept",
                "src": ["autogroup:member"],
                "dst": ["tag:server"],
                "users": ["localpart:*@elsewhere.net"],
            }
        ]
    )
    with pytest.raises(PolicyValidationError) as info:
        check_policy(parse_policy(text), USERS, NODES)
    assert info.value.message == (
        "elsewhere.net is not associated with this Tailnet and cannot be used in "
        "user:*@<domain> expressions"
    )


def test_passing_tests_are_accepted() -> None:
    text = policy_text(
        acls=[{"action": "accept", "src": ["group:admins"], "dst": ["tag:server:22"]}],
        tests=[{"src": "odin@example.com", "accept": ["tag:server:22"], "deny": ["tag:server:80"]}],
    )
    check_policy(parse_policy(text), USERS, NODES)


@pytest.mark.parametrize(
    "test",
    [
        {"src": "thor@example.org", "accept": ["tag:server:22"]},  # not allowed
        {"src": "odin@example.com", "deny": ["tag:server:22"]},  # allowed
        {"src": "odin@example.com", "accept": ["tag:server:20-30"]},  # not a single port
        {"src": "odin@example.com", "accept": ["net:22"]},  # CIDR destination
        {"src": "group:ghosts", "accept": ["tag:server:22"]},  # resolves to nothing
        {"src": "odin@example.com"},  # no assertion
        {"src": "odin@example.com", "proto": "udp", "accept": ["tag:server:22"]},  # tcp-only rule
    ],
)
def test_failing_tests_reject_the_policy(test: dict[str, object]) -> None:
    text = policy_text(
        acls=[
            {"action": "accept", "src": ["group:admins"], "dst": ["tag:server:22"], "proto": "tcp"}
        ],
        tests=[test],
    )
    with pytest.raises(PolicyTestFailure) as info:
        check_policy(parse_policy(text), USERS, NODES)
    assert info.value.message == "test(s) failed"
    assert info.value.failures


def test_ssh_tests() -> None:
    ssh = [
        {"action": "check", "src": ["group:admins"], "dst": ["tag:server"], "users": ["root"]},
        {
            "action": "accept",
            "src": ["autogroup:member"],
            "dst": ["tag:server"],
            "users": ["autogroup:nonroot"],
        },
    ]
    passing = policy_text(
        ssh=ssh,
        sshTests=[
            {
                "src": "odin@example.com",
                "dst": ["tag:server"],
                "check": ["root"],
                "accept": ["alice"],
            },
            {"src": "thor@example.org", "dst": ["tag:server"], "accept": ["bob"], "deny": ["root"]},
        ],
    )
    check_policy(parse_policy(passing), USERS, NODES)
    failing = policy_text(
        ssh=ssh,
        sshTests=[{"src": "thor@example.org", "dst": ["tag:server"], "check": ["root"]}],
    )
    with pytest.raises(PolicyTestFailure):
        check_policy(parse_policy(failing), USERS, NODES)


USER_DST_ERROR = "users in dst are only allowed from the same user"


def ssh_rule(src: list[str], dst: list[str], **extra: object) -> dict[str, object]:
    return {"action": "accept", "src": src, "dst": dst, "users": ["root"], **extra}


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        # A user destination only from that same user, alone.
        (
            ssh_rule(["tag:server"], ["odin@example.com"]),
            USER_DST_ERROR,
        ),
        (ssh_rule(["thor@example.org"], ["odin@example.com"]), USER_DST_ERROR),
        (ssh_rule(["odin@example.com", "thor@example.org"], ["odin@example.com"]), USER_DST_ERROR),
        (ssh_rule(["group:admins"], ["odin@example.com"]), USER_DST_ERROR),
        (ssh_rule(["autogroup:member"], ["odin@example.com"]), USER_DST_ERROR),
        # autogroup:self needs user-shaped sources; tags own no devices of a user.
        (
            ssh_rule(["autogroup:member", "tag:server"], ["autogroup:self"]),
            "autogroup:self can only be used with users, groups, or supported autogroups",
        ),
        (
            ssh_rule(["autogroup:tagged"], ["autogroup:self"]),
            "autogroup:self can only be used with users, groups, or supported autogroups",
        ),
        # Tags cannot reach user-owned devices through autogroup:member either.
        (
            ssh_rule(["tag:server"], ["autogroup:member"]),
            "tags in SSH source cannot access autogroup:member (user-owned devices)",
        ),
        (ssh_rule(["autogroup:member"], ["*"]), "wildcard (*) is not supported as SSH destination"),
        (
            ssh_rule(["autogroup:member"], ["autogroup:internet"]),
            "autogroup:internet can only be used in ACL destinations",
        ),
        (
            ssh_rule(["autogroup:internet"], ["tag:server"]),
            "autogroup:internet can only be used in ACL destinations",
        ),
        (
            ssh_rule(["autogroup:member"], ["tag:server"], checkPeriod="1h"),
            'checkPeriod is only valid with action "check"',
        ),
        (
            ssh_rule(["autogroup:member"], ["tag:server"], checkPeriod="always"),
            'checkPeriod is only valid with action "check"',
        ),
    ],
)
def test_ssh_rules_hosted_rejects(rule: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyValidationError) as info:
        validate_policy(parse_policy(policy_text(ssh=[rule])))
    assert info.value.message == message
    assert info.value.line is not None


@pytest.mark.parametrize(
    "rule",
    [
        ssh_rule(["odin@example.com"], ["odin@example.com"]),
        ssh_rule(["user:odin@example.com"], ["odin@example.com"]),
        ssh_rule(["autogroup:member", "group:admins", "odin@example.com"], ["autogroup:self"]),
        ssh_rule(["user:*@example.com", "autogroup:admin"], ["autogroup:self"]),
        ssh_rule(["autogroup:member"], ["autogroup:member", "autogroup:tagged"]),
        ssh_rule(["tag:server", "autogroup:tagged"], ["tag:prod", "autogroup:tagged"]),
        {**ssh_rule(["autogroup:member"], ["tag:server"], checkPeriod="1h"), "action": "check"},
        ssh_rule(["autogroup:member"], ["tag:server"], checkPeriod=None),
    ],
)
def test_ssh_rules_hosted_accepts(rule: dict[str, object]) -> None:
    validate_policy(parse_policy(policy_text(ssh=[rule])))


def test_internet_is_a_destination_only_in_acls_and_grants() -> None:
    acl = {"action": "accept", "src": ["autogroup:internet"], "dst": ["*:*"]}
    grant = {"src": ["autogroup:internet"], "dst": ["*"], "ip": ["*"]}
    for sections in ({"acls": [acl]}, {"grants": [grant]}):
        with pytest.raises(PolicyValidationError) as info:
            validate_policy(parse_policy(policy_text(**sections)))
        assert info.value.message == "autogroup:internet can only be used in ACL destinations"
    validate_policy(
        parse_policy(
            policy_text(
                acls=[{"action": "accept", "src": ["*"], "dst": ["autogroup:internet:*"]}],
                grants=[{"src": ["*"], "dst": ["autogroup:internet"], "ip": ["*"]}],
            )
        )
    )


def test_missing_tag_in_grant_dst_is_not_framed_like_an_acl_dst() -> None:
    # Grant destinations carry no ports, so the hosted plane names the tag alone;
    # a port written into a grant destination becomes part of the tag name.
    for dst, message in (
        ("tag:nope", 'tag not found: "tag:nope"'),
        ("tag:server:22", 'tag not found: "tag:server:22"'),
    ):
        text = policy_text(grants=[{"src": ["*"], "dst": [dst], "ip": ["*"]}])
        with pytest.raises(PolicyValidationError) as info:
            validate_policy(parse_policy(text))
        assert info.value.message == message


@pytest.mark.parametrize(
    ("cap", "granted"),
    [
        ("tailscale.com/cap/drive", True),
        ("tailscale.com/cap/relay", True),
        ("tailscale.com/cap/golink", True),
        ("tailscale.com/cap/funnel", False),
        ("tailscale.com/cap/drive-sharer", False),
        ("tailscale.com/cap/relay-target", False),
    ],
)
def test_only_user_grantable_tailscale_caps(cap: str, granted: bool) -> None:
    policy = parse_policy(policy_text(grants=[{"src": ["*"], "dst": ["*"], "app": {cap: [{}]}}]))
    if granted:
        validate_policy(policy)
        return
    with pytest.raises(PolicyValidationError) as info:
        validate_policy(policy)
    assert info.value.message == "capability name must not be in the tailscale.com domain"


SERVER_SSH = [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:server"], "users": ["root"]}
]


@pytest.mark.parametrize(
    ("test", "message"),
    [
        (
            {"src": "autogroup:admin", "dst": ["tag:server"], "accept": ["root"]},
            'SSH tests src contains disallowed element "autogroup:admin"',
        ),
        (
            {"src": "odin@example.com", "dst": ["tag:nope"], "accept": ["root"]},
            'SSH tests dst contains unknown tag "tag:nope"',
        ),
        (
            {"src": "odin@example.com", "dst": ["tag:server:22"], "accept": ["root"]},
            'SSH tests dst contains unknown tag "tag:server:22"',
        ),
        (
            {"src": "odin@example.com", "dst": ["net"], "accept": ["root"]},
            'SSH tests dst contains disallowed element "net"',
        ),
        (
            {"src": "odin@example.com", "dst": ["tag:server", "100.64.0.0/24"], "deny": ["root"]},
            'SSH tests dst contains disallowed element "100.64.0.0/24"',
        ),
    ],
)
def test_ssh_tests_shape_is_checked_before_running(test: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyValidationError) as info:
        check_policy(parse_policy(policy_text(ssh=SERVER_SSH, sshTests=[test])), USERS, NODES)
    assert info.value.message == message


@pytest.mark.parametrize("dst", ["tag:server", "web", "100.64.0.3", "100.64.0.3/32"])
def test_ssh_tests_single_host_destinations_run(dst: str) -> None:
    test = {"src": "odin@example.com", "dst": [dst], "accept": ["root"]}
    check_policy(parse_policy(policy_text(ssh=SERVER_SSH, sshTests=[test])), USERS, NODES)


@pytest.mark.parametrize(
    ("dst", "passes"),
    [
        ("[fd7a:115c:a1e0::3]:22", True),
        ("100.64.0.3:22", True),
        ("tag:server:22", True),
        ("fd7a:115c:a1e0::3:22", False),  # IPv6 without brackets names no host
        ("[fd7a:115c:a1e0::3]/128:22", False),
        ("[fd7a:115c:a1e0::4]:22", False),  # an address no rule reaches
    ],
)
def test_ipv6_test_destinations_are_bracketed(dst: str, passes: bool) -> None:
    text = policy_text(
        acls=[{"action": "accept", "src": ["group:admins"], "dst": ["tag:server:22"]}],
        tests=[{"src": "odin@example.com", "accept": [dst]}],
    )
    if passes:
        check_policy(parse_policy(text), USERS, NODES)
        return
    with pytest.raises(PolicyTestFailure) as info:
        check_policy(parse_policy(text), USERS, NODES)
    assert info.value.message == "test(s) failed"


ROLE_USERS = [
    PolicyUser(id=1, login="odin@example.com", name="odin", role="owner"),
    PolicyUser(id=2, login="thor@example.org", name="thor", role="admin"),
]
NOT_ASSOCIATED = (
    "example.org is not associated with this Tailnet and cannot be used in "
    "user:*@<domain> expressions"
)


@pytest.mark.parametrize(
    "sections",
    [
        {
            "ssh": [
                {
                    "action": "accept",
                    "src": ["autogroup:member"],
                    "dst": ["tag:server"],
                    "users": ["localpart:*@example.org"],
                }
            ]
        },
        {"ssh": [ssh_rule(["user:*@example.org"], ["tag:server"])]},
        {"grants": [{"src": ["user:*@example.org"], "dst": ["*"], "ip": ["*"]}]},
        {"acls": [{"action": "accept", "src": ["*"], "dst": ["user:*@example.org:22"]}]},
    ],
)
def test_only_the_owners_domain_is_associated(sections: dict[str, object]) -> None:
    # An admin invited from another domain does not associate that domain.
    with pytest.raises(PolicyValidationError) as info:
        check_policy(parse_policy(policy_text(**sections)), ROLE_USERS, NODES)
    assert info.value.message == NOT_ASSOCIATED
    # The owner's domain is; so is every user's in a tailnet without an owner
    # (users recorded before roles), and any configured domain.
    owner_domain = json.loads(json.dumps(sections).replace("example.org", "example.com"))
    check_policy(parse_policy(policy_text(**owner_domain)), ROLE_USERS, NODES)
    check_policy(parse_policy(policy_text(**sections)), USERS, NODES)
    configured = TailnetSettings(domains=("example.com", "example.org"))
    check_policy(parse_policy(policy_text(**sections)), ROLE_USERS, NODES, configured)
