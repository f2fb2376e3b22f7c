"""Generated text back into OpenAI's shapes, one choice at a time, as it streams.

A plan that only constrains (a JSON schema, JSON mode) passes text through. A plan with
tools reads the generic tool envelope the grammar makes the model write,

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    {"response": "It is sunny."}

turning each call into streamed `delta.tool_calls` fragments (the first with the call's
index, id, type and name; then pieces of the arguments' JSON text as they arrive) and a
response into content (a string's decoded text, or the JSON text of a value when
`response_format` shapes it). Text that does not follow the envelope (a model sampled
without its grammar) comes out as content, so nothing generated is ever lost.
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Any, Protocol

from appliance._private.engines.base import ChoiceDelta

_SPACE = " \t\r\n"
_ID_ALPHABET = string.ascii_letters + string.digits
_STREAMING = frozenset({"arguments", "response-value", "string"})
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class OutputReader(Protocol):
    """Generated text of one choice in, that choice's deltas out."""

    def feed(self, text: str) -> list[ChoiceDelta]:
        """Deltas for `text`, the next piece of this choice's output (may be none yet)."""

    def end(self, reason: str) -> list[ChoiceDelta]:
        """Whatever is left, the last delta carrying the finish reason ("tool_calls" when
        the choice called tools and otherwise stopped normally)."""


def call_id() -> str:
    """A tool call's id, in OpenAI's form."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class TextReader:
    """Text is the answer (JSON mode, a schema): passed through as content."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def feed(self, text: str) -> list[ChoiceDelta]:
        return [ChoiceDelta(index=self.index, text=text)] if text else []

    def end(self, reason: str) -> list[ChoiceDelta]:
        return [ChoiceDelta(index=self.index, finish_reason=reason)]


class _NeedMore(Exception):  # noqa: N818 (control flow, not an error)
    """The buffered text ends before the token being read does."""


class _OffScript(Exception):  # noqa: N818
    """The text does not follow the envelope."""


class ToolCallReader:
    """Reads the generic tool envelope incrementally (see the module docstring).

    `_buffer` holds text not yet consumed; each `_step` consumes one token of the
    envelope or raises `_NeedMore` (wait for more text) or `_OffScript` (give up and pass
    the rest through as content).
    """

    def __init__(self, index: int, *, text_response: bool) -> None:
        self.index = index
        self._text_response = text_response  # "response" is a string to decode
        self._buffer = ""
        self._state = "open"
        self._calls = 0
        self._value = _ValueScanner()
        self._out: list[ChoiceDelta] = []

    # --- the reader's interface --------------------------------------------------------

    def feed(self, text: str) -> list[ChoiceDelta]:
        self._buffer += text
        self._run()
        return self._take()

    def end(self, reason: str) -> list[ChoiceDelta]:
        self._run()
        if self._buffer and self._state in ("arguments", "response-value"):
            self._value_piece(self._buffer)  # cut short (a length limit): what there is
        elif self._buffer.strip() and self._state not in ("done", "string"):
            self._content(self._buffer)
        self._buffer = ""
        finish = "tool_calls" if self._calls and reason == "stop" else reason
        self._out.append(ChoiceDelta(index=self.index, finish_reason=finish))
        return self._take()

    # --- the envelope ------------------------------------------------------------------

    def _run(self) -> None:
        """Steps while there is text. A step of the envelope's fixed parts consumes its
        tokens whole or not at all; the streaming states hand text on as it comes."""
        while self._buffer and self._state not in ("done", "raw"):
            state, saved = self._state, self._buffer
            try:
                self._step()
            except (_NeedMore, _OffScript) as stop:
                if state not in _STREAMING:
                    self._state, self._buffer = state, saved
                if isinstance(stop, _NeedMore):
                    return
                self._state = "raw"
        if self._state == "raw":
            self._content(self._buffer)
            self._buffer = ""
        elif self._state == "done":
            self._buffer = ""  # after the envelope closes: nothing more to say

    def _step(self) -> None:  # noqa: PLR0912 (one branch per state reads best)
        state = self._state
        if state == "open":
            self._expect("{")
            key = self._key()
            if key == "tool_calls":
                self._expect("[")
                self._state = "call"
            elif key == "response":
                if self._text_response:
                    self._expect('"')
                self._state = "string" if self._text_response else "response-value"
            else:
                raise _OffScript
        elif state == "call":
            self._expect("{")
            if self._key() != "name":
                raise _OffScript
            name = self._string()
            self._expect(",")
            if self._key() != "arguments":
                raise _OffScript
            self._start_call(name)
            self._state = "arguments"
        elif state in ("arguments", "response-value"):
            self._read_value()
        elif state == "string":
            self._read_string_content()
        elif state == "after-call":
            self._expect("}")
            self._state = "between-calls"
        elif state == "between-calls":
            mark = self._token()
            self._state = "call" if mark == "," else "close-calls"
            if mark not in ",]":
                raise _OffScript
        elif state in {"close-calls", "close-response"}:
            self._expect("}")
            self._state = "done"

    def _start_call(self, name: str) -> None:
        fragment = {
            "index": self._calls,
            "id": call_id(),
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        self._calls += 1
        self._out.append(ChoiceDelta(index=self.index, tool_calls=[fragment]))

    def _read_value(self) -> None:
        """Pass the JSON value's text on as it comes; after its end, move on."""
        if not self._value.started:
            self._buffer = self._buffer.lstrip(_SPACE)
            if not self._buffer:
                raise _NeedMore
        used, complete = self._value.scan(self._buffer, objects_only=self._state == "arguments")
        if used:
            self._value_piece(self._buffer[:used])
            self._buffer = self._buffer[used:]
        if not complete:
            if self._value.off_script:
                raise _OffScript
            raise _NeedMore
        self._value = _ValueScanner()
        self._state = "after-call" if self._state == "arguments" else "close-response"

    def _value_piece(self, text: str) -> None:
        if self._state == "arguments":
            fragment = {"index": self._calls - 1, "function": {"arguments": text}}
            self._out.append(ChoiceDelta(index=self.index, tool_calls=[fragment]))
        else:
            self._content(text)

    def _read_string_content(self) -> None:
        """A response string's characters, decoded, up to its closing quote."""
        decoded: list[str] = []
        position = 0
        buffer = self._buffer
        while position < len(buffer):
            char = buffer[position]
            if char == '"':
                self._content("".join(decoded))
                self._buffer = buffer[position + 1 :]
                self._state = "close-response"
                return
            if char != "\\":
                decoded.append(char)
                position += 1
                continue
            escape = _escape(buffer, position)
            if escape is None:
                break  # an escape cut in two: wait for its end
            text, length = escape
            decoded.append(text)
            position += length
        self._content("".join(decoded))
        self._buffer = buffer[position:]
        raise _NeedMore

    # --- tokens ------------------------------------------------------------------------

    def _token(self) -> str:
        """The next non-space character, consumed."""
        stripped = self._buffer.lstrip(_SPACE)
        if not stripped:
            self._buffer = ""
            raise _NeedMore
        self._buffer = stripped[1:]
        return stripped[0]

    def _expect(self, char: str) -> None:
        if self._token() != char:
            raise _OffScript

    def _key(self) -> str:
        """`"key" :` consumed."""
        key = self._string()
        self._expect(":")
        return key

    def _string(self) -> str:
        """A whole JSON string token, decoded."""
        self._expect('"')
        position, buffer = 0, self._buffer
        while position < len(buffer):
            if buffer[position] == "\\":
                position += 2
            elif buffer[position] == '"':
                try:
                    value: str = json.loads('"' + buffer[:position] + '"')
                except ValueError as exc:
                    raise _OffScript from exc
                self._buffer = buffer[position + 1 :]
                return value
            else:
                position += 1
        raise _NeedMore

    # --- output ------------------------------------------------------------------------

    def _content(self, text: str) -> None:
        if text:
            self._out.append(ChoiceDelta(index=self.index, text=text))

    def _take(self) -> list[ChoiceDelta]:
        out, self._out = self._out, []
        return out


def _escape(buffer: str, position: int) -> tuple[str, int] | None:
    """The escape at `position` (a backslash) decoded, and its length; None if cut short.
    A surrogate pair is one character; a lone surrogate (no text has one) becomes U+FFFD."""
    if position + 1 >= len(buffer):
        return None
    kind = buffer[position + 1]
    if kind != "u":
        return _ESCAPES.get(kind, kind), 2
    return _unicode_escape(buffer, position)


def _unicode_escape(buffer: str, position: int) -> tuple[str, int] | None:
    """A `\\uXXXX` escape (with its low surrogate, if it is a high one)."""
    unit = _code_unit(buffer, position)
    if unit is None:
        return None
    if not 0xD800 <= unit <= 0xDFFF:
        return chr(unit), 6
    follow = buffer[position + 6 : position + 8]
    if unit >= 0xDC00 or (follow != "\\u" and not "\\u".startswith(follow)):
        return "\ufffd", 6
    low = _code_unit(buffer, position + 6) if follow == "\\u" else None
    if low is None:
        return None
    if 0xDC00 <= low <= 0xDFFF:
        return chr(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)), 12
    return "\ufffd", 6


def _code_unit(buffer: str, position: int) -> int | None:
    """The four hex digits after `\\u` at `position` (None: not all there yet)."""
    digits = buffer[position + 2 : position + 6]
    if len(digits) < 4:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return 0xFFFD


class _ValueScanner:
    """Finds where one JSON value ends in text that arrives in pieces: it tracks nesting
    and strings, so it never needs the text twice."""

    __slots__ = ("_depth", "_escaped", "_in_string", "_scalar", "off_script", "started")

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._scalar = False  # a number, true, false or null: it ends where its text does
        self.started = False
        self.off_script = False

    def scan(self, text: str, *, objects_only: bool) -> tuple[int, bool]:
        """How much of `text` belongs to the value, and whether the value ended there."""
        for position, char in enumerate(text):
            if not self.started:
                self.started = True
                self._scalar = char not in '{["'
                if self._scalar and objects_only:
                    self.off_script = True  # a scalar where an object belongs
                    return position, False
            if self._scalar:
                if char in _SPACE or char in ",}]":
                    return position, True
            elif self._ends_with(char):
                return position + 1, True
        return len(text), False

    def _ends_with(self, char: str) -> bool:
        """Take one character of a string, object or array; True if the value ends."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                return self._depth == 0
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            return self._depth == 0
        return False


def parse_arguments(text: str) -> Any:
    """A call's arguments text as JSON (the text itself if it is not JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text
