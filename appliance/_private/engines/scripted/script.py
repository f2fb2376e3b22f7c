"""What the scripted engine says, decided before the first token: deterministic text, tool
calls, JSON and log probabilities. Pure functions; the engine only paces them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from appliance._private.engines.base import RequestFeatures, SamplingParams

ChoiceEnd = Literal["stop", "length", "tool_calls"]
# A token is a word with the whitespace before it (and any after the last word).
_TOKEN = re.compile(r"\s*\S+(?:\s+$)?")
_ARGUMENT_PIECE = 8  # characters of tool-call arguments per token
_EXAMPLE_TEXT = "scripted"


@dataclass(frozen=True, slots=True)
class ChoiceScript:
    """One choice: its tokens in order and how it ends. For a tool call, `call` is the
    (id, function name) and the tokens are pieces of the arguments' JSON. `echo` is the
    prompt it starts with (a completion's `echo`), not counted as generated tokens."""

    pieces: list[str]
    end: ChoiceEnd
    call: tuple[str, str] | None = None
    echo: str = ""


def tokens_of(text: str) -> list[str]:
    return _TOKEN.findall(text)


def words(value: object) -> int:
    """A prompt's size: whitespace-separated words in every string of it, ids in a list."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(words(item) for item in value)
    if isinstance(value, dict):
        return words(value.get("content")) + words(value.get("text"))
    return 0


def echo_of(messages: list[dict[str, Any]] | None, text: str | list[int] | None) -> str:
    """What an engine without replies says back: the last user message, or the prompt."""
    if messages is None:
        return text if isinstance(text, str) else " ".join(map(str, text or []))
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return " ".join(part.get("text", "") for part in content or () if part)
    return ""


def text_choice(text: str, params: SamplingParams) -> ChoiceScript:
    """`text` cut at its first stop sequence, repeated while end-of-text is ignored (or
    min_tokens not reached), cut at max_tokens."""
    stopped = False
    for stop in sorted(params.stop, key=lambda stop: _find(text, stop)):
        if stop and stop in text:
            end = text.index(stop) + (len(stop) if params.include_stop_str_in_output else 0)
            text, stopped = text[:end], True
            break
    pieces = tokens_of(text)
    endless = params.ignore_eos and not stopped  # the end of the text does not end it
    wanted = params.max_tokens if endless else params.min_tokens
    while pieces and len(pieces) < wanted:
        pieces += tokens_of(" " + text)[: wanted - len(pieces)]
    if len(pieces) > params.max_tokens or (endless and len(pieces) == params.max_tokens):
        return ChoiceScript(pieces[: params.max_tokens], "length")
    return ChoiceScript(pieces, "stop")


def _find(text: str, stop: str) -> int:
    index = text.find(stop) if stop else -1
    return index if index >= 0 else len(text) + 1


def tool_call(features: RequestFeatures, call_id: str, max_tokens: int) -> ChoiceScript | None:
    """A call of the named tool (tool_choice) or the first one, with arguments that match
    its parameters' schema; None when tool_choice is "none" or no tool is given."""
    if not features.tools or features.tool_choice == "none":
        return None
    chosen = features.tool_choice
    wanted = chosen.get("function", {}).get("name") if isinstance(chosen, dict) else None
    functions = [tool.get("function", {}) for tool in features.tools]
    function = next((f for f in functions if f.get("name") == wanted), functions[0])
    arguments = json.dumps(example(function.get("parameters", {"type": "object"})))
    pieces = [
        arguments[start : start + _ARGUMENT_PIECE]
        for start in range(0, len(arguments), _ARGUMENT_PIECE)
    ]
    end: ChoiceEnd = "tool_calls" if len(pieces) <= max_tokens else "length"
    return ChoiceScript(pieces[:max_tokens], end, (call_id, str(function.get("name", "tool"))))


def json_reply(response_format: dict[str, Any] | None, reply: str) -> str | None:
    """The JSON answer `response_format` asks for: `{"reply": ...}` for a json_object, an
    example of the schema for a json_schema; None for text."""
    asked = response_format or {}
    if asked.get("type") == "json_object":
        return json.dumps({"reply": reply})
    if asked.get("type") == "json_schema":
        return json.dumps(example(asked.get("json_schema", {}).get("schema", {})))
    return None


def example(schema: Any) -> Any:
    """A small value that matches a JSON schema (const, enum, type, properties, items)."""
    if not isinstance(schema, dict):
        return _EXAMPLE_TEXT
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return example(schema[key][0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    return _EXAMPLES.get(kind, _string)(schema)


def _object(schema: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = schema.get("properties", {})
    names = list(properties) + [n for n in schema.get("required", ()) if n not in properties]
    return {name: example(properties.get(name, {})) for name in names}


def _array(schema: dict[str, Any]) -> list[Any]:
    count = max(1, int(schema.get("minItems", 1)))
    count = min(count, int(schema.get("maxItems", count)))
    return [example(schema.get("items", {})) for _ in range(count)]


def _string(schema: dict[str, Any]) -> str:
    text = _EXAMPLE_TEXT.ljust(int(schema.get("minLength", 0)), "!")
    return text[: int(schema.get("maxLength", len(text)))]


def _number(schema: dict[str, Any]) -> float:
    return float(schema.get("minimum", 1.5))


def _integer(schema: dict[str, Any]) -> int:
    return int(schema.get("minimum", 1))


_EXAMPLES: dict[str, Any] = {
    "object": _object,
    "array": _array,
    "string": _string,
    "number": _number,
    "integer": _integer,
    "boolean": lambda _: True,
    "null": lambda _: None,
}


def logprobs_of(piece: str, position: int, offset: int, top: int, *, chat: bool) -> dict[str, Any]:
    """The `logprobs` object of one token in OpenAI's chat or completions shape: the
    chosen token, then `top` alternatives (the chosen one first), all deterministic."""
    chosen = -0.125 * (position % 4 + 1)
    alternatives = [(piece, chosen)] + [(f" alt{k}", chosen - k) for k in range(1, top)]
    if not chat:
        return {
            "tokens": [piece],
            "token_logprobs": [chosen],
            "top_logprobs": [dict(alternatives[:top])] if top else None,
            "text_offset": [offset],
        }
    entry: dict[str, Any] = _entry(piece, chosen)
    entry["top_logprobs"] = [_entry(token, value) for token, value in alternatives[:top]]
    return {"content": [entry]}


def echo_logprobs(echo: str, top: int) -> dict[str, Any]:
    """The completions `logprobs` of an echoed prompt: the first token has none (nothing
    comes before it), the others are deterministic, as for generated tokens."""
    tokens = tokens_of(echo)
    values: list[float | None] = [None] + [-0.25] * (len(tokens) - 1)
    offsets = [0]
    for token in tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    alternatives = [
        None if value is None else {token: value} | {f" alt{k}": value - k for k in range(1, top)}
        for token, value in zip(tokens, values, strict=True)
    ]
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": alternatives if top else None,
        "text_offset": offsets,
    }


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
