"""A string schema's `pattern` (a regular expression) as GBNF for the string's content.

The grammar writes text the expression matches whole, so the string always matches
(JSON Schema's `pattern` only asks for a match somewhere in the string). Supported:
literals, `.`, classes (`[a-z0-9_]`, `[^...]`), `\\d \\w \\s` (and `\\D \\W \\S` outside
classes), groups `(...)`, `(?:...)`, alternation `|`, quantifiers `* + ? {m} {m,} {m,n}`
(lazy ones too), and `^`/`$` at the very ends. Characters are written as JSON needs them
(a quote as `\\"`); `.` and negated classes never write a quote, backslash or control
character, and `\\w`/`\\s` write only ASCII letters, digits, `_` and a space: a subset of
what they match, so every output still matches. Anything else (look-arounds, back
references, `\\b`, anchors inside, flags) is refused, naming `pattern`.
"""

from __future__ import annotations

import json

from appliance._private.engines.structured.grammar import literal, repeat
from federation import InvalidRequestError

# Characters `.` and negated classes leave out (a JSON string needs them escaped).
_UNWRITABLE = '"\\\\\\x00-\\x1F\\x7F'
_SHORTHANDS = {"d": "0-9", "w": "a-zA-Z0-9_", "s": "\\x20"}
_NEGATED = {"D": "0-9", "W": "a-zA-Z0-9_", "S": "\\x20\\x09\\x0A\\x0D\\x0B\\x0C"}
_SPECIAL = set("()[]{}|*+?.^$\\")


def pattern_expression(pattern: str, param: str) -> str:
    """The GBNF expression for a string content matching `pattern` whole."""
    parser = _Parser(pattern, param)
    return parser.parse()


class _Parser:
    def __init__(self, pattern: str, param: str) -> None:
        self._text = pattern
        self._param = param
        self._at = 0

    def parse(self) -> str:
        text = self._text
        start = 1 if text.startswith("^") else 0
        end = len(text) - 1 if text.endswith("$") and not text.endswith("\\$") else len(text)
        self._text, self._at = text[:end], start
        expression = self._alternation()
        if self._at != len(self._text):
            raise self._refuse(f"unexpected {self._text[self._at]!r}")
        return expression

    def _alternation(self) -> str:
        options = [self._sequence()]
        while self._peek() == "|":
            self._at += 1
            options.append(self._sequence())
        if len(options) == 1:
            return options[0]
        written = [option for option in options if option]
        if not written:
            return ""
        either = "( " + " | ".join(written) + " )"
        return either if len(written) == len(options) else either + "?"

    def _sequence(self) -> str:
        parts = []
        while self._at < len(self._text) and self._peek() not in "|)":
            atom = self._atom()
            parts.append(self._quantified(atom))
        return " ".join(part for part in parts if part)

    def _atom(self) -> str:
        char = self._take()
        if char == "(":
            if self._text.startswith("?", self._at):
                if not self._text.startswith("?:", self._at):
                    raise self._refuse("only plain and (?:...) groups are supported")
                self._at += 2
            inner = self._alternation()
            if self._take() != ")":
                raise self._refuse("a group is not closed")
            return f"( {inner} )" if inner else ""
        if char == "[":
            return self._class()
        if char == ".":
            return f"[^{_UNWRITABLE}]"
        if char == "\\":
            return self._escape()
        if char in "^$":
            raise self._refuse("`^` and `$` are supported only at the very ends")
        if char in _SPECIAL:
            raise self._refuse(f"unexpected {char!r}")
        return _written(char)

    def _escape(self) -> str:
        char = self._take()
        if char in _SHORTHANDS:
            return f"[{_SHORTHANDS[char]}]"
        if char in _NEGATED:
            return f"[^{_NEGATED[char]}{_UNWRITABLE}]"
        if char.isalnum():
            raise self._refuse(f"the escape \\{char} is not supported")
        return _written(char)

    def _class(self) -> str:
        negated = self._peek() == "^"
        self._at += negated
        members: list[str] = []
        quoted: list[str] = []  # `"` and `\` members: written escaped, outside the class
        first = True
        while first or self._peek() != "]":
            first = False
            low = self._class_char()
            if low.startswith("["):  # a shorthand such as \d
                members.append(low[1:-1])
                continue
            high = low
            if self._peek() == "-" and self._text[self._at + 1 : self._at + 2] not in ("]", ""):
                self._at += 1
                high = self._class_char()
                if high.startswith("[") or high < low:
                    raise self._refuse("a class range is malformed")
            if low in '"\\' and high == low and not negated:
                quoted.append(_written(low))
                continue
            if any(_unwritable(char) for char in (low, high)) and not negated:
                raise self._refuse("a class with quotes, backslashes or control characters")
            members.append(_class_member(low, high))
        self._at += 1
        if negated:
            return f"[^{''.join(members)}{_UNWRITABLE}]"
        options = ([f"[{''.join(members)}]"] if members else []) + quoted
        return options[0] if len(options) == 1 else "( " + " | ".join(options) + " )"

    def _class_char(self) -> str:
        """One class member: a character, or a shorthand's range text as `[...]`."""
        if self._at >= len(self._text):
            raise self._refuse("a class is not closed")
        char = self._take()
        if char != "\\":
            return char
        escaped = self._take()
        if escaped in _SHORTHANDS:
            return f"[{_SHORTHANDS[escaped]}]"
        if escaped.isalnum():
            raise self._refuse(f"the escape \\{escaped} is not supported in a class")
        return escaped

    def _quantified(self, atom: str) -> str:
        char = self._peek()
        if char in ("*", "+", "?"):
            self._at += 1
            least, most = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        elif char == "{" and self._counted():
            least, most = self._count()
        else:
            return atom
        if self._peek() == "?":
            self._at += 1  # lazy: the same strings
        if self._peek() in ("*", "+", "?", "{"):
            raise self._refuse("a quantifier follows a quantifier")
        return repeat(atom if " " not in atom else f"( {atom} )", least, most)

    def _counted(self) -> bool:
        closing = self._text.find("}", self._at)
        body = self._text[self._at + 1 : closing] if closing > 0 else ""
        return (
            bool(body)
            and all(part.isdigit() for part in body.split(",", 1) if part)
            and (body[0].isdigit())
        )

    def _count(self) -> tuple[int, int | None]:
        closing = self._text.index("}", self._at)
        body = self._text[self._at + 1 : closing]
        self._at = closing + 1
        low, _, high = body.partition(",")
        least = int(low)
        most = least if "," not in body else (int(high) if high else None)
        if most is not None and most < least:
            raise self._refuse("a {m,n} count has n < m")
        return least, most

    def _peek(self) -> str:
        return self._text[self._at] if self._at < len(self._text) else ""

    def _take(self) -> str:
        if self._at >= len(self._text):
            raise self._refuse("it ends too early")
        char = self._text[self._at]
        self._at += 1
        return char

    def _refuse(self, why: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"The `pattern` {self._text!r} is outside the supported regular expressions: {why}.",
            code="unsupported_schema",
            param=self._param,
        )


def _unwritable(char: str) -> bool:
    return char in '"\\' or ord(char) < 0x20 or ord(char) == 0x7F


def _written(char: str) -> str:
    """A character as the JSON string's text has it (escaped where JSON needs it)."""
    return literal(json.dumps(char, ensure_ascii=False)[1:-1])


def _class_member(low: str, high: str) -> str:
    return (
        _class_char_text(low)
        if low == high
        else f"{_class_char_text(low)}-{_class_char_text(high)}"
    )


def _class_char_text(char: str) -> str:
    if char.isalnum() and char.isascii():
        return char
    code = ord(char)
    return (
        f"\\x{code:02X}"
        if code < 0x100
        else f"\\u{code:04X}"
        if code < 0x10000
        else f"\\U{code:08X}"
    )
