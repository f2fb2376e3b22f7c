"""The OpenAI endpoints: chat completions, completions, embeddings and the model list.

Routes know no engine by name: what a model serves is its engine's `Capabilities`, which
`inference` checks requests against; admission and accounting go through the node's
`Ledger`, rendering through `rendering`.

The generation routes call the authenticator themselves and answer a whole completion as a
bare ASGI answer (`rendering.JsonAnswer`): Litestar's dependency injection, signature
parsing and response conversion cost about a tenth of an upstream request's CPU.
"""

from __future__ import annotations

import array
import base64
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath
from litestar.types import ASGIApp

from appliance._private import inference
from appliance._private.engines.base import (
    Engine,
    Generation,
    Prompt,
    SamplingParams,
    Vocabulary,
)
from appliance._private.http import rendering
from appliance._private.http.rendering import Reply
from appliance._private.ledger import Ticket
from appliance._private.node import Node
from federation import (
    PROMPT_TOKENS_HEADER,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelList,
    Principal,
    ScopeHeaders,
    decode_request,
    read_body,
)

_CHAT_DECODER = msgspec.json.Decoder(ChatCompletionRequest)
_COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)
_EMBEDDING_DECODER = msgspec.json.Decoder(EmbeddingRequest)
# The inference endpoints, as labels of the request counter.
INFERENCE_PATHS = {
    path: path for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
}
# Who the caller is (keys, assertions, or the local principal), from the request.
Authenticator = Callable[[Request[Any, Any, Any]], Awaitable[Principal]]


def openai_routes(node: Node, authenticate: Authenticator) -> list[HTTPRouteHandler]:
    """The OpenAI endpoints; `authenticate` resolves the caller."""
    return [
        _chat_route(node, authenticate),
        _completion_route(node, authenticate),
        _embedding_route(node, authenticate),
        *_model_routes(node, Provide(authenticate)),
    ]


def _chat_route(node: Node, authenticate: Authenticator) -> HTTPRouteHandler:
    @post("/v1/chat/completions", status_code=200)
    async def chat_completions(request: Request[Any, Any, Any]) -> ASGIApp:
        principal = await authenticate(request)
        body = decode_request(await read_body(request), _CHAT_DECODER)
        served = node.model(body.model, principal)
        headers = ScopeHeaders(request)
        with node.ledger.holding(principal, served, "chatcmpl", headers=headers) as ticket:
            capabilities = served.engine.capabilities
            inference.check_chat(body, capabilities, served.id)
            messages = inference.chat_messages(body.messages, capabilities)
            features = inference.chat_features(body)
            prompt = await served.engine.prepare_chat(messages, features)
            params = inference.sampling_params(
                body,
                requested=body.max_completion_tokens or body.max_tokens,
                prompt=prompt,
                context_length=served.engine.context_length,
                features=features,
                vocabulary=_vocabulary(served.engine, body),
                cache_scope=principal.org,
            )
            generation, reply = await _start_generation(node, ticket, prompt, params)
        return await _respond(request, node, ticket, body, generation, reply)

    return chat_completions


def _completion_route(node: Node, authenticate: Authenticator) -> HTTPRouteHandler:
    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> ASGIApp:
        principal = await authenticate(request)
        body = decode_request(await read_body(request), _COMPLETION_DECODER)
        served = node.model(body.model, principal)
        headers = ScopeHeaders(request)
        with node.ledger.holding(principal, served, "cmpl", headers=headers) as ticket:
            capabilities = served.engine.capabilities
            inference.check_completion(body, capabilities, served.id)
            prompt = await _completion_prompt(served.engine, body, served.id)
            params = inference.sampling_params(
                body,
                requested=body.max_tokens,
                default=16,
                prompt=prompt,
                context_length=served.engine.context_length,
                features=inference.completion_features(body),
                vocabulary=_vocabulary(served.engine, body),
                cache_scope=principal.org,
            )
            generation, reply = await _start_generation(node, ticket, prompt, params)
        return await _respond(request, node, ticket, body, generation, reply)

    return completions


async def _completion_prompt(engine: Engine, body: CompletionRequest, model: str) -> Prompt:
    """The first prompt, carrying the others (`Prompt.more`) when there are several."""
    sources = inference.completion_prompts(body, engine.capabilities, model)
    prompts = [await engine.prepare_text(source, place) for source, place in sources]
    if len(prompts) == 1:
        return prompts[0]
    return dataclasses.replace(prompts[0], more=tuple(prompts[1:]))


def _vocabulary(engine: Engine, body: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many token ids the engine has (it tokenizes locally and says), when the request
    names token ids in `logit_bias`."""
    if not body.logit_bias or not isinstance(engine, Vocabulary):
        return None
    return engine.vocabulary_size


async def _respond(  # noqa: PLR0917 - one generation's whole context
    request: Request[Any, Any, Any],
    node: Node,
    ticket: Ticket,
    body: ChatCompletionRequest | CompletionRequest,
    generation: Generation,
    reply: Reply,
) -> ASGIApp:
    """A generation's answer: SSE events when streamed (committed after the first event
    when a failure before any text should be the HTTP status), else the whole answer."""
    chat = isinstance(body, ChatCompletionRequest)
    # The body as sent (Litestar keeps it after the first read): what `full` mode seals.
    keep = node.ledger.content_keeper(ticket.principal, reply.id, await read_body(request))
    if body.stream:
        if ticket.served.engine.capabilities.early_errors:
            await rendering.started(request, generation)
        usage, continuous = rendering.usage_options(body)
        events = rendering.chat_events if chat else rendering.completion_events
        stream = reply.stream(
            events(generation, reply, include_usage=usage, continuous=continuous, keep=keep)
        )
        return stream.to_asgi_response(None, request)
    answer = await rendering.collect(request, generation)
    if keep is not None:
        keep(answer.answer())
    total, reason = rendering.outcome(generation)
    model = ticket.served.id
    if chat:
        choices = answer.chat_choices(reason)
        return reply.json(ChatCompletion(reply.id, reply.created, model, choices, total))
    return reply.json(
        Completion(reply.id, reply.created, model, answer.completion_choices(reason), usage=total)
    )


async def _start_generation(
    node: Node, ticket: Ticket, prompt: Prompt, params: SamplingParams
) -> tuple[Generation, Reply]:
    """Admit (limits, budget) and submit; the ledger accounts for it when it ends, and a
    stream that closes before its end (the client left) cancels it."""
    await node.ledger.admit(ticket, inference.admission_tokens(prompt, params))
    generation = node.ledger.generate(ticket, prompt, params)
    headers = node.receipt(ticket.served) | {PROMPT_TOKENS_HEADER: str(prompt.total_size)}
    reply = Reply(ticket.record_id, ticket.served.id, headers | ticket.headers)
    reply.on_close = generation.cancel
    return generation, reply


def _embedding_route(node: Node, authenticate: Authenticator) -> HTTPRouteHandler:
    @post("/v1/embeddings", status_code=200)
    async def embeddings(request: Request[Any, Any, Any]) -> ASGIApp:
        principal = await authenticate(request)
        body = decode_request(await read_body(request), _EMBEDDING_DECODER)
        served = node.model(body.model, principal)
        with node.ledger.holding(
            principal, served, "emb", kind="embedding", headers=ScopeHeaders(request)
        ) as ticket:
            inference.check_embedding(body, served.engine.capabilities, served.id)
            inputs = inference.text_or_tokens(body.input, "input")
            texts = [
                item if isinstance(item, str) else served.engine.detokenize(item, place)
                for item, place in inputs
            ]
            # Byte-level tokenizers never make more tokens than bytes (+ BOS/EOS): a bound.
            await node.ledger.admit(ticket, sum(len(text.encode()) + 2 for text in texts))
        tokens, status = 0, "error"
        try:
            vectors, tokens = await served.engine.embed(texts)
            status = "ok"
        finally:
            node.ledger.finished(ticket, status, tokens, 0)
        data = [
            EmbeddingData(index, _encode_vector(vector, body.encoding_format))
            for index, vector in enumerate(vectors)
        ]
        response = EmbeddingResponse(data, served.id, EmbeddingUsage(tokens, tokens))
        return Reply(ticket.record_id, served.id, node.receipt(served) | ticket.headers).json(
            response
        )

    return embeddings


def _model_routes(node: Node, principal: Provide) -> list[HTTPRouteHandler]:
    region = node.config.region

    @get("/v1/models", dependencies={"principal": principal})
    async def list_models(principal: NamedDependency[Principal]) -> Response[Any]:
        del principal  # any authenticated caller may list models
        cards = [served.card(region) for served in node.models.all()]
        return rendering.json_response(ModelList(cards))

    @get("/v1/models/{model_id:path}", dependencies={"principal": principal})
    async def get_model(
        model_id: FromPath[str], principal: NamedDependency[Principal]
    ) -> Response[Any]:
        del principal
        return rendering.json_response(node.any_model(model_id.lstrip("/")).card(region))

    return [list_models, get_model]


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(array.array("f", vector).tobytes()).decode("ascii")
