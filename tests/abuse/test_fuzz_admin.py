"""Fuzzing the admin side: request lines on a real server's admin socket, and the
policy parser and checker in process, with arbitrary nesting and Unicode.

Properties: the server never crashes and answers every line with ``{"ok": ...}``;
the policy parser raises nothing but :class:`PolicyError` and the policy check
nothing but :class:`CommandError`, whatever the text. Example counts are bounded so
the module runs in seconds.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections import CommandError
from projections import commands as c
from projections.policy import PolicyError, parse_policy
from tests.cli.server_process import RunningServer, running_server
from tests.support.builders import Recorder

from .helpers import assert_serving, raw_request

OPS = [
    "users.create", "users.list", "users.rename", "users.delete",
    "preauthkeys.create", "preauthkeys.list", "preauthkeys.expire",
    "nodes.list", "nodes.show", "nodes.rename", "nodes.delete", "nodes.expire", "nodes.tag",
    "nodes.register", "nodes.pending", "nodes.reject", "nodes.approve_routes", "log.head",
    "policy.get", "policy.check", "policy.set", "policy.impact",
]
ARG_NAMES = [
    "name", "display_name", "email", "user", "new_name", "key", "node", "tags", "routes",
    "reusable", "ephemeral", "expiration_seconds", "text", "reason",
]

# Strings that reach the grammars inside a policy: aliases, ports, prefixes, Unicode digits.
_PIECES = st.sampled_from([
    "tag:", "group:", "autogroup:", "*", ":", "/", "@", ".", "-", "0", "1", "22", "65536", "100.64.0.1",
    "fd7a::1", "\u00b2", "\u0661", "\uff11", "\U0001f600", "\ud7ff", "\x00", "\n", "\u202e", "admin", "member",
])
fuzzy_text = st.lists(_PIECES | st.text(max_size=4), max_size=8).map("".join)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | fuzzy_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(fuzzy_text, inner, max_size=4),
    max_leaves=25,
)

SECTIONS = ["acls", "grants", "groups", "hosts", "tagOwners", "autoApprovers", "ssh", "nodeAttrs", "tests", "sshTests"]
FIELDS = ["action", "src", "dst", "proto", "ip", "users", "accept", "deny", "routes", "exitNode", "target", "attr", "app", "via", "checkPeriod"]
structured_policies = st.dictionaries(
    st.sampled_from(SECTIONS),
    st.lists(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4), max_size=3) | json_values,
    max_size=4,
).map(json.dumps)

# Token soup: HuJSON, JSON5 look-alikes and broken fragments glued together.
_TOKENS = st.sampled_from([
    "{", "}", "[", "]", ",", ":", '"a"', '"acls"', "1", "-0", "1e999", "0x1F", ".5", "5.", "+1", "NaN",
    "Infinity", "true", "null", "'x'", "k", "// c\n", "/* c */", "/*", '"\\ud800"', '"\\x"', '"a\\\nb"',
    '"\u00e9"', "\ufeff", " ", "\n", "\t", "\u00a0",
])
token_soup = st.lists(_TOKENS | st.text(max_size=2), max_size=40).map("".join)


@st.composite
def nested(draw: st.DrawFn) -> str:
    """Deep or unbalanced nesting of arrays and objects, around fuzzy content."""
    depth = draw(st.integers(0, 3000))
    opener = draw(st.sampled_from(["[", '{"a":', "[{\"b\":", '{"acls":[']))
    closer = {"[": "]", '{"a":': "}", '[{"b":': "}]", '{"acls":[': "]}"}[opener]
    inner = draw(st.sampled_from(["", "1", '"x"', "[]", "{}"]))
    closing = draw(st.integers(0, depth))
    return opener * depth + inner + closer * closing

policy_texts = st.text() | fuzzy_text | token_soup | nested() | structured_policies


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("fuzz") / "data") as srv:
        srv.cli("users", "create", "alice", check=True)
        yield srv


requests = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS) | fuzzy_text},
    optional={"args": st.dictionaries(st.sampled_from(ARG_NAMES) | fuzzy_text, json_values, max_size=4)},
)
policy_requests = st.builds(
    lambda op, text: {"op": op, "args": {"text": text}}, st.sampled_from(["policy.check", "policy.set", "policy.impact"]), policy_texts
)
lines = (
    (requests | policy_requests).map(lambda r: json.dumps(r).encode())
    | st.binary(max_size=300).map(lambda b: b.replace(b"\n", b""))
    | nested().map(lambda t: b'{"op": "users.list", "args": {"x": ' + t.encode() + b"}}")
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(line=lines)
def test_every_admin_request_line_is_answered_and_the_server_survives(server: RunningServer, line: bytes) -> None:
    raw_request(server, line)  # asserts a one-line {"ok": bool, ...} answer
    assert server.proc.poll() is None, server.log_text()[-3000:]


def test_the_fuzzed_server_still_serves(server: RunningServer) -> None:
    assert_serving(server)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=policy_texts)
def test_the_policy_parser_raises_only_policy_errors(text: str) -> None:
    try:
        parse_policy(text)
    except PolicyError as exc:
        error: PolicyError | None = exc
    else:
        error = None
    assert error is None or error.line is None or error.line >= 1


_TAILNET = Recorder()
_ALICE = _TAILNET.user("alice")
_TAILNET.node(_ALICE, "laptop")
_TAILNET.node(_ALICE, "server", tags=("tag:server",))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=policy_texts)
def test_the_policy_check_raises_only_refusals(text: str) -> None:
    with contextlib.suppress(CommandError):
        c.check_policy_text(_TAILNET.state, text)
