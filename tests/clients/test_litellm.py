"""LiteLLM's `completion` with tools, as `openai/<model>` at the target's base URL."""

from __future__ import annotations

import json
from typing import Any

import litellm
import pytest

from tests.clients.shared import (
    MAX_TOKENS,
    MODEL,
    WEATHER_PARAMETERS,
    WEATHER_QUESTION,
    WEATHER_TOOL,
    Target,
    schema_valid,
)

# On every call LiteLLM builds pydantic schemas of its own TypedDicts (its GitHub Copilot
# login), and pydantic warns about their `ReadOnly` items: LiteLLM's, nothing of ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Items? .* on TypedDict class .* (is|are) using the `ReadOnly` qualifier:UserWarning"
)


def ask_for_weather(target: Target, *, stream: bool) -> Any:
    return litellm.completion(
        model=f"openai/{MODEL}",
        api_base=target.v1,
        api_key=target.api_key,
        messages=[{"role": "user", "content": WEATHER_QUESTION}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=stream,
        num_retries=0,
        timeout=120,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_calls_the_named_tool_with_valid_arguments(target: Target, stream: bool) -> None:
    reply = ask_for_weather(target, stream=stream)
    if stream:
        reply = litellm.stream_chunk_builder(list(reply))
    message = reply.choices[0].message
    [call] = message.tool_calls
    assert call.function.name == "get_weather"
    assert call.id
    schema_valid(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    assert reply.usage.completion_tokens > 0
