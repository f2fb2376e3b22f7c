"""LangChain's `ChatOpenAI`: `with_structured_output` (JSON schema and function calling) and
`bind_tools` (whole and streamed), against both targets."""

from __future__ import annotations

import operator
from functools import reduce
from typing import Literal

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tests.clients.shared import (
    CITY_PROMPT,
    MAX_TOKENS,
    MODEL,
    WEATHER_PARAMETERS,
    WEATHER_QUESTION,
    WEATHER_TOOL,
    City,
    Target,
    schema_valid,
)


def chat_model(target: Target) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL,
        base_url=target.v1,
        api_key=SecretStr(target.api_key),
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
        max_retries=0,
        timeout=120,
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_is_the_pydantic_object(
    target: Target, method: Literal["json_schema", "function_calling"]
) -> None:
    structured = chat_model(target).with_structured_output(
        City, method=method, strict=True, include_raw=True
    )
    result = structured.invoke(CITY_PROMPT)
    assert isinstance(result, dict)
    assert result["parsing_error"] is None
    assert isinstance(result["parsed"], City)
    raw = result["raw"]
    assert isinstance(raw, AIMessage)
    # Named function calls and JSON schemas end as the model chose, never cut off.
    assert raw.response_metadata["finish_reason"] in ("stop", "tool_calls")


def test_bind_tools_calls_the_named_tool_with_valid_arguments(target: Target) -> None:
    with_tools = chat_model(target).bind_tools([dict(WEATHER_TOOL)], tool_choice="get_weather")
    reply = with_tools.invoke(WEATHER_QUESTION)
    assert isinstance(reply, AIMessage)
    assert reply.invalid_tool_calls == []
    [call] = reply.tool_calls
    assert call["name"] == "get_weather"
    assert call["id"]
    schema_valid(call["args"], WEATHER_PARAMETERS)


def test_bind_tools_streams_a_call_that_adds_up(target: Target) -> None:
    with_tools = chat_model(target).bind_tools([dict(WEATHER_TOOL)], tool_choice="required")
    chunks = list(with_tools.stream(WEATHER_QUESTION))
    assert len(chunks) > 2  # the arguments arrive in pieces
    message = reduce(operator.add, chunks)
    assert isinstance(message, AIMessageChunk)
    assert message.invalid_tool_calls == []
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    schema_valid(call["args"], WEATHER_PARAMETERS)
