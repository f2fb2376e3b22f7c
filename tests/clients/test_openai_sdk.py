"""The `openai` SDK as applications use it: chat, streaming, tools (a streamed call and the
round trip back), JSON schema through `parse`, JSON mode, logprobs, n=2 and the model list's
capabilities, against both targets."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.clients.shared import (
    CITY_PROMPT,
    MAX_TOKENS,
    MODEL,
    WEATHER_PARAMETERS,
    WEATHER_QUESTION,
    WEATHER_TOOL,
    City,
    schema_valid,
)

GREETING: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


def test_chat_answers_and_counts_tokens(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL, messages=GREETING, max_tokens=16, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 16


def test_a_stream_says_what_the_answer_says(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(
        model=MODEL, messages=GREETING, max_tokens=16, temperature=0
    )
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=GREETING,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage


def test_a_streamed_tool_call_has_the_named_tool_and_valid_arguments(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": WEATHER_QUESTION}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for fragment in choice.delta.tool_calls or []:
                call = calls.setdefault(fragment.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or fragment.id
                if fragment.function is not None:
                    call["name"] += fragment.function.name or ""
                    call["arguments"] += fragment.function.arguments or ""
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "get_weather"
    schema_valid(json.loads(calls[0]["arguments"]), WEATHER_PARAMETERS)


def test_a_tool_result_goes_back_and_the_model_answers(sdk: openai.OpenAI) -> None:
    asked: list[ChatCompletionMessageParam] = [{"role": "user", "content": WEATHER_QUESTION}]
    called = sdk.chat.completions.create(
        model=MODEL,
        messages=asked,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    message = called.choices[0].message
    assert message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    schema_valid(json.loads(call.function.arguments), WEATHER_PARAMETERS)

    # Sent back as an application would: its own call, then the tool's result.
    called_back: ChatCompletionMessageParam = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
        ],
    }
    result: ChatCompletionMessageParam = {
        "role": "tool",
        "tool_call_id": call.id,
        "content": '{"temperature": 21, "sky": "clear"}',
    }
    answered = sdk.chat.completions.create(
        model=MODEL,
        messages=[*asked, called_back, result],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_tokens=16,
        temperature=0,
    )
    final = answered.choices[0]
    assert final.finish_reason in ("stop", "length")
    assert final.message.tool_calls is None
    assert final.message.content


def test_parse_returns_the_schema_s_object(sdk: openai.OpenAI) -> None:
    """The SDK's `parse` sends a strict JSON schema built from a pydantic model."""
    parsed = sdk.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": CITY_PROMPT}],
        response_format=City,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = parsed.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    schema_valid(json.loads(choice.message.content or ""), City.model_json_schema())


def test_json_mode_answers_one_json_object(sdk: openai.OpenAI) -> None:
    # A prompt the model can answer briefly: an open-ended one runs until max_tokens.
    asked = 'Reply with the JSON object {"city": "Paris"} and nothing else.'
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": asked}],
        response_format={"type": "json_object"},
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_logprobs_describe_the_tokens_chosen(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL, messages=GREETING, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None
    entries = choice.logprobs.content
    assert entries
    produced = b"".join(bytes(entry.bytes or []) for entry in entries)
    assert produced.decode() == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0
        ranked = [top.logprob for top in entry.top_logprobs]
        assert len(ranked) == 3
        assert ranked == sorted(ranked, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_n_2_returns_two_choices(sdk: openai.OpenAI) -> None:
    one = sdk.chat.completions.create(model=MODEL, messages=GREETING, max_tokens=12, temperature=0)
    two = sdk.chat.completions.create(
        model=MODEL, messages=GREETING, max_tokens=12, temperature=0, n=2
    )
    assert [choice.index for choice in two.choices] == [0, 1]
    # Greedy sampling: each sequence is exactly what one request alone gets.
    expected = one.choices[0].message.content
    assert [choice.message.content for choice in two.choices] == [expected, expected]
    assert two.usage is not None
    assert one.usage is not None
    assert two.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is read once
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens


def test_the_model_list_names_what_these_libraries_use(sdk: openai.OpenAI) -> None:
    [card] = [model for model in sdk.models.list() if model.id == MODEL]
    assert card.model_extra is not None
    capabilities = set(card.model_extra["capabilities"])
    assert {"tools", "structured_output", "logprobs", "n"} <= capabilities
