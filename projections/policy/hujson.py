"""HuJSON loading with a source map, so errors can name a line and column.

Role in the pipeline: first step of :func:`projections.policy.parse_policy`.
The *values* come from the ``json5`` package (a superset of HuJSON: comments,
trailing commas). ``json5`` reports positions for syntax errors only, so a
second, tolerant scanner walks the same text and records where every object
key and every value starts, keyed by its JSON path (a tuple of object keys
and array indexes). Validation code then asks the :class:`SourceMap` where
``("acls", 0, "dst", 1)`` is and reports that location.

Invariant: the scanner only runs on text ``json5`` already accepted, so it
never has to diagnose anything; when it meets something it does not
understand it stops recording, and lookups fall back to the nearest
recorded ancestor.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping

import json5

from .errors import PolicySyntaxError

__all__ = ["JSONPath", "SourceMap", "load_hujson"]

#: A path into a JSON document: object keys and array indexes.
JSONPath = tuple[str | int, ...]

_JSON5_ERROR = re.compile(r"^<string>:(?P<line>\d+) (?P<msg>.*?)(?: at column (?P<col>\d+))?$")


class SourceMap:
    """Positions of keys and values in the policy text.

    Positions are 1-based ``(line, column)`` pairs, columns counted in
    characters.
    """

    __slots__ = ("_keys", "_values")

    def __init__(
        self,
        values: Mapping[JSONPath, tuple[int, int]],
        keys: Mapping[JSONPath, tuple[int, int]],
    ) -> None:
        self._values = dict(values)
        self._keys = dict(keys)

    def value(self, path: JSONPath) -> tuple[int, int] | None:
        """Where the value at ``path`` starts (or its nearest ancestor's)."""
        probe = path
        while True:
            hit = self._values.get(probe)
            if hit is not None:
                return hit
            if not probe:
                return None
            probe = probe[:-1]

    def key(self, path: JSONPath) -> tuple[int, int] | None:
        """Where the object key naming ``path`` starts, else the value position."""
        hit = self._keys.get(path)
        if hit is not None:
            return hit
        return self.value(path)


def load_hujson(text: str) -> tuple[object, SourceMap]:
    """Parse HuJSON text into plain Python values plus a source map.

    Args:
        text: the policy file as the user wrote it.

    Returns:
        ``(value, source_map)``; objects become dicts, arrays lists.

    Raises:
        PolicySyntaxError: when the text is not valid HuJSON, with the line
            and column ``json5`` reported.
    """
    try:
        # Plain JSON is a subset of HuJSON; the stdlib parser is ~50x faster
        # than json5's pure-Python one and yields the same values for it.
        value = json.loads(text)
    except ValueError:
        value = _json5_loads(text)
    scanner = _Scanner(text)
    with contextlib.suppress(_StopScan):
        scanner.value(())
    return value, SourceMap(scanner.values, scanner.keys)


def _json5_loads(text: str) -> object:
    """Parse with json5 (comments, trailing commas), mapping errors."""
    try:
        return json5.loads(text)
    except ValueError as exc:
        line, column, message = _describe_json5_error(str(exc))
        raise PolicySyntaxError(message, line, column) from None


def _describe_json5_error(raw: str) -> tuple[int | None, int | None, str]:
    """Turn json5's ``<string>:L msg at column C`` into parts."""
    match = _JSON5_ERROR.match(raw)
    if match is None:
        return None, None, f"invalid HuJSON: {raw}"
    col = match.group("col")
    return (
        int(match.group("line")),
        int(col) if col is not None else None,
        f"invalid HuJSON: {match.group('msg')}",
    )


class _StopScan(Exception):
    """Raised internally when the scanner meets text it does not model."""


class _Scanner:
    """A forgiving recursive-descent walker that records token positions."""

    def __init__(self, text: str) -> None:
        """Start at the beginning of ``text`` (line 1, column 1)."""
        self.text = text
        self.pos = 0
        self.line = 1
        self.col = 1
        self.values: dict[JSONPath, tuple[int, int]] = {}
        self.keys: dict[JSONPath, tuple[int, int]] = {}

    # -- low level --------------------------------------------------------

    def _advance(self, count: int = 1) -> None:
        """Consume ``count`` characters, tracking line and column."""
        for _ in range(count):
            if self.pos >= len(self.text):
                raise _StopScan
            if self.text[self.pos] == "\n":
                self.line += 1
                self.col = 1
            else:
                self.col += 1
            self.pos += 1

    def _peek(self) -> str:
        """The next character; stops the scan at the end of the text."""
        if self.pos >= len(self.text):
            raise _StopScan
        return self.text[self.pos]

    def _skip_space(self) -> None:
        """Skip whitespace, ``//`` line comments and ``/* */`` block comments."""
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch in " \t\r\n\ufeff\u00a0\u2028\u2029":
                self._advance()
            elif text.startswith("//", self.pos):
                while self.pos < len(text) and text[self.pos] != "\n":
                    self._advance()
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise _StopScan
                self._advance(end + 2 - self.pos)
            else:
                return

    def _string(self) -> str:
        """Consume a quoted string (either quote, JSON escapes) and decode it."""
        quote = self._peek()
        self._advance()
        out: list[str] = []
        while True:
            ch = self._peek()
            if ch == quote:
                self._advance()
                return "".join(out)
            if ch == "\\":
                self._advance()
                esc = self._peek()
                out.append({"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}.get(esc, esc))
                if esc == "u":
                    digits = self.text[self.pos + 1 : self.pos + 5]
                    out[-1] = chr(int(digits, 16)) if len(digits) == 4 else "u"
                    self._advance(4)
                self._advance()
                continue
            out.append(ch)
            self._advance()

    def _bare(self) -> str:
        """Consume a number, literal or unquoted (JSON5) key."""
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ",:]}/ \t\r\n":
            self._advance()
        return self.text[start : self.pos]

    # -- grammar ----------------------------------------------------------

    def value(self, path: JSONPath) -> None:
        """Record where the value at ``path`` starts, then consume it."""
        self._skip_space()
        self.values[path] = (self.line, self.col)
        ch = self._peek()
        if ch == "{":
            self._object(path)
        elif ch == "[":
            self._array(path)
        elif ch in "\"'":
            self._string()
        else:
            self._bare()

    def _object(self, path: JSONPath) -> None:
        """Consume an object, recording each key and value position."""
        self._advance()
        while True:
            self._skip_space()
            ch = self._peek()
            if ch == "}":
                self._advance()
                return
            if ch == ",":
                self._advance()
                continue
            where = (self.line, self.col)
            key = self._string() if ch in "\"'" else self._bare()
            self.keys[(*path, key)] = where
            self._skip_space()
            if self._peek() != ":":
                raise _StopScan
            self._advance()
            self.value((*path, key))

    def _array(self, path: JSONPath) -> None:
        """Consume an array, recording each element position by index."""
        self._advance()
        index = 0
        while True:
            self._skip_space()
            ch = self._peek()
            if ch == "]":
                self._advance()
                return
            if ch == ",":
                self._advance()
                continue
            self.value((*path, index))
            index += 1
