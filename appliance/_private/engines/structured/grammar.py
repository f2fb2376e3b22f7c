"""GBNF text (llama.cpp's grammar format) built from named rules.

Rules are shared when their bodies are equal, so a schema that repeats a shape (or a
tool envelope listing many functions) stays small. The JSON primitives keep output
bounded where JSON itself is not: one optional space between tokens, at most 16 integer
digits and 15 fraction digits, so a small model cannot wander off into endless
whitespace or digits and always reaches the end of its value.
"""

from __future__ import annotations

import json
import re
from typing import Any

ROOT = "root"

# JSON building blocks, by rule name. `char` leaves out raw control characters (invalid
# inside a JSON string) and `\u` escapes of surrogates, whose pairs would decode to one
# character and so break a string's length limits.
PRIMITIVES: dict[str, str] = {
    "ws": '" "?',
    "hex": "[0-9a-fA-F]",
    "char": (
        r'[^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" ( [0-9a-cA-CefEF] hex{3} '
        r"| [dD] [0-7] hex{2} ) )"
    ),
    "string": r'"\"" char* "\""',
    "integer": '"-"? ( "0" | [1-9] [0-9]{0,15} )',
    "number": 'integer ( "." [0-9]{1,15} )?',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws ( string ws ":" ws value ( "," ws string ws ":" ws value )* ws )? "}"',
    "array": '"[" ws ( value ( "," ws value )* ws )? "]"',
    # String formats, checked the way Python's own parsers (and so `jsonschema`'s format
    # checker) read them: no February 29th (not every year has one), year 1000 or later.
    "date": (
        '[1-9] [0-9]{3} "-" ( ( "01" | "03" | "05" | "07" | "08" | "10" | "12" ) "-" day31 '
        '| ( "04" | "06" | "09" | "11" ) "-" day30 | "02" "-" day28 )'
    ),
    "day28": '"0" [1-9] | "1" [0-9] | "2" [0-8]',
    "day30": 'day28 | "29" | "30"',
    "day31": 'day30 | "31"',
    "time": (
        '( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? '
        '( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )'
    ),
    "date-time": 'date "T" time',
    "uuid": 'hex{8} "-" hex{4} "-" hex{4} "-" hex{4} "-" hex{12}',
}

# Which primitives each one uses, so a grammar carries only what it needs.
_USES: dict[str, tuple[str, ...]] = {
    "char": ("hex",),
    "string": ("char",),
    "number": ("integer",),
    "value": ("object", "array", "string", "number", "boolean", "null"),
    "object": ("ws", "string", "value"),
    "array": ("ws", "value"),
    "date": ("day28", "day30", "day31"),
    "day30": ("day28",),
    "day31": ("day30",),
    "date-time": ("date", "time"),
    "uuid": ("hex",),
}

_NOT_A_NAME = re.compile(r"[^a-zA-Z0-9-]+")


def literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char == "\n":
            escaped.append("\\n")
        elif char == "\r":
            escaped.append("\\r")
        elif char == "\t":
            escaped.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\x{ord(char):02X}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def json_literal(value: Any) -> str:
    """A JSON value's text as a GBNF literal (the model writes exactly this)."""
    return literal(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))


def repeat(item: str, least: int, most: int | None) -> str:
    """`item` repeated `least` to `most` (None: any number of) times, as GBNF."""
    if most is None:
        return {0: f"{item}*", 1: f"{item}+"}.get(least, f"{item}{{{least},}}")
    if least == most:
        return "" if most == 0 else item if most == 1 else f"{item}{{{most}}}"
    if (least, most) == (0, 1):
        return f"{item}?"
    return f"{item}{{{least},{most}}}"


def separated(item: str, least: int, most: int | None) -> str:
    """`least` to `most` `item`s separated by commas (a JSON array's or call list's inside)."""
    if most == 0:
        return ""
    rest = repeat(f'( "," ws {item} )', max(least - 1, 0), None if most is None else most - 1)
    listed = f"{item} {rest}".strip()
    return f"{listed} ws" if least > 0 else f"( {listed} ws )?"


class Grammar:
    """Rules under construction; `text()` renders them with `root` first."""

    def __init__(self) -> None:
        self._rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self._primitives: set[str] = set()

    def primitive(self, name: str) -> str:
        """One of `PRIMITIVES` (and what it uses), added once; returns its name."""
        if name not in self._primitives:
            self._primitives.add(name)
            for used in _USES.get(name, ()):
                self.primitive(used)
        return name

    def rule(self, hint: str, body: str) -> str:
        """A rule with this body, sharing an equal one; returns its name."""
        existing = self._by_body.get(body)
        if existing is not None:
            return existing
        name = self.reserve(hint)
        self.define(name, body)
        return name

    def reserve(self, hint: str) -> str:
        """A fresh rule name (defined later: how recursive references are built)."""
        base = _NOT_A_NAME.sub("-", hint).strip("-").lower() or "r"
        name, suffix = base, 1
        while name in self._rules or name in PRIMITIVES or name == ROOT:
            suffix += 1
            name = f"{base}-{suffix}"
        self._rules[name] = ""
        return name

    def define(self, name: str, body: str) -> None:
        self._rules[name] = body
        self._by_body.setdefault(body, name)

    def text(self, root: str) -> str:
        """The grammar whose `root` rule is `root` (an expression)."""
        self.primitive("ws")
        lines = [f"{ROOT} ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self._rules.items()]
        lines += [f"{name} ::= {PRIMITIVES[name]}" for name in sorted(self._primitives)]
        return "\n".join(lines) + "\n"


# --- integer ranges ----------------------------------------------------------------------

_MAX_DIGITS = 16  # as the `integer` primitive: no unbounded runs of digits


def integer_range(least: int | None, most: int | None) -> str:
    """Integers from `least` to `most` (None: unbounded, within 16 digits) as a GBNF
    expression: digit patterns per length, no leading zeros, "-" before negatives."""
    ceiling = 10**_MAX_DIGITS - 1
    low = -ceiling if least is None else least
    high = ceiling if most is None else most
    alternatives = []
    if low < 0:
        negatives = _natural_range(max(1, -high), -low)
        alternatives += [f'"-" {pattern}' for pattern in negatives]
    if high >= 0:
        alternatives += _natural_range(max(0, low), high)
    return " | ".join(f"( {pattern} )" for pattern in alternatives)


def _natural_range(low: int, high: int) -> list[str]:
    """Patterns matching exactly the numbers `low`..`high` (both >= 0), written plainly."""
    if low > high:
        return []
    width = len(str(low))
    if width < len(str(high)):
        return _natural_range(low, 10**width - 1) + _natural_range(10**width, high)
    return [" ".join(parts) for parts in _same_width(str(low), str(high))]


def _same_width(low: str, high: str) -> list[list[str]]:
    """Digit sequences for `low`..`high`, strings of one width (so no leading zeros)."""
    if low == high:
        return [[f'"{low}"']]
    if low.lstrip("0") == "" and set(high) == {"9"}:
        return [[repeat("[0-9]", len(low), len(low))]]
    if len(low) == 1:
        return [[f"[{low}-{high}]"]]
    head_low, head_high, width = low[0], high[0], len(low) - 1
    if head_low == head_high:
        return [[f'"{head_low}"', *rest] for rest in _same_width(low[1:], high[1:])]
    if set(low[1:]) == {"0"} and set(high[1:]) == {"9"}:
        return [[f"[{head_low}-{head_high}]", repeat("[0-9]", width, width)]]
    patterns = [[f'"{head_low}"', *rest] for rest in _same_width(low[1:], "9" * width)]
    if int(head_high) - int(head_low) > 1:
        middle = f"[{int(head_low) + 1}-{int(head_high) - 1}]"
        patterns.append([middle, repeat("[0-9]", width, width)])
    patterns += [[f'"{head_high}"', *rest] for rest in _same_width("0" * width, high[1:])]
    return patterns


_FRACTION = '( "." [0-9]{1,15} )?'
_ZERO_FRACTION = '( "." "0"{1,15} )?'


def number_range(least: int | None, most: int | None) -> str:
    """Numbers from `least` to `most` (whole-number bounds; None: unbounded) as a GBNF
    expression: an integer part in range with any fraction, or a bound itself with a zero
    fraction. Negatives are "-" and a magnitude from -most to -least."""
    alternatives = []
    if most is None or most >= 0:
        low = 0 if least is None else max(least, 0)
        alternatives += _bounded_numbers("", low, most)
    if least is None or least < 0:
        low = 0 if most is None else max(-most, 0)
        alternatives += _bounded_numbers('"-" ', low, None if least is None else -least)
    return " | ".join(alternatives)


def _bounded_numbers(sign: str, low: int, high: int | None) -> list[str]:
    """`sign` then magnitudes from `low` to `high` (both >= 0)."""
    if high is None:
        return [f"{sign}( {integer_range(low, None)} ) {_FRACTION}"]
    numbers = []
    if high - 1 >= low:
        numbers.append(f"{sign}( {integer_range(low, high - 1)} ) {_FRACTION}")
    if high >= low:
        numbers.append(f"{sign}( {integer_range(high, high)} ) {_ZERO_FRACTION}")
    return numbers
