"""Translating OpenAI requests into engine work: validation, prompts and sampling."""

from __future__ import annotations

from typing import Any

import msgspec

from appliance._private.engines.base import Capabilities, Prompt, RequestFeatures, SamplingParams
from appliance._private.errors import ContextLengthExceededError, UnsupportedParameterError
from federation import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    InvalidRequestError,
    SamplingFields,
    TextPart,
)

_MAX_CHOICES = 128  # n, times the prompts of a completion
_MAX_TOP_LOGPROBS = 20
_MAX_BIAS = 100.0  # |logit_bias| values; -100 bans a token, +100 all but forces it
_MAX_BIASED_TOKENS = 1024
_MAX_ID_DIGITS = 12  # a longer key cannot be a token id (and int() of it would be costly)
_SHOWN_KEY = 32  # characters of a bad logit_bias key an error repeats


def check_sampling(request: SamplingFields, capabilities: Capabilities, model: str) -> None:
    if request.n < 1 or request.n > _MAX_CHOICES:
        raise InvalidRequestError(
            f"`n` is {request.n}; ask for 1 to {_MAX_CHOICES} choices.",
            code="invalid_value",
            param="n",
        )
    if request.n > 1 and not capabilities.n:
        raise UnsupportedParameterError(
            "n", f"`{model}` returns one choice per request; send n separate requests."
        )
    if request.logit_bias and not capabilities.logit_bias:
        raise UnsupportedParameterError("logit_bias", f"`{model}` does not apply logit bias.")
    if request.stream_options is not None and not request.stream:
        raise InvalidRequestError(
            "`stream_options` is only allowed when `stream` is true.",
            code="invalid_value",
            param="stream_options",
        )


def check_generates(capabilities: Capabilities, model: str) -> None:
    """Chat and completions need a model that generates text."""
    if not capabilities.generates:
        where = (
            f"POST /api/v1/models/{model}/predict"
            if capabilities.predict
            else "another model (see GET /v1/models)"
        )
        raise UnsupportedParameterError("model", f"`{model}` does not generate text; use {where}.")


def check_chat(request: ChatCompletionRequest, capabilities: Capabilities, model: str) -> None:
    """Refuse what this model cannot serve (400 unsupported_parameter naming the model)."""
    check_generates(capabilities, model)
    check_sampling(request, capabilities, model)
    if request.logprobs or request.top_logprobs is not None:
        _check_logprobs(request, capabilities, model)
    _check_tools(request, capabilities, model)
    if request.response_format is not None and request.response_format.type != "text":
        if not capabilities.structured_output:
            raise UnsupportedParameterError(
                "response_format",
                f"`{model}` does not do structured output; only {{'type': 'text'}} is supported.",
            )
        if (
            request.response_format.type == "json_schema"
            and not request.response_format.json_schema
        ):
            raise InvalidRequestError(
                "`response_format` of type json_schema needs its `json_schema`.",
                code="invalid_value",
                param="response_format.json_schema",
            )


def _check_logprobs(request: ChatCompletionRequest, capabilities: Capabilities, model: str) -> None:
    if not capabilities.logprobs:
        raise UnsupportedParameterError("logprobs", f"`{model}` does not return log probabilities.")
    top = request.top_logprobs
    if top is not None and not 0 <= top <= _MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"`top_logprobs` is {top}; it must be 0 to {_MAX_TOP_LOGPROBS}.",
            code="invalid_value",
            param="top_logprobs",
        )
    if top is not None and not request.logprobs:
        raise InvalidRequestError(
            "`top_logprobs` needs `logprobs` set to true.",
            code="invalid_value",
            param="top_logprobs",
        )


def _check_tools(request: ChatCompletionRequest, capabilities: Capabilities, model: str) -> None:
    if request.functions or request.function_call not in (None, "none"):
        name = "functions" if request.functions else "function_call"
        raise UnsupportedParameterError(
            name, "the deprecated function calling is not supported; use `tools`."
        )
    if capabilities.tools:
        return
    if request.tools:
        raise UnsupportedParameterError("tools", f"`{model}` does not call tools.")
    if request.tool_choice not in (None, "none"):
        raise UnsupportedParameterError("tool_choice", f"`{model}` does not call tools.")
    for index, message in enumerate(request.messages):
        if message.role == "tool" or message.tool_calls:
            raise UnsupportedParameterError(
                f"messages[{index}]",
                f"`{model}` does not call tools, so tool messages and tool calls cannot be "
                "sent to it.",
            )


def check_completion(request: CompletionRequest, capabilities: Capabilities, model: str) -> None:
    """Refuse what this model cannot serve (400 unsupported_parameter naming the model)."""
    check_generates(capabilities, model)
    check_sampling(request, capabilities, model)
    if request.echo and not capabilities.echo:
        raise UnsupportedParameterError("echo", f"`{model}` does not echo the prompt.")
    if request.suffix:
        raise UnsupportedParameterError("suffix", "insertion (suffix) is not supported.")
    if request.best_of not in (None, 1):
        raise UnsupportedParameterError("best_of", "only best_of=1 is supported.")
    if request.logprobs is not None:
        if not capabilities.logprobs:
            raise UnsupportedParameterError(
                "logprobs", f"`{model}` does not return log probabilities."
            )
        if not 0 <= request.logprobs <= _MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"`logprobs` is {request.logprobs}; it must be 0 to {_MAX_TOP_LOGPROBS}.",
                code="invalid_value",
                param="logprobs",
            )


def check_embedding(request: EmbeddingRequest, capabilities: Capabilities, model: str) -> None:
    if not capabilities.embeddings:
        raise InvalidRequestError(
            f"Embeddings are disabled for `{model}` (embeddings = false in the appliance "
            "config, or its engine serves none).",
            code="embeddings_disabled",
            param="model",
        )
    if request.dimensions is not None:
        raise UnsupportedParameterError(
            "dimensions", "this model returns its native embedding size only."
        )


def chat_features(request: ChatCompletionRequest) -> RequestFeatures | None:
    """What a chat request asks beyond sampling (None: nothing, the common case)."""
    response_format = request.response_format
    wanted = response_format is not None and response_format.type != "text"
    if not (request.n != 1 or request.logprobs or request.tools or wanted):
        return None
    return RequestFeatures(
        tools=request.tools,
        tool_choice=request.tool_choice,
        parallel_tool_calls=request.parallel_tool_calls,
        response_format=msgspec.to_builtins(response_format) if wanted else None,
        logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs,
        n=request.n,
    )


def completion_features(request: CompletionRequest) -> RequestFeatures | None:
    """What a completion request asks beyond sampling (None: nothing)."""
    if request.n == 1 and request.logprobs is None and not request.echo:
        return None
    return RequestFeatures(
        logprobs=request.logprobs is not None,
        top_logprobs=request.logprobs,
        n=request.n,
        echo=request.echo,
        endpoint="completion",
    )


def chat_messages(messages: list[ChatMessage], capabilities: Capabilities) -> list[dict[str, Any]]:
    """Messages for the engine: role and text content; with tools, also `tool_calls`,
    `tool_call_id` and `name` (tool messages included)."""
    if not capabilities.tools:
        return template_messages(messages)
    rendered = []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role}
        if message.content is not None or not message.tool_calls:
            entry["content"] = _text_of(message, index)
        else:
            entry["content"] = None
        extras = {
            "name": message.name,
            "tool_calls": message.tool_calls,
            "tool_call_id": message.tool_call_id,
        }
        entry |= {key: value for key, value in extras.items() if value is not None}
        rendered.append(entry)
    return rendered


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as a chat template without tools expects them: role and plain text."""
    rendered = []
    for index, message in enumerate(messages):
        if message.role == "tool" or message.tool_calls:
            raise UnsupportedParameterError(
                f"messages[{index}]", "tool messages and tool calls are not supported."
            )
        role = "system" if message.role == "developer" else message.role
        rendered.append({"role": role, "content": _text_of(message, index)})
    return rendered


def _text_of(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part_index, part in enumerate(content):
        if not isinstance(part, TextPart):
            raise UnsupportedParameterError(
                f"messages[{index}].content[{part_index}]",
                "only text content parts are supported by this model.",
            )
        texts.append(part.text)
    return "\n".join(texts)


def completion_prompts(
    request: CompletionRequest, capabilities: Capabilities, model: str
) -> list[tuple[str | list[int], str]]:
    """A completion's prompts (texts or token-id lists), each with its place in the request;
    several only for a model that serves them, and at most `_MAX_CHOICES` choices in all."""
    prompts = text_or_tokens(request.prompt, "prompt")
    if len(prompts) == 1:
        return prompts
    if not capabilities.several_prompts:
        raise UnsupportedParameterError(
            "prompt", f"`{model}` takes one prompt per request; send one request per prompt."
        )
    if len(prompts) * request.n > _MAX_CHOICES:
        raise InvalidRequestError(
            f"{len(prompts)} prompts with n = {request.n} make {len(prompts) * request.n} "
            f"choices; at most {_MAX_CHOICES} fit in one request. Split the prompts.",
            code="invalid_value",
            param="prompt",
        )
    return prompts


def text_or_tokens(
    value: str | list[str | int | list[int]], param: str
) -> list[tuple[str | list[int], str]]:
    """OpenAI's four input forms as texts or token-id lists, each with its place in the
    request (`input`, `input[2]`) for error messages; none may be empty."""
    if isinstance(value, str):
        return [(_not_empty(value, param), param)]
    if not value:
        raise InvalidRequestError(f"`{param}` is empty.", code="invalid_value", param=param)
    if all(isinstance(item, int) for item in value):
        return [([item for item in value if isinstance(item, int)], param)]
    items = [item for item in value if not isinstance(item, int)]
    if len(items) == len(value) and len({type(item) for item in items}) == 1:
        places = [f"{param}[{index}]" for index in range(len(items))]
        return [(_not_empty(item, place), place) for item, place in zip(items, places, strict=True)]
    raise InvalidRequestError(
        f"`{param}` mixes strings, token ids and token lists; use one form.",
        code="invalid_value",
        param=param,
    )


def _not_empty(item: str | list[int], param: str) -> str | list[int]:
    if not item:
        form = "an empty string" if isinstance(item, str) else "an empty list of token ids"
        raise InvalidRequestError(
            f"`{param}` is {form}; send some text or at least one token id.",
            code="invalid_value",
            param=param,
        )
    return item


def check_token_ids(tokens: list[int], param: str, vocabulary: int | None) -> None:
    """Every id must be in the model's vocabulary (0 <= id < `vocabulary`); with no
    vocabulary known (an upstream engine), at least not negative."""
    top = vocabulary if vocabulary is not None else float("inf")
    if not tokens or (min(tokens) >= 0 and max(tokens) < top):
        return
    index, token = next((i, t) for i, t in enumerate(tokens) if t < 0 or t >= top)
    where = (
        f"this model's vocabulary of {vocabulary} tokens (ids 0 to {vocabulary - 1})"
        if vocabulary is not None
        else "any vocabulary (token ids are never negative)"
    )
    raise InvalidRequestError(
        f"`{param}[{index}]` is {token}, outside {where}.",
        code="invalid_value",
        param=f"{param}[{index}]",
    )


def logit_bias(
    bias: dict[str, float] | None, vocabulary: int | None
) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs in id order: keys must be token ids (decimal
    strings) in this model's vocabulary when it is known (`vocabulary`), values -100 to 100.
    A bad entry is a 400 naming it (`logit_bias.<key>`)."""
    if not bias:
        return ()
    if len(bias) > _MAX_BIASED_TOKENS:
        raise InvalidRequestError(
            f"`logit_bias` has {len(bias)} entries; at most {_MAX_BIASED_TOKENS} are allowed.",
            code="invalid_value",
            param="logit_bias",
        )
    pairs: dict[int, float] = {}
    for key, value in bias.items():
        token = _biased_token(key, vocabulary)
        if token in pairs:
            raise InvalidRequestError(
                f"`logit_bias` names token {token} twice (as {key!r} and another key).",
                code="invalid_value",
                param=f"logit_bias.{token}",
            )
        if not -_MAX_BIAS <= value <= _MAX_BIAS:
            raise InvalidRequestError(
                f"`logit_bias.{key}` is {value}; a bias must be -100 to 100.",
                code="invalid_value",
                param=f"logit_bias.{key}",
            )
        pairs[token] = float(value)
    return tuple(sorted(pairs.items()))


def _biased_token(key: str, vocabulary: int | None) -> int:
    shown = key[:_SHOWN_KEY]
    if not (key.isascii() and key.isdigit() and len(key) <= _MAX_ID_DIGITS):
        raise InvalidRequestError(
            f"`logit_bias` key {shown!r} is not a token id; keys are token ids written as "
            'strings, such as "15339".',
            code="invalid_value",
            param=f"logit_bias.{shown}",
        )
    token = int(key)
    if vocabulary is not None and token >= vocabulary:
        raise InvalidRequestError(
            f"`logit_bias` key {key} is outside this model's vocabulary of {vocabulary} tokens "
            f"(ids 0 to {vocabulary - 1}).",
            code="invalid_value",
            param=f"logit_bias.{key}",
        )
    return token


def stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def sampling_params(
    request: SamplingFields,
    *,
    requested: int | None,
    prompt: Prompt,
    context_length: int,
    default: int | None = None,
    features: RequestFeatures | None = None,
    vocabulary: int | None = None,
    cache_scope: str = "",
) -> SamplingParams:
    """Sampling settings for `requested` max tokens (the client's, or None for `default`).

    A prompt this model tokenized is checked against the context window here, each of a
    completion's prompts on its own. An upstream engine's prompt is not: the upstream
    enforces its own window (its 400 passes through), `max_tokens` is forwarded only when
    the client gave one, and otherwise it is the declared `context_length`, an upper bound
    used for admission. `vocabulary` (a local engine's) bounds the ids of `logit_bias`.
    `cache_scope` is the caller's org: whose cached prompt prefixes the request may reuse.
    """
    prompts = (prompt, *prompt.more)
    if any(each.size == 0 for each in prompts):
        raise InvalidRequestError(
            "The prompt is empty after tokenization; send some text.",
            code="invalid_value",
            param="prompt",
        )
    if prompt.counted:
        wanted = requested if requested is not None else default
        max_tokens = min(
            _prompt_budget(wanted, each, index, len(prompts), context_length)
            for index, each in enumerate(prompts)
        )
    else:
        max_tokens = requested if requested is not None else context_length
    if request.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"`min_tokens` is {request.min_tokens}, more than the {max_tokens} tokens this "
            "request may generate (max_tokens); lower min_tokens.",
            code="invalid_value",
            param="min_tokens",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        stop=stop_sequences(request.stop),
        explicit_max_tokens=requested is not None,
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        top_k=max(request.top_k, 0),
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        logit_bias=logit_bias(request.logit_bias, vocabulary),
        features=features,
        cache_scope=cache_scope,
        whole=not request.stream,
    )


def _prompt_budget(
    requested: int | None, prompt: Prompt, index: int, prompts: int, context_length: int
) -> int:
    """`completion_budget` of one of a request's `prompts`, naming it when there are more."""
    try:
        return completion_budget(requested, prompt.size, context_length)
    except ContextLengthExceededError as exc:
        if prompts == 1:
            raise
        raise ContextLengthExceededError(
            f"prompt[{index}]: {exc.message}", param=f"prompt[{index}]"
        ) from exc


def admission_tokens(prompt: Prompt, params: SamplingParams) -> int:
    """The most tokens a generation may read and write: every prompt once, and
    `max_tokens` for each of its choices (n for each prompt)."""
    n = params.features.n if params.features is not None else 1
    return prompt.total_size + params.max_tokens * n * (1 + len(prompt.more))


def completion_budget(requested: int | None, prompt_tokens: int, context_length: int) -> int:
    if prompt_tokens >= context_length:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context_length} tokens, but the prompt "
            f"has {prompt_tokens} tokens. Shorten the messages or the prompt.",
            param="messages",
        )
    if requested is None:
        return context_length - prompt_tokens
    if prompt_tokens + requested > context_length:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context_length} tokens, but "
            f"{prompt_tokens + requested} were requested ({prompt_tokens} in the prompt, "
            f"{requested} for the completion). Lower max_tokens to at most "
            f"{context_length - prompt_tokens} or shorten the prompt.",
            param="max_tokens",
        )
    return requested
