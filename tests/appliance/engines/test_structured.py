"""Structured output and tools, engine-agnostic: schema checks (400 naming the feature),
the grammars (checked by llama.cpp's own grammar engine, token by token, with only the
model's vocabulary loaded), the prompt messages, and reading streamed tool calls."""

from __future__ import annotations

import ctypes
import datetime
import enum
import json
import math
import random
import re
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import llama_cpp
import pytest
from openai import pydantic_function_tool
from pydantic import BaseModel, Field

from appliance._private.engines.base import ChoiceDelta, RequestFeatures
from appliance._private.engines.structured import OutputPlan, plan_output, prompt_messages
from appliance._private.engines.structured.grammar import integer_range, number_range
from appliance._private.engines.structured.tools import MAX_PARALLEL_CALLS
from appliance._private.http.rendering import ChoiceAnswer
from federation import InvalidRequestError
from tests.support import default_model_path

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Now."}}


def schema_format(schema: dict[str, Any]) -> RequestFeatures:
    return RequestFeatures(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )


def plan_for(features: RequestFeatures) -> OutputPlan:
    plan = plan_output(features, template_tools=False)
    assert plan is not None
    return plan


def refusal(features: RequestFeatures) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        plan_output(features, template_tools=False)
    return caught.value


# --- schema checks: 400 naming the feature ----------------------------------------------

ROOT = "response_format.json_schema.schema"


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        (
            {"type": "object", "properties": {"when": {"type": "string", "format": "email"}}},
            f"{ROOT}.properties.when.format",
        ),
        ({"type": "string", "pattern": "(?=a)b"}, f"{ROOT}.pattern"),
        ({"type": "string", "pattern": r"(a)\1"}, f"{ROOT}.pattern"),
        ({"type": "string", "pattern": r"a\b"}, f"{ROOT}.pattern"),
        ({"type": "string", "pattern": "a^b"}, f"{ROOT}.pattern"),
        ({"type": "string", "pattern": "[a"}, f"{ROOT}.pattern"),
        ({"type": "string", "pattern": "a{2,1}"}, f"{ROOT}.pattern"),
        ({"type": "string", "pattern": "(?i)a"}, f"{ROOT}.pattern"),
        ({"type": "string", "pattern": "a", "maxLength": 3}, f"{ROOT}.maxLength"),
        ({"type": "string", "pattern": "a", "format": "date"}, f"{ROOT}.pattern"),
        (
            {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
            f"{ROOT}.uniqueItems",
        ),
        ({"type": "array", "prefixItems": [{"type": "integer"}]}, f"{ROOT}.prefixItems"),
        ({"type": "array", "items": [{"type": "integer"}]}, f"{ROOT}.items"),
        ({"type": "number", "minimum": 0.5}, f"{ROOT}.minimum"),
        ({"type": "number", "exclusiveMaximum": 1}, f"{ROOT}.exclusiveMaximum"),
        ({"type": "number", "minimum": 2, "maximum": 1}, f"{ROOT}.maximum"),
        ({"type": "integer", "multipleOf": 2}, f"{ROOT}.multipleOf"),
        ({"type": "object", "minProperties": 1}, f"{ROOT}.minProperties"),
        ({"not": {"type": "string"}}, f"{ROOT}.not"),
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, f"{ROOT}.allOf"),
        ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, f"{ROOT}.oneOf"),
        ({"oneOf": [{"enum": ["a", "b"]}, {"const": "b"}]}, f"{ROOT}.oneOf"),
        ({"$ref": "https://example.com/schema.json"}, f"{ROOT}.$ref"),
        ({"$ref": "#/$defs/missing"}, f"{ROOT}.$ref"),
        ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, f"{ROOT}.$defs.a.$ref"),
        ({"type": "string", "enum": ["a"], "maxLength": 3}, f"{ROOT}.maxLength"),
        ({"type": "integer", "enum": ["a", "b"]}, f"{ROOT}.type"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, f"{ROOT}.maximum"),
        ({"type": "string", "minLength": 5, "maxLength": 4}, f"{ROOT}.maxLength"),
        ({"type": "string", "format": "date", "maxLength": 4}, f"{ROOT}.maxLength"),
        ({"type": "strin"}, f"{ROOT}.type"),
        (
            {"type": "object", "required": ["a"], "additionalProperties": False},
            f"{ROOT}.required",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "integer"}}, "$ref": "#"},
            f"{ROOT}.type",
        ),
        (
            {"type": "object", "additionalProperties": {"type": "string", "format": "uri"}},
            f"{ROOT}.additionalProperties.format",
        ),
        (
            {"$defs": {"t": {"type": "string", "format": "uri"}}, "$ref": "#/$defs/t"},
            f"{ROOT}.$defs.t.format",
        ),
        ({"anyOf": []}, f"{ROOT}.anyOf"),
        (False, ROOT),
    ],
)
def test_a_schema_outside_the_subset_is_refused_naming_the_keyword(schema: Any, param: str) -> None:
    error = refusal(schema_format(schema))
    assert (error.status_code, error.code, error.param) == (400, "unsupported_schema", param)
    assert error.message


def test_a_tool_parameter_outside_the_subset_is_refused_naming_its_path() -> None:
    bad = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string", "format": "x"}},
            },
        },
    }
    error = refusal(RequestFeatures(tools=[WEATHER, bad]))
    assert (error.code, error.param) == (
        "unsupported_schema",
        "tools[1].function.parameters.properties.q.format",
    )


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([{"type": "function"}], "auto", "tools[0].function"),
        ([{"type": "retrieval", "function": {"name": "a"}}], "auto", "tools[0]"),
        ([{"type": "function", "function": {"name": "a b"}}], "auto", "tools[0].function.name"),
        ([WEATHER, WEATHER], "auto", "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "a", "parameters": []}}],
            "auto",
            "tools[0].function.parameters",
        ),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], {"type": "function"}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
        (None, {"type": "function", "function": {"name": "get_weather"}}, "tool_choice"),
    ],
)
def test_malformed_tools_or_tool_choice_are_invalid_values(
    tools: list[dict[str, Any]] | None, choice: Any, param: str
) -> None:
    error = refusal(RequestFeatures(tools=tools, tool_choice=choice))
    assert (error.status_code, error.code, error.param) == (400, "invalid_value", param)


def test_nothing_to_constrain_is_no_plan() -> None:
    assert plan_output(None, template_tools=False) is None
    assert plan_output(RequestFeatures(n=3, logprobs=True), template_tools=False) is None
    assert (
        plan_output(RequestFeatures(response_format={"type": "text"}), template_tools=False) is None
    )
    none = RequestFeatures(tools=[WEATHER], tool_choice="none")
    assert plan_output(none, template_tools=False) is None


def test_plans_are_cached_by_the_request_fields() -> None:
    first = plan_for(RequestFeatures(tools=[WEATHER], tool_choice="required"))
    again = plan_for(
        RequestFeatures(tools=[json.loads(json.dumps(WEATHER))], tool_choice="required")
    )
    other = plan_for(RequestFeatures(tools=[WEATHER], tool_choice="auto"))
    assert again is first
    assert other is not first
    assert other.grammar != first.grammar


# --- grammars: what llama.cpp's grammar engine accepts ----------------------------------


class GrammarEngine:
    """llama.cpp's grammar sampler over the default model's vocabulary (no weights)."""

    def __init__(self) -> None:
        self.llm = llama_cpp.Llama(str(default_model_path()), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.eos = self.llm.token_eos()

    def parses(self, gbnf: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    def accepts(self, gbnf: str, text: str) -> bool:
        """Whether the grammar lets the model write exactly `text` and then end."""
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        assert sampler, gbnf
        try:
            for token in self.llm.tokenize(text.encode(), add_bos=False, special=False):
                if not self._allowed(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, self.eos)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    @staticmethod
    def _allowed(sampler: Any, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)()
        data[0] = llama_cpp.llama_token_data(id=token, logit=0.0, p=0.0)
        candidates = llama_cpp.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return math.isfinite(data[0].logit)


@pytest.fixture(scope="module")
def engine() -> GrammarEngine:
    return GrammarEngine()


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "maxItems": 2},
        "born": {"type": "string", "format": "date"},
        "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pet"}]},
    },
    "required": ["name", "age"],
    "$defs": {
        "pet": {
            "type": "object",
            "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
            "required": ["kind"],
        }
    },
}
TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["value"],
        }
    },
    "$ref": "#/$defs/node",
}
SHAPE = {
    "oneOf": [
        {
            "type": "object",
            "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
            "required": ["kind", "r"],
        },
        {
            "type": "object",
            "properties": {"kind": {"const": "square"}, "side": {"type": "number"}},
            "required": ["kind", "side"],
        },
        {"type": "string", "maxLength": 3},
    ]
}
TIMES = {
    "type": "object",
    "properties": {
        "at": {"type": "string", "format": "date-time"},
        "id": {"type": "string", "format": "uuid"},
        "clock": {"type": "string", "format": "time"},
    },
    "required": ["at", "id", "clock"],
}


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        (
            PERSON,
            [
                '{"name": "Ada", "age": 36}',
                '{"name":"Ada","age":130,"tags":["a", 3],"born":"1815-12-10","pet":null}',
                '{ "name": "B\\n\\u00e9", "age": 0, "pet": {"kind": "cat", "lives": 9} }',
                '{"name": "Ada", "age": 1, "born": "2024-02-28"}',
            ],
            [
                '{"age": 36, "name": "Ada"}',  # declared order only
                '{"name": "Ada"}',  # required age missing
                '{"name": "", "age": 3}',  # minLength
                '{"name": "Adalovelace", "age": 3}',  # maxLength
                '{"name": "Ada", "age": 131}',  # maximum
                '{"name": "Ada", "age": -1}',
                '{"name": "Ada", "age": 1, "tags": ["a", "b", 3]}',  # maxItems
                '{"name": "Ada", "age": 1, "tags": ["c"]}',  # enum
                '{"name": "Ada", "age": 1, "born": "2023-02-29"}',  # no February 29th
                '{"name": "Ada", "age": 1, "born": "2023-04-31"}',
                '{"name": "Ada", "age": 1, "extra": 1}',  # never additional members
                '{"name": "A\\ud83d", "age": 1}',  # a surrogate escape
                '{"name": "Ada", "age": 36}  ',  # nothing after the value
                '{"name":  "Ada", "age": 36}',  # at most one space
            ],
        ),
        (
            TREE,
            ['{"value": 1}', '{"value": 1, "children": [{"value": 2, "children": []}]}'],
            ['{"value": 1, "children": [{}]}', '{"children": []}'],
        ),
        (
            SHAPE,
            ['{"kind": "circle", "r": 1.5}', '{"kind": "square", "side": -2}', '"abc"'],
            ['{"kind": "square", "r": 1}', '"abcd"', "1e5"],
        ),
        (
            TIMES,
            [
                '{"at": "2024-01-31T23:59:59.123Z", "id": "123e4567-e89b-12d3-a456-426614174000",'
                ' "clock": "08:30:00+02:00"}'
            ],
            [
                '{"at": "2024-01-31 23:59:59Z", "id": "123e4567-e89b-12d3-a456-426614174000",'
                ' "clock": "08:30:00Z"}',
                '{"at": "2024-01-31T23:59:59Z", "id": "123e4567e89b12d3a456426614174000",'
                ' "clock": "08:30:00Z"}',
                '{"at": "2024-01-31T23:59:59Z", "id": "123e4567-e89b-12d3-a456-426614174000",'
                ' "clock": "24:00:00Z"}',
            ],
        ),
        (
            {"type": "object", "additionalProperties": {"type": "boolean"}},
            ['{"a": true, "b": false}', "{}"],
            ['{"a": 1}'],
        ),
        (
            {"type": ["integer", "null"], "minimum": -20, "exclusiveMaximum": 10},
            ["-20", "9", "0", "null"],
            ["10", "-21", "1.5", "007"],
        ),
        ({"type": "number"}, ["-0.5", "12", "3.141592653589793"], ["1.", ".5", "1e3", "+1"]),
        (
            {"type": "number", "minimum": 0, "maximum": 1},
            ["0", "0.25", "1", "1.000"],
            ["1.5", "-0.1", "1.01", "2"],
        ),
    ],
)
def test_the_grammar_accepts_exactly_documents_of_the_schema(
    engine: GrammarEngine, schema: dict[str, Any], good: list[str], bad: list[str]
) -> None:
    plan = plan_for(schema_format(schema))
    assert plan.grammar is not None
    assert engine.parses(plan.grammar)
    for text in good:
        assert engine.accepts(plan.grammar, text), text
    for text in bad:
        assert not engine.accepts(plan.grammar, text), text


# pattern -> (JSON text between the quotes the grammar accepts, and text it refuses)
PATTERNS = {
    r"^[A-Z]{2}-[0-9]{3}$": (["AB-123"], ["ab-123", "AB-1234", "AB123"]),
    r"^\d{3}(\.\d+)?$": (["123", "123.45"], ["12", "123."]),
    r"a+b*": (["a", "aab", "abbb"], ["b", ""]),
    r'^say "hi"|no$': ([r"say \"hi\"", "no"], ['say "hi"', "sayno"]),
    r"^[^a-c]x$": (["dx", "Zx"], ["ax", r"\"x", r"\\x"]),
    r"^(?:ab|cd){1,2}\.?$": (["ab", "abcd", "cd."], ["abc", "ababab"]),
    r"^\w+@\w+\.(com|org)$": (["me@site.com", "a_1@b.org"], ["me@site.net"]),
    r'^["\\]$': ([r"\"", r"\\"], ['"', "a"]),
    r"^.{2}$": (["ab", "é!"], ["a", "abc", r"\n1"]),
    r"^(a|)b$": (["ab", "b"], ["aab"]),
}


@pytest.mark.parametrize(("pattern", "cases"), PATTERNS.items())
def test_a_pattern_is_written_whole_and_escaped_as_json_needs(
    engine: GrammarEngine, pattern: str, cases: tuple[list[str], list[str]]
) -> None:
    good, bad = cases
    grammar = plan_for(schema_format({"type": "string", "pattern": pattern})).grammar
    assert grammar is not None
    for text in good:
        assert engine.accepts(grammar, f'"{text}"'), text
        assert re.search(pattern, json.loads(f'"{text}"')), text
    for text in bad:
        assert not engine.accepts(grammar, f'"{text}"'), text


def test_json_mode_accepts_any_object_and_nothing_else(engine: GrammarEngine) -> None:
    grammar = plan_for(RequestFeatures(response_format={"type": "json_object"})).grammar
    assert grammar is not None
    assert engine.accepts(grammar, '{"a": [1, {"b": null}], "c": "d"}')
    assert engine.accepts(grammar, "{}")
    assert not engine.accepts(grammar, "[1]")
    assert not engine.accepts(grammar, "Sure! {}")


def test_the_tool_envelope_grammar_follows_tool_choice(engine: GrammarEngine) -> None:
    call = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]}'
    two = call.replace("]}", ', {"name": "get_time", "arguments": {}}]}')
    answer = '{"response": "Hello"}'
    auto = plan_for(RequestFeatures(tools=[WEATHER, TIME])).grammar
    required = plan_for(RequestFeatures(tools=[WEATHER, TIME], tool_choice="required")).grammar
    parallel = plan_for(RequestFeatures(tools=[WEATHER, TIME], parallel_tool_calls=True)).grammar
    named = plan_for(
        RequestFeatures(
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            parallel_tool_calls=True,
        )
    ).grammar
    assert auto
    assert required
    assert parallel
    assert named
    assert engine.accepts(auto, call)
    assert engine.accepts(auto, answer)
    assert not engine.accepts(auto, two)  # one call unless parallel_tool_calls is true
    assert not engine.accepts(auto, call.replace('"days": 2', '"days": 8'))  # its schema
    assert not engine.accepts(auto, call.replace("get_weather", "get_wether"))
    assert engine.accepts(required, call)
    assert not engine.accepts(required, answer)
    assert engine.accepts(parallel, two)
    many = ", ".join(['{"name": "get_time", "arguments": {}}'] * (MAX_PARALLEL_CALLS + 1))
    assert not engine.accepts(parallel, '{"tool_calls": [' + many + "]}")
    assert engine.accepts(named, '{"tool_calls": [{"name": "get_time", "arguments": {}}]}')
    assert not engine.accepts(named, call)
    assert not engine.accepts(named, two)


def test_a_response_format_next_to_tools_shapes_the_response(engine: GrammarEngine) -> None:
    features = RequestFeatures(
        tools=[WEATHER],
        response_format={"type": "json_schema", "json_schema": {"schema": {"enum": [1, 2]}}},
    )
    grammar = plan_for(features).grammar
    assert grammar is not None
    assert engine.accepts(grammar, '{"response": 2}')
    assert not engine.accepts(grammar, '{"response": "2"}')


def test_grammar_rules_are_shared_so_repeated_shapes_stay_small() -> None:
    item = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    schema = {"type": "object", "properties": {f"p{i}": item for i in range(40)}}
    grammar = plan_for(schema_format(schema)).grammar
    assert grammar is not None
    assert grammar.count('"\\"a\\"" ws ":" ws integer') == 1
    assert len(grammar.splitlines()) < 200


def integer_regex(expression: str) -> re.Pattern[str]:
    """The GBNF digit patterns of `integer_range` as a Python regex."""
    text = expression.replace("(", "(?:")
    text = re.sub(r'"([^"]*)"', lambda match: re.escape(match.group(1)), text)
    return re.compile(text.replace(" ", ""))


@pytest.mark.parametrize(
    ("least", "most"),
    [(0, 0), (-3, 120), (1, 7), (-1000, -17), (99, 1001), (5, None), (None, -5), (-9, 9)],
)
def test_integer_ranges_match_exactly_their_numbers(least: int | None, most: int | None) -> None:
    pattern = integer_regex(integer_range(least, most))
    low = -2000 if least is None else least
    high = 2000 if most is None else most
    for number in range(low - 150, high + 150):
        inside = (least is None or number >= least) and (most is None or number <= most)
        assert bool(pattern.fullmatch(str(number))) == inside, number
    assert not pattern.fullmatch("-0" if (least or 0) > 0 else "01")


@pytest.mark.parametrize(
    ("least", "most"), [(0, 1), (-1, 1), (-5, -2), (0, None), (None, 0), (3, None), (-10, 250)]
)
def test_number_ranges_match_exactly_their_numbers(least: int | None, most: int | None) -> None:
    pattern = integer_regex(number_range(least, most))
    chooser = random.Random(least)
    low, high = (-300 if least is None else least), (300 if most is None else most)
    texts = [
        f"{whole}{fraction}"
        for whole in range(low - 3, high + 3)
        for fraction in ("", ".0", ".5", ".000")
    ]
    texts += [f"{chooser.uniform(low - 2, high + 2):.{chooser.randint(1, 6)}f}" for _ in range(500)]
    texts += [text.replace("-", "-0", 1) for text in texts[:5]] + ["-0.0", "1.", ".5", "01"]
    for text in texts:
        well_formed = re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", text) is not None
        value = float(text) if well_formed else None
        inside = (
            value is not None
            and (least is None or value >= least)
            and (most is None or value <= most)
        )
        # "-0.0" is zero, but the grammar writes no minus sign where nothing is negative.
        unsigned = least is not None and least >= 0 and text.startswith("-")
        assert bool(pattern.fullmatch(text)) == (inside and not unsigned), text


def test_random_integer_ranges() -> None:
    chooser = random.Random(15)
    for _ in range(40):
        least = chooser.randint(-(10**6), 10**6)
        most = least + chooser.randint(0, 10**6)
        pattern = integer_regex(integer_range(least, most))
        for number in (least, most, least - 1, most + 1, chooser.randint(least, most)):
            assert bool(pattern.fullmatch(str(number))) == (least <= number <= most)


# --- prompt messages --------------------------------------------------------------------

HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]


def test_generic_messages_describe_the_tools_and_write_calls_and_results_as_json() -> None:
    features = RequestFeatures(tools=[WEATHER, TIME])
    messages, extra = prompt_messages(HISTORY, features, template_tools=False)
    assert extra == {}
    assert [message["role"] for message in messages] == ["system", "user", "assistant", "user"]
    assert all(set(message) == {"role", "content"} for message in messages)
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in system
    assert '"maxLength": 20' in system  # the parameters schema
    assert '{"response":' in system
    assert json.loads(messages[2]["content"]) == {
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Oslo"}},
            {"name": "get_time", "arguments": {}},
        ]
    }
    results = [json.loads(line) for line in messages[3]["content"].splitlines()]
    assert results == [
        {"tool_response": {"name": "get_weather", "content": "Sunny"}},
        {"tool_response": {"name": "get_time", "content": "12:00"}},
    ]
    # Call ids are random: the prompt (so a greedy answer) must not depend on them.
    renamed = json.loads(json.dumps(HISTORY).replace('"call_', '"call_x7Qz'))
    assert prompt_messages(renamed, features, template_tools=False)[0] == messages


def test_required_and_named_choices_ask_only_for_calls() -> None:
    named = RequestFeatures(
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}
    )
    messages, _ = prompt_messages(HISTORY[1:2], named, template_tools=False)
    system = messages[0]["content"]
    assert messages[0]["role"] == "system"
    assert "Call the tool get_time" in system
    assert "get_weather" not in system
    assert '{"response"' not in system


def test_tool_choice_none_lists_no_tools_but_still_writes_the_history() -> None:
    messages, extra = prompt_messages(
        HISTORY, RequestFeatures(tools=[WEATHER], tool_choice="none"), template_tools=False
    )
    assert extra == {}
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert "tool_calls" in messages[2]["content"]
    plain, _ = prompt_messages(HISTORY[:2], None, template_tools=False)
    assert plain == HISTORY[:2]


def test_a_template_with_tools_gets_them_and_the_calls_as_objects() -> None:
    messages, extra = prompt_messages(
        HISTORY, RequestFeatures(tools=[WEATHER]), template_tools=True
    )
    assert extra == {"tools": [WEATHER]}
    assert messages[2]["content"] == ""
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[3] == HISTORY[3]
    assert HISTORY[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'  # untouched
    _, none = prompt_messages(
        HISTORY, RequestFeatures(tools=[WEATHER], tool_choice="none"), template_tools=True
    )
    assert none == {}


# --- readers: streamed text to deltas ---------------------------------------------------


def pieces(text: str, chooser: random.Random) -> Iterator[str]:
    position = 0
    while position < len(text):
        size = chooser.randint(1, 6)
        yield text[position : position + size]
        position += size


def read(plan: OutputPlan, text: str, reason: str = "stop", seed: int = 0) -> list[ChoiceDelta]:
    reader = plan.reader(3)
    deltas = [delta for piece in pieces(text, random.Random(seed)) for delta in reader.feed(piece)]
    return deltas + reader.end(reason)


def answer_of(deltas: list[ChoiceDelta]) -> ChoiceAnswer:
    """The deltas as the HTTP layer aggregates them into a whole answer."""
    answer = ChoiceAnswer()
    for delta in deltas:
        assert delta.index == 3
        answer.add(delta)
    return answer


TWO_CALLS = (
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "O\\"slo}", "days": 2}}, '
    '{"name": "get_time", "arguments": {}}]}'
)


@pytest.mark.parametrize("seed", range(12))
def test_streamed_tool_calls_come_out_as_openai_fragments(seed: int) -> None:
    plan = plan_for(RequestFeatures(tools=[WEATHER, TIME], parallel_tool_calls=True))
    deltas = read(plan, TWO_CALLS, seed=seed)
    assert all(not delta.text for delta in deltas)
    starts = [
        fragment for delta in deltas for fragment in delta.tool_calls or () if "id" in fragment
    ]
    assert [(start["index"], start["type"], start["function"]) for start in starts] == [
        (0, "function", {"name": "get_weather", "arguments": ""}),
        (1, "function", {"name": "get_time", "arguments": ""}),
    ]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", start["id"]) for start in starts)
    assert starts[0]["id"] != starts[1]["id"]
    answer = answer_of(deltas)
    calls = answer.calls()
    assert [json.loads(call["function"]["arguments"]) for call in calls] == [
        {"city": 'O"slo}', "days": 2},
        {},
    ]
    assert deltas[-1].finish_reason == "tool_calls"
    assert answer.reason("stop") == "tool_calls"


def test_argument_text_streams_before_the_call_is_complete() -> None:
    plan = plan_for(RequestFeatures(tools=[WEATHER], tool_choice="required"))
    reader = plan.reader(0)
    assert reader.feed('{"tool_calls": [{"name": "get_weather", "argu') == []
    started = reader.feed('ments": {"ci')
    assert started[0].tool_calls is not None
    assert started[0].tool_calls[0]["function"]["name"] == "get_weather"
    assert started[-1].tool_calls == [{"index": 0, "function": {"arguments": '{"ci'}}]


@pytest.mark.parametrize("seed", range(8))
def test_a_response_string_is_content_decoded_as_it_streams(seed: int) -> None:
    plan = plan_for(RequestFeatures(tools=[WEATHER]))
    text = 'Sunny "mostly" \\ \n\u00e9\U0001f600 {"x": 1}'
    deltas = read(plan, json.dumps({"response": text}), seed=seed)
    answer = answer_of(deltas)
    assert answer.text == text
    assert not answer.tool_calls
    assert deltas[-1].finish_reason == "stop"


def test_a_shaped_response_is_its_json_text() -> None:
    features = RequestFeatures(tools=[WEATHER], response_format={"type": "json_object"})
    answer = answer_of(read(plan_for(features), '{"response": {"a": [1, "}"]}}'))
    assert json.loads(answer.text) == {"a": [1, "}"]}
    scalar = RequestFeatures(
        tools=[WEATHER],
        response_format={"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}},
    )
    assert answer_of(read(plan_for(scalar), '{"response": 42}')).text == "42"


def test_text_off_the_envelope_passes_through_as_content() -> None:
    plan = plan_for(RequestFeatures(tools=[WEATHER]))
    for text in ("Hello there, no JSON.", '{"answer": 1}', '{"tool_calls": 5}'):
        answer = answer_of(read(plan, text))
        assert answer.text == text
        assert not answer.tool_calls
        assert answer.finish_reason == "stop"


def test_a_call_cut_short_keeps_its_text_and_the_length_reason() -> None:
    plan = plan_for(RequestFeatures(tools=[WEATHER], tool_choice="required"))
    deltas = read(
        plan, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Os', "length"
    )
    answer = answer_of(deltas)
    assert answer.calls()[0]["function"]["arguments"] == '{"city": "Os'
    assert deltas[-1].finish_reason == "length"


def test_a_schema_plan_passes_text_through() -> None:
    plan = plan_for(schema_format(PERSON))
    assert not plan.calls_tools
    answer = answer_of(read(plan, '{"name": "Ada", "age": 3}'))
    assert answer.text == '{"name": "Ada", "age": 3}'
    assert answer.finish_reason == "stop"


# --- schemas as client libraries write them -----------------------------------------------


class Address(BaseModel):
    street: str
    zip: str | None = None


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Person(BaseModel):
    name: str = Field(description="Full name.", max_length=30)
    age: int = Field(ge=0, le=150)
    color: Color
    born: datetime.date
    seen: datetime.datetime
    id: uuid.UUID
    tags: list[str] = Field(default_factory=list, max_length=3)
    address: Address
    pet: Cat | Dog = Field(discriminator="kind")
    other_pet: Cat | Dog | None = None
    score: float
    counts: dict[str, int]


class Node(BaseModel):
    value: int
    children: list[Node] = []


PEOPLE = [
    Person(
        name="Ada",
        age=36,
        color=Color.BLUE,
        born=datetime.date(1815, 12, 10),
        seen=datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.UTC),
        id=uuid.UUID("123e4567-e89b-12d3-a456-426614174000"),
        tags=["math"],
        address=Address(street="St James's Square"),
        pet=Dog(kind="dog", good=True),
        score=0.5,
        counts={"a": 1, "b": -2},
    ),
    Node(value=1, children=[Node(value=2), Node(value=3, children=[Node(value=4)])]),
]


@pytest.mark.parametrize("instance", PEOPLE, ids=lambda instance: type(instance).__name__)
@pytest.mark.parametrize("strict", [False, True], ids=["pydantic", "openai-strict"])
def test_schemas_of_pydantic_models_are_served_and_their_json_is_accepted(
    engine: GrammarEngine, instance: BaseModel, strict: bool
) -> None:
    model = type(instance)
    # As `client.beta.chat.completions.parse` and instructor send them, strict or not.
    strict_schema = pydantic_function_tool(model)["function"].get("parameters", {})
    schema = strict_schema if strict else model.model_json_schema()
    grammar = plan_for(schema_format(schema)).grammar
    assert grammar is not None
    assert engine.accepts(grammar, instance.model_dump_json())
    assert not engine.accepts(grammar, instance.model_dump_json()[:-1])
