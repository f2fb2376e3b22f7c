"""A request's output plan: the grammar every choice samples under, and how its text is
read back (plain content, or tool calls), plus the prompt messages that go with it."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from appliance._private.engines.base import RequestFeatures
from appliance._private.engines.structured.grammar import Grammar
from appliance._private.engines.structured.reader import OutputReader, TextReader, ToolCallReader
from appliance._private.engines.structured.schema import schema_rule
from appliance._private.engines.structured.tools import (
    envelope_rule,
    generic_messages,
    instructions,
    read_tools,
    template_messages,
    tool_use,
)
from federation import InvalidRequestError

_CACHED_PLANS = 256  # agent loops resend the same tools and schema with every turn


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """`grammar`: GBNF (root rule `root`) for every choice; None: free text.
    `calls_tools`: the text is the tool envelope, which each choice's reader turns into
    tool calls or content; False: the text is the content as generated (an engine may
    emit it directly)."""

    grammar: str | None
    calls_tools: bool = False
    text_response: bool = True  # the envelope's "response" is a string (no response_format)

    def reader(self, index: int) -> OutputReader:
        """A reader for choice `index` (one per choice: each keeps its own state)."""
        if self.calls_tools:
            return ToolCallReader(index, text_response=self.text_response)
        return TextReader(index)


def plan_output(features: RequestFeatures | None, *, template_tools: bool) -> OutputPlan | None:
    """The plan for a request's `response_format` and tools; None when nothing constrains
    or interprets the output. A schema outside the supported subset is a 400
    `unsupported_schema` naming the keyword; malformed tools or `tool_choice` a 400
    `invalid_value`. `template_tools` changes only the prompt (see `prompt_messages`):
    calls are read from the generic envelope for every model."""
    del template_tools
    if features is None or not (features.tools or _constrains(features.response_format)):
        if features is not None and features.tool_choice not in (None, "none", "auto"):
            tool_use((), features.tool_choice, features.parallel_tool_calls)  # refuses it
        return None
    key = json.dumps(
        [
            features.response_format,
            features.tools,
            features.tool_choice,
            features.parallel_tool_calls,
        ],
        ensure_ascii=False,
    )
    return _PLANS.get(key, features)


def prompt_messages(
    messages: list[dict[str, Any]], features: RequestFeatures | None, *, template_tools: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages to template, and extra keyword arguments for the chat template.

    `template_tools` (the model's template renders tools): messages keep their calls
    and tool results, and the template gets `tools`. Otherwise the generic format: a
    system message lists the tools and the JSON answer expected, earlier calls are
    written as that JSON and tool results as user text.
    """
    functions = read_tools(features.tools if features else None)
    use = (
        tool_use(functions, features.tool_choice, features.parallel_tool_calls)
        if features
        else None
    )
    if template_tools:
        extra = {"tools": features.tools} if use is not None and features else {}
        return template_messages(messages), extra
    response_schema = _response_schema(features.response_format) if features else None
    system = instructions(use, response_schema) if use is not None else None
    return generic_messages(messages, system), {}


def _build(features: RequestFeatures) -> OutputPlan | None:
    grammar = Grammar()
    response = _response_rule(grammar, features.response_format)
    use = tool_use(read_tools(features.tools), features.tool_choice, features.parallel_tool_calls)
    if use is None:
        return None if response is None else OutputPlan(grammar.text(response))
    root = envelope_rule(grammar, use, response)
    return OutputPlan(grammar.text(root), calls_tools=True, text_response=response is None)


def _constrains(response_format: dict[str, Any] | None) -> bool:
    return response_format is not None and response_format.get("type") != "text"


def _response_rule(grammar: Grammar, response_format: dict[str, Any] | None) -> str | None:
    """The expression for `response_format` (None: free text)."""
    if not _constrains(response_format):
        return None
    assert response_format is not None
    kind = response_format.get("type")
    if kind == "json_object":
        return grammar.primitive("object")
    if kind != "json_schema":
        raise InvalidRequestError(
            "`response_format.type` is 'text', 'json_object' or 'json_schema'.",
            code="invalid_value",
            param="response_format.type",
        )
    wrapper = response_format.get("json_schema")
    if not isinstance(wrapper, dict):
        raise InvalidRequestError(
            "`response_format.json_schema` must be an object with the `schema`.",
            code="invalid_value",
            param="response_format.json_schema",
        )
    schema = wrapper.get("schema")
    if schema is None:  # OpenAI's schema is optional: any JSON object then
        return grammar.primitive("object")
    return schema_rule(grammar, schema, "response_format.json_schema.schema", "response-value")


def _response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The schema a tool-envelope "response" must follow, for the prompt."""
    if not _constrains(response_format):
        return None
    assert response_format is not None
    wrapper = response_format.get("json_schema")
    schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
    return schema if isinstance(schema, dict) else {"type": "object"}


class _PlanCache:
    """Plans by the request's canonical JSON, least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._plans: OrderedDict[str, OutputPlan | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, features: RequestFeatures) -> OutputPlan | None:
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
        plan = _build(features)  # raises for a bad request: errors are not cached
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self._size:
                self._plans.popitem(last=False)
        return plan


_PLANS = _PlanCache(_CACHED_PLANS)
