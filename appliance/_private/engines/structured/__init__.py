"""Structured output and tools for engines that sample locally, whatever runs the model.

`plan_output` turns a request's `response_format` and tools into an `OutputPlan`: the
GBNF grammar every choice samples under (JSON Schema to grammar, for a checked subset)
and, per choice, an `OutputReader` that turns the generated text into OpenAI deltas
(content, or streamed `delta.tool_calls`). `prompt_messages` writes the conversation for
the chat template: the model's own tool rendering where its template has one, else the
generic JSON format that the grammar then enforces. Pure Python: an engine wires the
grammar into its sampler.
"""

from appliance._private.engines.structured.plan import OutputPlan, plan_output, prompt_messages
from appliance._private.engines.structured.reader import OutputReader, call_id
from appliance._private.engines.structured.schema import FORMATS, UNSUPPORTED

__all__ = [
    "FORMATS",
    "UNSUPPORTED",
    "OutputPlan",
    "OutputReader",
    "call_id",
    "plan_output",
    "prompt_messages",
]
