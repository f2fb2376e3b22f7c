"""The OpenAI Agents SDK runs an agent that calls one function tool and answers from its
result, over chat completions (tracing off: nothing leaves the machine)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import httpx
import openai
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    RunConfig,
    Runner,
    RunResult,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
)
from pydantic import Field

from tests.clients.shared import MAX_TOKENS, MODEL, Target

WEATHER_REPORT = "Sunny, 21 degrees celsius."


async def run_weather_agent(
    target: Target, asked: list[str], sent: list[dict[str, Any]]
) -> RunResult:
    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=20)]) -> str:
        """Current weather in a city."""
        asked.append(city)
        return WEATHER_REPORT

    async def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [record]})
    async with openai.AsyncOpenAI(
        base_url=target.v1, api_key=target.api_key, max_retries=0, http_client=http
    ) as client:
        agent = Agent(
            name="weather",
            instructions="Answer questions about the weather with the get_weather tool.",
            model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
            # Forced on the first turn only: the SDK resets it once a tool ran.
            model_settings=ModelSettings(
                tool_choice="required", temperature=0, max_tokens=MAX_TOKENS
            ),
            tools=[get_weather],
        )
        return await Runner.run(
            agent,
            "What is the weather in Paris?",
            max_turns=4,
            run_config=RunConfig(tracing_disabled=True),
        )


def test_an_agent_calls_its_tool_and_answers_from_the_result(target: Target) -> None:
    asked: list[str] = []
    sent: list[dict[str, Any]] = []
    result = asyncio.run(run_weather_agent(target, asked, sent))

    assert asked  # the tool ran: its arguments validated against its schema
    assert all(len(city) <= 20 for city in asked)
    kinds = [type(item) for item in result.new_items]
    assert ToolCallItem in kinds
    assert ToolCallOutputItem in kinds
    assert isinstance(result.final_output, str)
    # The answer draws on the tool's result (even a 135M model repeats a short report).
    assert "21" in result.final_output
    # The turn after the call sent the tool's result back, under the call's id.
    calls = [m for m in sent[1]["messages"] if m["role"] == "assistant" and m.get("tool_calls")]
    results = [m for m in sent[1]["messages"] if m["role"] == "tool"]
    assert results[0]["content"] == WEATHER_REPORT
    assert results[0]["tool_call_id"] == calls[0]["tool_calls"][0]["id"]
