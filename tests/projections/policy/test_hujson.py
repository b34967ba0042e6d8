"""The HuJSON reader: exactly JSON plus comments and trailing commas; JSON5
extensions and excessive nesting are syntax errors at their line and column."""

from __future__ import annotations

import pytest

from projections.policy import PolicySyntaxError, parse_policy, parse_stored_policy
from projections.policy.hujson import MAX_NESTING, load_hujson


def test_comments_trailing_commas_and_positions() -> None:
    text = '// head\n{\n  "a": [1, -2.5e3, true, null,], /* b */\n  "b": {"c": "\\u00e9\\n",},\n}\n'
    value, source = load_hujson(text)
    assert value == {"a": [1, -2500.0, True, None], "b": {"c": "\u00e9\n"}}
    assert source.key(("a",)) == (3, 3)
    assert source.value(("a", 1)) == (3, 12)
    assert source.value(("b", "c")) == (4, 14)


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("{'acls': []}", (1, 2), "single-quoted keys"),
        ('{"acls": [\'x\']}', (1, 11), "single-quoted strings"),
        ("{\n  acls: []}", (2, 3), "keys must be double-quoted"),
        ('{"a": NaN}', (1, 7), "NaN and Infinity"),
        ('{"a": Infinity}', (1, 7), "NaN and Infinity"),
        ('{"a": -Infinity}', (1, 7), "NaN and Infinity"),
        ('{"a": 0x1F}', (1, 7), "hexadecimal"),
        ('{"a": .5}', (1, 7), "digit before its decimal point"),
        ('{"a": 5.}', (1, 7), "digits after its decimal point"),
        ('{"a": +1}', (1, 7), "cannot start with '+'"),
        ('{"a": 007}', (1, 7), "leading zeros"),
        ('{"a": "one\\\ntwo"}', (1, 11), "multi-line strings"),
        ('{"a": "one\ntwo"}', (1, 11), "line break"),
        ('{"a": "\\x41"}', (1, 8), "invalid escape"),
        ('{"a": "\\v"}', (1, 8), "invalid escape"),
        ('{"a": "open}', (1, 7), "unterminated string"),
        ('{"a": 1e400}', (1, 7), "out of range"),
        ('{"a": undefined}', (1, 7), "unexpected word 'undefined'"),
        ('{"a": 1 "b": 2}', (1, 9), "expected ',' or '}'"),
        ("[1,,2]", (1, 4), "unexpected character ','"),
        ("{} {}", (1, 4), "after the policy"),
        ("/* open", (1, 1), "unterminated /* comment"),
        ("  ", (1, 3), "empty"),
        ('{"a":\u00a01}', (1, 6), "unexpected character"),
    ],
)
def test_json5_extensions_and_broken_text_are_refused_with_a_position(
    text: str, where: tuple[int, int], message: str
) -> None:
    with pytest.raises(PolicySyntaxError) as info:
        load_hujson(text)
    assert (info.value.line, info.value.column) == where
    assert message in info.value.message
    assert info.value.located().startswith(f"{where[0]}:{where[1]}: invalid HuJSON: ")


def test_nesting_is_limited_without_recursion() -> None:
    at_limit = "[" * MAX_NESTING + "]" * MAX_NESTING
    load_hujson(at_limit)
    for depth in (MAX_NESTING + 1, 100_000, 1_000_000):
        with pytest.raises(PolicySyntaxError) as info:
            load_hujson("[" * depth + "]" * depth)
        assert (info.value.line, info.value.column) == (1, MAX_NESTING + 1)
        assert "nesting deeper than 100 levels" in info.value.message
    with pytest.raises(PolicySyntaxError) as info:
        parse_policy('{"grants": [{"src": ["*"], "dst": ["*"], "app": {"x/y": [' + "{\"k\":" * 200)
    assert info.value.line == 1
    assert "nesting" in info.value.message


def test_strings_decode_as_go_does() -> None:
    value, _ = load_hujson('["\\ud83d\\ude00", "\\ud800", "x\\udfffy"]')
    assert value == ["\U0001f600", "\ufffd", "x\ufffdy"]


def test_a_byte_order_mark_is_allowed() -> None:
    assert load_hujson('\ufeff{"acls": []}')[0] == {"acls": []}


def test_stored_policies_from_the_lenient_reader_still_fold() -> None:
    legacy = "{acls: [{action: 'accept', src: ['*'], dst: ['*:22']}]}"
    with pytest.raises(PolicySyntaxError):
        parse_policy(legacy)
    policy = parse_stored_policy(legacy)
    assert policy.acls is not None
    assert policy.acls == parse_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}').acls
