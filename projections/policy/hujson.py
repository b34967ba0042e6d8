"""HuJSON loading with a source map, so errors can name a line and column.

Role in the pipeline: first step of :func:`projections.policy.parse_policy`.

HuJSON is JSON (RFC 8259) plus ``//`` and ``/* */`` comments and trailing commas,
nothing else: what Tailscale's ``hujson`` package and its policy tools accept. The
JSON5 extensions that look similar -- single-quoted or multi-line strings, unquoted
keys, ``NaN``/``Infinity``, hexadecimal numbers, a leading ``+``, a leading or trailing
decimal point -- are refused with the line and column of the offending character and
a hint, because Tailscale would refuse the same file.

One pass of a small, non-recursive parser builds the values and records where every
object key and every value starts, keyed by its JSON path (a tuple of object keys and
array indexes); validation code then asks the :class:`SourceMap` where
``("acls", 0, "dst", 1)`` is and reports that location.

Invariants:

* The parser keeps its own stack (no Python recursion), and nesting deeper than
  :data:`MAX_NESTING` is a :class:`PolicySyntaxError` at the bracket that goes too
  deep. No input text, however large or deep, raises anything but
  :class:`PolicySyntaxError`, and every later stage that walks the values (recursively)
  is bounded by the same depth.
* Strings are decoded as Go's ``encoding/json`` decodes them: ``\\u`` escapes that
  leave a lone surrogate become U+FFFD, so no value holds a code point that cannot be
  encoded as UTF-8.

:func:`load_legacy_hujson` is the old, lenient reading (``json5``) for policy texts
that were accepted before this parser and are already in the log: history must keep
folding.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Mapping
from json.decoder import scanstring  # type: ignore[attr-defined]  # C-accelerated; not in typeshed
from typing import Final

import json5

from .errors import PolicySyntaxError

__all__ = ["MAX_NESTING", "JSONPath", "SourceMap", "load_hujson", "load_legacy_hujson"]

#: A path into a JSON document: object keys and array indexes.
JSONPath = tuple[str | int, ...]

#: The deepest nesting of objects and arrays a policy may have. A real policy nests
#: five or six levels (grants' ``app`` values a few more); the limit only keeps
#: hostile input from exhausting the stack of later stages.
MAX_NESTING: Final = 100

_WHITESPACE: Final = re.compile(r"[ \t\r\n]*")
_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_WORD: Final = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_LITERALS: Final[dict[str, object]] = {"true": True, "false": False, "null": None}
# Characters that may not directly follow a number or literal (they would make it a
# different, JSON5-only token: 0x1F, 1.e5, NaN2 ...).
_GLUED: Final = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_$.+-")


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
        PolicySyntaxError: the text is not HuJSON (including JSON5 extensions and
            nesting deeper than :data:`MAX_NESTING`), with its line and column.
    """
    parser = _Parser(text)
    value = parser.parse()
    return value, SourceMap(
        {path: parser.where(pos) for path, pos in parser.values.items()},
        {path: parser.where(pos) for path, pos in parser.keys.items()},
    )


def load_legacy_hujson(text: str) -> object:
    """Read a policy text the way earlier versions did (``json5``: lenient).

    Only for texts already in the log, which were checked when they were appended;
    positions are not tracked.

    Raises:
        PolicySyntaxError: not even ``json5`` can read it.
    """
    try:
        return json5.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PolicySyntaxError(f"invalid HuJSON: {exc}") from None


def _found(ch: str) -> str:
    """Name what was found instead of the expected token."""
    return repr(ch) if ch else "the end of the text"


class _Frame:
    """An object or array being filled, on the parser's explicit stack."""

    __slots__ = ("container", "key", "path")

    def __init__(self, container: dict[str, object] | list[object], path: JSONPath) -> None:
        self.container = container
        self.path = path
        self.key = ""  # the key of the member being read (objects only)

    def add(self, value: object) -> None:
        if isinstance(self.container, dict):
            self.container[self.key] = value
        else:
            self.container.append(value)


class _Parser:
    """A non-recursive HuJSON parser recording the offset of every key and value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[JSONPath, int] = {}
        self.keys: dict[JSONPath, int] = {}
        self._line_starts: list[int] | None = None

    # -- positions and errors -------------------------------------------------------

    def where(self, pos: int) -> tuple[int, int]:
        """The 1-based ``(line, column)`` of character offset ``pos``."""
        if self._line_starts is None:
            starts = [0]
            find = self.text.find
            nl = find("\n")
            while nl >= 0:
                starts.append(nl + 1)
                nl = find("\n", nl + 1)
            self._line_starts = starts
        line = bisect_right(self._line_starts, pos)
        return line, pos - self._line_starts[line - 1] + 1

    def error(self, pos: int, message: str) -> PolicySyntaxError:
        line, column = self.where(pos)
        return PolicySyntaxError(f"invalid HuJSON: {message}", line, column)

    def _char(self, pos: int) -> str:
        """The character at ``pos`` ('' at the end of the text)."""
        return self.text[pos] if pos < len(self.text) else ""

    # -- lexical ----------------------------------------------------------------------

    def skip(self, pos: int) -> int:
        """Skip whitespace and comments; return the offset of the next token."""
        text = self.text
        while True:
            match = _WHITESPACE.match(text, pos)
            assert match is not None  # the pattern matches the empty string
            pos = match.end()
            if text.startswith("//", pos):
                end = text.find("\n", pos)
                pos = len(text) if end < 0 else end
            elif text.startswith("/*", pos):
                end = text.find("*/", pos + 2)
                if end < 0:
                    raise self.error(pos, "unterminated /* comment")
                pos = end + 2
            else:
                return pos

    def string(self, pos: int) -> tuple[str, int]:
        """Decode the double-quoted string at ``pos``; return it and the offset after it."""
        try:
            value, end = scanstring(self.text, pos + 1, True)
        except ValueError as exc:
            raise self._string_error(pos, exc) from None
        if not value.isascii() and _SURROGATE.search(value):
            value = _SURROGATE.sub("\ufffd", value)  # as Go's encoding/json does
        return value, end

    def _string_error(self, start: int, exc: ValueError) -> PolicySyntaxError:
        at = getattr(exc, "pos", start)
        msg = getattr(exc, "msg", str(exc))
        text = self.text
        if msg.startswith("Unterminated string"):
            return self.error(start, "unterminated string")
        if msg.startswith("Invalid control character"):
            if text[at] in "\r\n":
                return self.error(at, "a string cannot contain a line break (write \\n)")
            return self.error(at, f"control character {text[at]!r} in a string (escape it)")
        if msg.startswith("Invalid \\escape") and text[at + 1 : at + 2] in ("\r", "\n"):
            return self.error(at, "a string cannot continue on the next line (multi-line strings are JSON5, not HuJSON)")
        if msg.startswith("Invalid \\escape"):
            return self.error(at, f"invalid escape {text[at : at + 2]!r} in a string")
        return self.error(at, "invalid \\u escape in a string (it needs four hex digits)")

    def scalar(self, pos: int) -> tuple[object, int]:
        """Read a number, ``true``, ``false`` or ``null`` at ``pos``; refuse anything else."""
        text = self.text
        ch = self._char(pos)
        if ch == "-" or "0" <= ch <= "9":
            match = _NUMBER.match(text, pos)
            if match is None:  # a lone '-', or '-' before something else
                word = _WORD.match(text, pos + 1)
                if word is not None and word.group() in ("Infinity", "NaN"):
                    raise self.error(pos, "NaN and Infinity are not JSON numbers")
                raise self.error(pos, "invalid number")
            end = match.end()
            after = self._char(end)
            if after and after in _GLUED:
                raise self.error(pos, self._number_hint(match.group(), after))
            token = match.group()
            try:
                if "." in token or "e" in token or "E" in token:
                    number: float | int = float(token)
                    if number in (float("inf"), float("-inf")):
                        raise self.error(pos, f"number {token} is out of range")
                else:
                    number = int(token)
            except ValueError:  # more digits than Python converts (sys.int_info)
                raise self.error(pos, "number has too many digits") from None
            return number, end
        word = _WORD.match(text, pos)
        if word is not None:
            name = word.group()
            end = word.end()
            if name in _LITERALS and not (self._char(end) and self._char(end) in _GLUED):
                return _LITERALS[name], end
            if name in ("NaN", "Infinity"):
                raise self.error(pos, "NaN and Infinity are not JSON numbers")
            raise self.error(pos, f"unexpected word {name!r} (strings need double quotes)")
        raise self.error(pos, self._unexpected(ch))

    @staticmethod
    def _number_hint(token: str, after: str) -> str:
        if token in ("0", "-0") and after in "xX":
            return "hexadecimal numbers are not allowed (JSON5, not HuJSON)"
        if after == ".":
            return "a number needs digits after its decimal point"
        if token.lstrip("-").startswith("0") and after.isdigit():
            return "a number cannot have leading zeros"
        return f"invalid number (unexpected {after!r} after {token!r})"

    @staticmethod
    def _unexpected(ch: str) -> str:
        match ch:
            case "":
                return "unexpected end of text"
            case "'":
                return "single-quoted strings are not allowed (use double quotes)"
            case "+":
                return "a number cannot start with '+'"
            case ".":
                return "a number needs a digit before its decimal point"
            case _:
                return f"unexpected character {ch!r}"

    def key(self, pos: int) -> tuple[str, int]:
        """Read an object key (a double-quoted string) at ``pos``."""
        ch = self._char(pos)
        if ch == '"':
            return self.string(pos)
        if ch == "'":
            raise self.error(pos, "single-quoted keys are not allowed (use double quotes)")
        if _WORD.match(self.text, pos) is not None:
            raise self.error(pos, "object keys must be double-quoted strings (unquoted keys are JSON5, not HuJSON)")
        raise self.error(pos, f"expected a double-quoted key, found {_found(ch)}")

    # -- grammar ----------------------------------------------------------------------

    def parse(self) -> object:
        """The whole text: one value, surrounded by whitespace and comments."""
        text = self.text
        pos = 1 if text.startswith("\ufeff") else 0  # a byte-order mark some editors add
        pos = self.skip(pos)
        if pos >= len(text):
            raise self.error(pos, "the policy is empty")
        stack: list[_Frame] = []
        path: JSONPath = ()
        result: object = None
        while True:
            # A value starts at ``pos`` (after skipping), for ``path``.
            self.values[path] = pos
            ch = self._char(pos)
            if ch in ("{", "["):
                if len(stack) >= MAX_NESTING:
                    raise self.error(pos, f"nesting deeper than {MAX_NESTING} levels")
                container: dict[str, object] | list[object] = {} if ch == "{" else []
                stack.append(_Frame(container, path))
                pos = self.skip(pos + 1)
                closing = "}" if ch == "{" else "]"
                if self._char(pos) == closing:
                    pos += 1
                    value: object = stack.pop().container
                else:
                    path, pos = self._member(stack[-1], pos)
                    continue
            elif ch == '"':
                value, pos = self.string(pos)
            else:
                value, pos = self.scalar(pos)
            # A value is complete: attach it, then close every container it completes.
            while True:
                if not stack:
                    result = value
                    break
                frame = stack[-1]
                frame.add(value)
                closing = "}" if isinstance(frame.container, dict) else "]"
                pos = self.skip(pos)
                ch = self._char(pos)
                if ch == ",":
                    pos = self.skip(pos + 1)
                    if self._char(pos) != closing:  # another member
                        break
                elif ch != closing:
                    what = "member" if closing == "}" else "element"
                    raise self.error(pos, f"expected ',' or '{closing}' after an {what}, found {_found(ch)}")
                pos += 1
                value = stack.pop().container
            if not stack:
                break
            path, pos = self._member(stack[-1], pos)
        pos = self.skip(pos)
        if pos < len(text):
            raise self.error(pos, f"unexpected {_found(text[pos])} after the policy")
        return result

    def _member(self, frame: _Frame, pos: int) -> tuple[JSONPath, int]:
        """Start the next member of ``frame`` at ``pos``: its path and where its value starts."""
        if isinstance(frame.container, list):
            return (*frame.path, len(frame.container)), pos
        key_pos = pos
        frame.key, pos = self.key(pos)
        path = (*frame.path, frame.key)
        self.keys[path] = key_pos
        pos = self.skip(pos)
        if self._char(pos) != ":":
            raise self.error(pos, f"expected ':' after the key {frame.key!r}")
        return path, self.skip(pos + 1)
