"""What every client-library case shares: where it sends requests, and the shapes it asks for.

The schemas are bounded (short strings, enums) so the 135M default model closes every JSON
value well within `MAX_TOKENS`: a case then fails only if the server's output is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jsonschema
import openai
from openai.types.chat import ChatCompletionFunctionToolParam
from pydantic import BaseModel, Field

from appliance import DEFAULT_MODEL_ID

MODEL = DEFAULT_MODEL_ID
MAX_TOKENS = 64
TargetName = Literal["appliance", "router"]


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible base URL and the key a client library is given for it."""

    name: TargetName
    v1: str
    api_key: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key=self.api_key, max_retries=0, timeout=120)


WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city's name", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
WEATHER_QUESTION = "What is the weather in Paris right now? Use the tool."


class City(BaseModel):
    """What the structured-output cases extract (pydantic, as the libraries take it)."""

    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    sunny: bool


CITY_PROMPT = "Paris is the capital of France, and it is sunny today. Describe the city as JSON."


def schema_valid(instance: object, schema: dict[str, Any]) -> None:
    """Fail with jsonschema's own message when `instance` does not validate."""
    jsonschema.validate(instance, schema)
