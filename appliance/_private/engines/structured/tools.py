"""Tools in the generic format: definitions, the envelope grammar and the prompt.

A model whose chat template knows nothing of tools is told about them in a system
message and made (by the grammar) to answer with JSON, as llama.cpp's server does for
such models:

    {"tool_calls": [{"name": "<tool>", "arguments": {...}}]}    a call (or several)
    {"response": "<text>"}                                       an answer

`tool_choice` "auto" allows both; "required" and a named function only calls (a named
one only that function, exactly once). One call per answer unless `parallel_tool_calls`
is true (then up to `MAX_PARALLEL_CALLS`), as llama.cpp's server does.
Each call's arguments follow its function's `parameters` schema, so they always validate.
The conversation's earlier calls and results are written in the same format, so the
model sees its own protocol.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from appliance._private.engines.structured.grammar import Grammar, json_literal, literal, separated
from appliance._private.engines.structured.reader import parse_arguments
from appliance._private.engines.structured.schema import schema_rule
from federation import InvalidRequestError

# How many calls one answer may make when `parallel_tool_calls` is true: a small model
# repeating itself stops here instead of at max_tokens with a cut-off envelope. Unset, it
# is one call, as llama.cpp's server does: small models otherwise repeat their call.
MAX_PARALLEL_CALLS = 8

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_CHOICES = ("none", "auto", "required")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]
    index: int  # its place in `tools`, for error paths


@dataclass(frozen=True, slots=True)
class ToolUse:
    """What a request allows: the callable functions (only the named one, if one is
    named), whether it must call, and how many calls at most."""

    functions: tuple[Function, ...]
    required: bool
    most_calls: int


def read_tools(tools: list[dict[str, Any]] | None) -> tuple[Function, ...]:
    """The request's function definitions, checked (400 invalid_value naming the field)."""
    functions: list[Function] = []
    for index, tool in enumerate(tools or ()):
        path = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _invalid("Each tool must be {'type': 'function', 'function': {...}}.", path)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _invalid("A tool needs its `function` object.", f"{path}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _invalid(
                "A function's `name` is 1 to 64 letters, digits, underscores or dashes.",
                f"{path}.function.name",
            )
        if any(other.name == name for other in functions):
            raise _invalid(f"Two tools are named {name!r}.", f"{path}.function.name")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise _invalid("`description` must be a string.", f"{path}.function.description")
        parameters = function.get("parameters", _NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise _invalid(
                "`parameters` must be a JSON schema object.", f"{path}.function.parameters"
            )
        functions.append(Function(name, description, parameters, index))
    return tuple(functions)


def tool_use(
    functions: tuple[Function, ...],
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
) -> ToolUse | None:
    """What `tool_choice` allows of `functions`; None when no call may be made."""
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str):
        if choice not in _CHOICES:
            raise _invalid(
                "`tool_choice` is 'none', 'auto', 'required' or "
                "{'type': 'function', 'function': {'name': ...}}.",
                "tool_choice",
            )
        if choice == "required" and not functions:
            raise _invalid("`tool_choice` 'required' needs `tools`.", "tool_choice")
        if choice == "none" or not functions:
            return None
        most = MAX_PARALLEL_CALLS if parallel_tool_calls else 1
        return ToolUse(functions, required=choice == "required", most_calls=most)
    named = _named(choice)
    chosen = [function for function in functions if function.name == named]
    if not chosen:
        raise _invalid(f"`tool_choice` names {named!r}, which is not in `tools`.", "tool_choice")
    return ToolUse(tuple(chosen), required=True, most_calls=1)


def _named(choice: Any) -> str:
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or choice.get("type", "function") != "function":
        raise _invalid(
            "A named `tool_choice` is {'type': 'function', 'function': {'name': ...}}.",
            "tool_choice",
        )
    return name


def envelope_rule(grammar: Grammar, use: ToolUse, response: str | None) -> str:
    """The root expression: calls of `use`'s functions, or (unless calls are required)
    `{"response": ...}` with `response` (an expression; None: any text)."""
    calls = [_call_rule(grammar, function) for function in use.functions]
    call = grammar.rule("call", " | ".join(calls))
    listed = separated(call, 1, use.most_calls)
    envelope = f'"{{" ws {literal(json.dumps("tool_calls"))} ws ":" ws "[" ws {listed} "]" ws "}}"'
    if use.required:
        return envelope
    answer = response or grammar.primitive("string")
    reply = f'"{{" ws {literal(json.dumps("response"))} ws ":" ws {answer} ws "}}"'
    return f"{grammar.rule('tool-calls', envelope)} | {grammar.rule('response', reply)}"


def _call_rule(grammar: Grammar, function: Function) -> str:
    param = f"tools[{function.index}].function.parameters"
    arguments = schema_rule(grammar, function.parameters, param, f"{function.name}-arguments")
    body = (
        f'"{{" ws {literal(json.dumps("name"))} ws ":" ws {json_literal(function.name)} '
        f'"," ws {literal(json.dumps("arguments"))} ws ":" ws {arguments} ws "}}"'
    )
    return grammar.rule(f"{function.name}-call", body)


# --- the prompt --------------------------------------------------------------------------


def instructions(use: ToolUse, response_schema: dict[str, Any] | None) -> str:
    """The system text that lists the tools and the JSON the model must answer with."""
    listing = [
        {
            "name": function.name,
            "description": function.description,
            "parameters": function.parameters,
        }
        for function in use.functions
    ]
    call = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}'
    lines = [
        "You can call these tools:",
        json.dumps(listing, ensure_ascii=False),
        "",
    ]
    if use.required:
        which = f"the tool {use.functions[0].name}" if len(use.functions) == 1 else "a tool"
        lines.append(f"Call {which}: answer with JSON only, in this form:")
        lines.append(call)
        return "\n".join(lines)
    response = (
        '{"response": "<your answer>"}'
        if response_schema is None
        else '{"response": <your answer as JSON matching this schema: '
        + json.dumps(response_schema, ensure_ascii=False)
        + ">}"
    )
    lines += [
        "Answer with JSON only: to call tools,",
        call,
        "or, to answer the user directly,",
        response,
    ]
    return "\n".join(lines)


def generic_messages(
    messages: list[dict[str, Any]], system: str | None = None
) -> list[dict[str, Any]]:
    """Messages any chat template takes (role and text): `system` added to (or as) the
    first system message, earlier calls written as the envelope, tool results as a user
    message (consecutive ones together), since not every template has a `tool` role."""
    rendered: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for message in messages:
        role = message.get("role")
        if role == "tool":
            result = _tool_result(message, names)
            if rendered and rendered[-1].get("_results"):
                rendered[-1]["content"] += "\n" + result
            else:
                rendered.append({"role": "user", "content": result, "_results": True})
            continue
        content = message.get("content") or ""
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            names |= {call.get("id", ""): _call_name(call) for call in calls}
            written = json.dumps({"tool_calls": [_call_entry(call) for call in calls]})
            content = f"{content}\n{written}" if content else written
        rendered.append({"role": role, "content": content})
    for message in rendered:
        message.pop("_results", None)
    if system is None:
        return rendered
    if rendered and rendered[0]["role"] == "system":
        rendered[0]["content"] = f"{rendered[0]['content']}\n\n{system}".lstrip()
        return rendered
    return [{"role": "system", "content": system}, *rendered]


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools itself: calls' arguments as objects
    (what Hugging Face templates expect), text content never None."""
    rendered = []
    for message in messages:
        entry = dict(message)
        entry["content"] = entry.get("content") or ""
        if entry.get("tool_calls"):
            entry["tool_calls"] = [_with_parsed_arguments(call) for call in entry["tool_calls"]]
        rendered.append(entry)
    return rendered


def _with_parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        function["arguments"] = parse_arguments(function["arguments"])
    return {**call, "function": function}


def _call_name(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    return str(function.get("name", ""))


def _call_entry(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments", "{}")
    parsed = parse_arguments(arguments) if isinstance(arguments, str) else arguments
    return {"name": function.get("name", ""), "arguments": parsed}


def _tool_result(message: dict[str, Any], names: dict[str, str]) -> str:
    # The call id only finds the tool's name: ids are random (`reader.call_id`), and written
    # into the prompt they would make a greedy answer after a tool call differ run to run.
    name = message.get("name") or names.get(message.get("tool_call_id") or "", "")
    result = {"name": name, "content": message.get("content") or ""}
    return json.dumps({"tool_response": result}, ensure_ascii=False)


def _invalid(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, code="invalid_value", param=param)
