"""instructor extracting a small pydantic model, by a forced tool call and by JSON schema,
with no retries: the first answer must already validate."""

from __future__ import annotations

import json

import instructor
import openai
import pytest

from tests.clients.shared import CITY_PROMPT, MAX_TOKENS, MODEL, City


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_extracts_a_valid_model_on_the_first_try(sdk: openai.OpenAI, mode: instructor.Mode) -> None:
    client = instructor.from_openai(sdk, mode=mode)
    city, completion = client.chat.completions.create_with_completion(
        model=MODEL,
        response_model=City,
        messages=[{"role": "user", "content": CITY_PROMPT}],
        max_retries=0,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert isinstance(city, City)
    message = completion.choices[0].message
    if mode is instructor.Mode.TOOLS:
        [call] = message.tool_calls
        assert call.function.name == "City"
        sent = call.function.arguments
    else:
        sent = message.content
    assert json.loads(sent) == city.model_dump()  # exactly what the server produced
