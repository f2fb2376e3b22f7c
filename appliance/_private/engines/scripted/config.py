"""`engine = "scripted"`: a real in-process engine with scripted output, for tests and demos."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from appliance._private.engines.config import ModelConfigBase

Code = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class ScriptedModel(ModelConfigBase, tag="scripted", forbid_unknown_fields=True, kw_only=True):
    """Answers with `replies` (one per request, cycled; none: echoes the last user message
    or the prompt), a whitespace-separated word per token, `ttft_ms` before the first
    token and `token_ms` between tokens; `slots` run at once. `fail_after_tokens` ends
    every generation with an error (`fail_code`, 500) after that many tokens (0: before
    any text). The capability switches turn on deterministic n choices, log probabilities,
    tool calls, JSON output, and for completions echo and several prompts.
    `cached_tokens` is how many prompt tokens every answer reports as served from a
    prompt cache (at most the whole prompt), as an engine with a prompt cache does."""

    replies: list[str] = msgspec.field(default_factory=list)
    ttft_ms: Annotated[float, Meta(ge=0, le=600_000)] = 0.0
    token_ms: Annotated[float, Meta(ge=0, le=60_000)] = 0.0
    fail_after_tokens: Annotated[int, Meta(ge=0)] | None = None
    fail_code: Code = "engine_error"
    slots: Annotated[int, Meta(ge=1, le=100_000)] = 4
    embeddings: bool = False
    logprobs: bool = False
    n: bool = False
    tools: bool = False
    structured_output: bool = False
    echo: bool = False
    several_prompts: bool = False
    cached_tokens: Annotated[int, Meta(ge=0)] = 0
