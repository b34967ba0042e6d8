"""Parsing: HuJSON, error locations, and the small grammars inside strings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projections.policy import PolicySyntaxError, PolicyValidationError, parse_policy
from projections.policy.document import AliasKind, PortRange
from projections.policy.syntax import (
    SyntaxProblem,
    format_go_duration,
    parse_alias,
    parse_go_duration,
    parse_ports,
    parse_protocol,
    split_host_port,
)


def test_hujson_comments_and_trailing_commas() -> None:
    text = """
    // a comment
    {
      "groups": {"group:a": ["odin@example.com",],}, /* block */
      "acls": [{"action": "accept", "src": ["group:a"], "dst": ["*:22"],},],
    }
    """
    policy = parse_policy(text)
    assert policy.group_map() == {"group:a": ("odin@example.com",)}
    assert policy.acls is not None
    assert policy.acls[0].dst[0].ports == (PortRange(22, 22),)


def test_syntax_error_has_line_and_column() -> None:
    text = '{\n  "acls": [\n    {"action": "accept",, }\n  ]\n}'
    with pytest.raises(PolicySyntaxError) as info:
        parse_policy(text)
    assert info.value.line == 3
    assert info.value.column is not None
    assert info.value.column > 1
    assert info.value.located().startswith("3:")


def test_unknown_top_level_key_points_at_the_key() -> None:
    text = '{\n  "acls": [],\n  "aclz": []\n}'
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(text)
    assert info.value.message == 'json: unknown field "aclz"'
    assert (info.value.line, info.value.column) == (3, 3)


def test_keys_are_case_insensitive() -> None:
    policy = parse_policy('{"ACLs": [{"Action": "accept", "SRC": ["*"], "dst": ["*:*"]}]}')
    assert policy.acls is not None
    assert len(policy.acls) == 1


def test_bad_port_message_and_location() -> None:
    text = '{"acls": [\n  {"action": "accept", "src": ["*"],\n   "dst": ["tag:server:ssh"]}]}'
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(text)
    assert info.value.message == 'dst="tag:server:ssh": port range "ssh": invalid first integer'
    assert (info.value.line, info.value.column) == (3, 12)


@pytest.mark.parametrize(
    ("fragment", "message"),
    [
        (
            '"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]',
            'action="deny" is not supported',
        ),
        (
            '"acls": [{"action": "accept", "src": ["*"], "dst": ["autogroup:self"]}]',
            'dst="autogroup:self": port range "self": invalid first integer',
        ),
        (
            '"grants": [{"src": ["*"], "dst": ["*"], "ip": ["tcp:0"]}]',
            "port range \"0\": first port must be >0, or use '*' for wildcard",
        ),
        (
            '"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "via": ["autogroup:tagged"]}]',
            "via can only be a tag",
        ),
        (
            '"groups": {"group:a": ["group:b"], "group:b": ["group:a"]}',
            'groups["group:b"]: "group:a": group members cannot be recursive',
        ),
        (
            '"tagOwners": {"tag:1x": []}',
            "tagOwners[\"tag:1x\"]: tag names must start with a letter, after 'tag:'",
        ),
        (
            '"ssh": [{"action": "Accept", "src": ["*"], "dst": ["tag:a"], "users": ["root"]}]',
            '"Accept" is not a valid action',
        ),
        (
            '"ssh": [{"src": ["*"], "dst": ["tag:a"], "users": ["root"]}]',
            "action must be specified",
        ),
        (
            '"ssh": [{"action": "accept", "src": ["*"], "dst": ["tag:a"], "users": []}]',
            "users must be specified",
        ),
        (
            '"ssh": [{"action": "accept", "src": ["*"], "dst": ["tag:a"], "users": ["root", "*"]}]',
            'user "*" is not valid',
        ),
        (
            '"ssh": [{"action": "check", "src": ["*"], "dst": ["tag:a"], "users": ["root"],'
            ' "checkPeriod": "168h0m1s"}]',
            "checkPeriod 168h0m1s is above the max (168h)",
        ),
        (
            '"ssh": [{"action": "check", "src": ["*"], "dst": ["tag:a"], "users": ["root"],'
            ' "checkPeriod": "-1m"}]',
            "checkPeriod -1m0s must be a positive duration",
        ),
        (
            '"ssh": [{"action": "check", "src": ["*"], "dst": ["tag:a"], "users": ["root"],'
            ' "checkPeriod": "abc"}]',
            'time: invalid duration "abc"',
        ),
        (
            '"ssh": [{"action": "accept", "src": ["*"], "dst": ["tag:a"], "users": ["root"],'
            ' "acceptEnv": [""]}]',
            "acceptEnv values cannot be empty",
        ),
        ('"nodeAttrs": [{"target": ["%bogus%"], "attr": ["x"]}]', '"%bogus%": invalid address'),
    ],
)
def test_parse_error_messages(fragment: str, message: str) -> None:
    with pytest.raises(PolicyValidationError) as info:
        parse_policy("{" + fragment + "}")
    assert info.value.message == message
    assert info.value.line == 1


def test_whitespace_is_trimmed_where_tailscale_trims() -> None:
    policy = parse_policy(
        '{"ssh": [{"action": " accept", "src": [" odin@example.com"], '
        '"dst": ["tag:a "], "users": ["\\troot"]}]}'
    )
    assert policy.ssh is not None
    rule = policy.ssh[0]
    assert rule.action == "accept"
    assert rule.src[0].text == "odin@example.com"
    assert rule.dst[0].text == "tag:a"
    assert rule.users == ("root",)


def test_absent_sections_differ_from_empty_ones() -> None:
    assert parse_policy("{}").allow_all()
    assert not parse_policy('{"acls": []}').allow_all()


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("*", AliasKind.WILDCARD),
        ("odin@example.com", AliasKind.USER),
        ("odin@", AliasKind.USER),
        ("user:*@example.com", AliasKind.USER_DOMAIN),
        ("group:admins", AliasKind.GROUP),
        ("tag:server", AliasKind.TAG),
        ("autogroup:member", AliasKind.AUTOGROUP),
        ("webserver", AliasKind.HOST),
        ("100.64.0.1", AliasKind.PREFIX),
        ("10.0.0.0/8", AliasKind.PREFIX),
        ("fd7a:115c:a1e0::/48", AliasKind.PREFIX),
        ("  tag:padded  ", AliasKind.TAG),
    ],
)
def test_alias_classification(text: str, kind: AliasKind) -> None:
    assert parse_alias(text).kind is kind


def test_bad_alias() -> None:
    with pytest.raises(SyntaxProblem, match="invalid address"):
        parse_alias("foo:bar")


def test_split_host_port_uses_last_colon() -> None:
    assert split_host_port("tag:server:22") == ("tag:server", "22")
    assert split_host_port("fd00:1::/64:*") == ("fd00:1::/64", "*")
    assert split_host_port("[fd00::1]:80") == ("fd00::1", "80")
    with pytest.raises(SyntaxProblem):
        split_host_port("webserver")


@pytest.mark.parametrize(
    ("text", "numbers"),
    [("", ()), ("tcp", (6,)), ("UDP", (17,)), ("icmp", (1,)), ("6", (6,)), ("255", (255,))],
)
def test_protocols(text: str, numbers: tuple[int, ...]) -> None:
    assert parse_protocol(text) == numbers


@pytest.mark.parametrize("text", ["*", "bogus", "06", "256"])
def test_bad_protocols(text: str) -> None:
    with pytest.raises(SyntaxProblem):
        parse_protocol(text)


_ranges = st.lists(
    st.tuples(st.integers(1, 65535), st.integers(0, 200)).map(
        lambda t: PortRange(t[0], min(65535, t[0] + t[1]))
    ),
    min_size=1,
    max_size=5,
)


@given(_ranges)
def test_port_ranges_round_trip(ranges: list[PortRange]) -> None:
    text = ",".join(str(r.first) if r.first == r.last else f"{r.first}-{r.last}" for r in ranges)
    assert parse_ports(text) == tuple(ranges)


@given(st.text(alphabet="0123456789-,*x ", min_size=1, max_size=12))
def test_port_parser_accepts_only_wellformed(text: str) -> None:
    try:
        ranges = parse_ports(text)
    except SyntaxProblem:
        return
    for r in ranges:
        assert 0 <= r.first <= r.last <= 65535
        assert r.first > 0 or text == "*"


@given(st.integers(-(10**15), 10**15))
def test_go_duration_round_trip(nanoseconds: int) -> None:
    assert parse_go_duration(format_go_duration(nanoseconds)) == nanoseconds


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (3_600_000_000_000, "1h0m0s"),
        (168 * 3_600_000_000_000 + 1_000_000_000, "168h0m1s"),
        (-60_000_000_000, "-1m0s"),
        (30_000_000_000, "30s"),
        (1_500_000_000, "1.5s"),
        (100_000_000, "100ms"),
    ],
)
def test_go_duration_format(ns: int, text: str) -> None:
    assert format_go_duration(ns) == text
