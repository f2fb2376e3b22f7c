"""Wire schema of the OpenAI-compatible API: one msgspec Struct per message.

Requests forbid unknown fields so that a misspelt or unsupported parameter is answered
with a 400 naming it instead of being silently ignored. New fields go last with defaults;
a field never changes type.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
StopList = Annotated[list[str], Meta(max_length=16)]
# Text, token ids, or a list of either (msgspec allows one array type per union).
TextOrTokens = str | list[str | int | list[int]]


# --- requests -------------------------------------------------------------------------


class TextPart(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: str


class ImageUrlPart(Struct, tag="image_url", tag_field="type"):
    image_url: dict[str, Any]


class InputAudioPart(Struct, tag="input_audio", tag_field="type"):
    input_audio: dict[str, Any]


ContentPart = TextPart | ImageUrlPart | InputAudioPart
Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None
    # vLLM's extension: every streamed chunk carries the usage so far.
    continuous_usage_stats: bool = False


class ResponseFormat(Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingFields(Struct, kw_only=True):
    """Parameters shared by chat completions and completions."""

    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | StopList | None = None
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extensions, sent by benchmark clients (guidellm, benchmark_serving).
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    top_k: Annotated[int, Meta(ge=-1)] = -1  # -1 or 0: every token
    min_p: TopP = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0)] = 1.0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class ChatCompletionRequest(SamplingFields, forbid_unknown_fields=True, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class CompletionRequest(SamplingFields, forbid_unknown_fields=True, kw_only=True):
    prompt: TextOrTokens
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class EmbeddingRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    input: TextOrTokens
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


# --- responses ------------------------------------------------------------------------


class PromptTokensDetails(Struct):
    # Prompt tokens served from a prompt cache instead of being computed again.
    cached_tokens: int


def cached_count(details: object, prompt_tokens: int) -> int:
    """The cached prompt tokens in another server's `usage.prompt_tokens_details` (as
    decoded JSON, unchecked): 0 to `prompt_tokens`, and 0 when it says nothing usable."""
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if not isinstance(cached, int) or isinstance(cached, bool):
        return 0
    return min(max(cached, 0), prompt_tokens)


class ReportedUsage(Struct):
    """Another server's `usage` as a Palisade hop reads it (an appliance's for the router, an
    upstream's for the `openai` engine): the token counts, and the prompt tokens it served
    from its prompt cache, read leniently (an odd value there counts as none and never fails
    an answer). Embeddings report no completion tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: Any = None

    @property
    def cached_tokens(self) -> int:
        return cached_count(self.prompt_tokens_details, self.prompt_tokens)


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | msgspec.UnsetType = msgspec.UNSET


class AssistantMessage(Struct):
    content: str | None
    role: str = "assistant"
    # Left out of the JSON unless the model called tools (then `content` is usually null).
    tool_calls: list[dict[str, Any]] | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None  # {"content": [...]} when asked for


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class ChatDelta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # fragments: {"index", "id", "function"}


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None  # {"tokens", "token_logprobs", ...} when asked


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None


class EmbeddingData(Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Struct):
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
    object: str = "list"


class Pricing(Struct, forbid_unknown_fields=True):
    """Price per million tokens (and per request, for models without tokens), in `currency`.
    Prompt tokens served from a prompt cache cost `cached_input_per_million` (None: the
    input price)."""

    input_per_million: Annotated[float, Meta(ge=0.0)] = 0.0
    output_per_million: Annotated[float, Meta(ge=0.0)] = 0.0
    currency: str = "USD"
    per_request: Annotated[float, Meta(ge=0.0)] = 0.0
    cached_input_per_million: Annotated[float, Meta(ge=0.0)] | None = None

    def cost(
        self, input_tokens: int, output_tokens: int, requests: int = 1, cached: int = 0
    ) -> float:
        """What one answer costs, rounded to 1e-9 of the currency: `cached` of its
        `input_tokens` (at most all of them) at the cached-input price."""
        cached = min(max(cached, 0), input_tokens)
        cached_price = self.cached_input_per_million
        if cached_price is None:
            cached_price = self.input_per_million
        tokens = (
            (input_tokens - cached) * self.input_per_million
            + cached * cached_price
            + output_tokens * self.output_per_million
        )
        return round(tokens / 1e6 + requests * self.per_request, 9)


class Performance(Struct):
    ttft_p50_ms: float | None
    tpot_p50_ms: float | None


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str
    pricing: Pricing
    performance: Performance
    region: str
    device_class: str
    context_length: int
    object: str = "model"
    engine: str | None = None
    accelerator: str | None = None
    version: str | None = None
    sha256: str | None = None
    # What the model serves beyond plain generation: "embeddings", "logprobs", "n",
    # "tools", "structured_output", "logit_bias", "echo", "several_prompts" (completions),
    # "predict" (tensors in, tensors out). Through the router: what every node that
    # serves it (and is not down) serves.
    capabilities: list[str] = msgspec.field(default_factory=list)


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorDetail(Struct, omit_defaults=True):
    message: str
    type: str
    code: str
    param: str | None
    retry_after: int | None = None  # seconds, also sent as the Retry-After header


class ErrorResponse(Struct):
    error: ErrorDetail


ENCODER = msgspec.json.Encoder()
