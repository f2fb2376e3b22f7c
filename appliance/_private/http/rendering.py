"""Generations as OpenAI answers: SSE chunks, whole answers and error frames.

An engine's output reaches here as choice-0 text (`Generation.emit`, the hot path) or as
`ChoiceDelta`s (another choice, tool-call fragments, log probabilities, a per-choice
finish reason). Streams render each as a chunk of its choice; whole answers aggregate
them (`Aggregate`): text concatenated, tool calls merged by index with their arguments
concatenated, log-probability lists concatenated, each choice's own finish reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from litestar import MediaType, Request, Response
from litestar.types import Receive, Scope, Send

from appliance._private.engines.base import ChoiceDelta, Finish, Generation, engine_failure
from federation import (
    ENCODER,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ClientGoneError,
    ClosingStream,
    Completion,
    CompletionChoice,
    ErrorDetail,
    ErrorResponse,
    PromptTokensDetails,
    SamplingFields,
    Usage,
)

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Piece = str | list[str | ChoiceDelta]
Keep = Callable[[object], None]


class Reply:
    """Identity and headers shared by every piece of one response."""

    __slots__ = ("created", "headers", "id", "model", "on_close")

    def __init__(self, reply_id: str, model: str, headers: dict[str, str]) -> None:
        self.id = reply_id
        self.created = int(time.time())
        self.model = model
        self.headers = headers
        self.on_close: Callable[[], None] | None = None

    def json(self, payload: object) -> JsonAnswer:
        return JsonAnswer(ENCODER.encode(payload), self.headers)

    def stream(self, events: AsyncIterator[bytes]) -> ClosingStream:
        """`events` as SSE; `on_close` runs once the response is over, however it ended
        (the events may never have started, if the client left before the first byte)."""
        headers = self.headers | SSE_HEADERS
        return ClosingStream(
            events, on_close=self.on_close, media_type="text/event-stream", headers=headers
        )


class JsonAnswer:
    """A whole JSON answer (200) as a bare ASGI app: what Litestar's `Response` sends for it
    (the headers lower-cased, then the content type and length), without building one."""

    __slots__ = ("body", "headers")

    def __init__(self, body: bytes, headers: dict[str, str]) -> None:
        self.body = body
        self.headers = [
            *(
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in headers.items()
            ),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        del scope, receive
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def json_response(payload: object) -> Response[Any]:
    return Response(ENCODER.encode(payload), media_type=MediaType.JSON)


def sse(payload: object) -> bytes:
    return b"data: " + ENCODER.encode(payload) + b"\n\n"


# --- aggregation ------------------------------------------------------------------------


@dataclass
class ChoiceAnswer:
    """One choice of a whole answer, built from its pieces."""

    texts: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, delta: ChoiceDelta) -> None:
        if delta.text:
            self.texts.append(delta.text)
        for fragment in delta.tool_calls or ():
            self._merge_tool_call(fragment)
        if delta.logprobs is not None:
            self.logprobs = _merge_logprobs(self.logprobs, delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def _merge_tool_call(self, fragment: dict[str, Any]) -> None:
        index = int(fragment.get("index", len(self.tool_calls)))
        call = self.tool_calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}}
        )
        for key in ("id", "type"):
            if fragment.get(key) is not None:
                call[key] = fragment[key]
        function = fragment.get("function") or {}
        if function.get("name") is not None:
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += function.get("arguments") or ""

    def calls(self) -> list[dict[str, Any]]:
        """The merged tool calls, in index order, as `message.tool_calls`."""
        return [self.tool_calls[index] for index in sorted(self.tool_calls)]

    def reason(self, overall: str) -> str:
        """This choice's finish reason: its own, else "tool_calls" if it called tools,
        else the generation's."""
        if self.finish_reason is not None:
            return self.finish_reason
        return "tool_calls" if self.tool_calls and overall == "stop" else overall


class Aggregate:
    """A whole answer from a generation's pieces (plain text stays the cheap path)."""

    def __init__(self, choices: int = 1) -> None:
        self._choices: dict[int, ChoiceAnswer] = {index: ChoiceAnswer() for index in range(choices)}
        self.rich = False

    def add(self, piece: Piece) -> None:
        if isinstance(piece, str):
            self._choices[0].texts.append(piece)
            return
        self.rich = True
        for item in piece:
            if isinstance(item, str):
                self._choices[0].texts.append(item)
            else:
                self.choice(item.index).add(item)

    def choice(self, index: int) -> ChoiceAnswer:
        return self._choices.setdefault(index, ChoiceAnswer())

    def choices(self) -> list[tuple[int, ChoiceAnswer]]:
        return sorted(self._choices.items())

    def answer(self) -> object:
        """What a `full` content log keeps: the text, or every choice when there is more."""
        if not self.rich:
            return self._choices[0].text
        return [
            {"index": index, "text": choice.text, "tool_calls": choice.calls()}
            for index, choice in self.choices()
        ]

    def chat_choices(self, overall: str) -> list[ChatChoice]:
        return [
            ChatChoice(
                index,
                _message(choice),
                choice.reason(overall),
                choice.logprobs,
            )
            for index, choice in self.choices()
        ]

    def completion_choices(self, overall: str) -> list[CompletionChoice]:
        return [
            CompletionChoice(index, choice.text, choice.reason(overall), choice.logprobs)
            for index, choice in self.choices()
        ]


def _message(choice: ChoiceAnswer) -> AssistantMessage:
    if not choice.tool_calls:
        return AssistantMessage(content=choice.text)
    return AssistantMessage(content=choice.text or None, tool_calls=choice.calls())


def _merge_logprobs(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Log-probability objects of consecutive pieces: lists concatenated (`content`,
    `tokens`, `token_logprobs`, ...), anything else the newest."""
    if old is None:
        return dict(new)
    merged = dict(old)
    for key, value in new.items():
        before = merged.get(key)
        merged[key] = (
            before + value if isinstance(before, list) and isinstance(value, list) else value
        )
    return merged


def choice_count(generation: Generation) -> int:
    """n choices for each prompt (a completion may have several)."""
    features = generation.params.features
    n = features.n if features is not None else 1
    return n * (1 + len(generation.prompt.more))


async def collect(request: Request[Any, Any, Any], generation: Generation) -> Aggregate:
    """The whole answer; cancels the generation if the client disconnects first.

    The answer is read in the handler's own task; a second task waits for the client to
    leave and then cancels the handler's wait (one task a request, not two and a wait).
    """
    aggregate = Aggregate(choice_count(generation))
    reader = asyncio.current_task()
    assert reader is not None
    left = False

    async def watch() -> None:
        nonlocal left
        await _disconnected(request)
        left = True
        reader.cancel()

    hangup = asyncio.ensure_future(watch())
    try:
        async for piece in generation.pieces():  # left early: the generation is cancelled
            aggregate.add(piece)
    except asyncio.CancelledError:
        if not left:
            raise
        reader.uncancel()
        raise ClientGoneError from None
    finally:
        hangup.cancel()
    return aggregate


async def started(request: Request[Any, Any, Any], generation: Generation) -> None:
    """Wait for the first output before committing a 200: a generation that fails before
    producing any (say, its upstream refused it) is answered with its HTTP error instead."""
    first = asyncio.ensure_future(generation.wait_started())
    hangup = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((first, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
    if not first.done():
        first.cancel()
        generation.cancel()
        raise ClientGoneError
    finish = first.result()
    if finish is not None and finish.reason == "error":
        raise failure_of(finish)


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- outcomes and errors ----------------------------------------------------------------


def failure_of(finish: Finish | None) -> APIError:
    """The error a client sees for a generation that did not end well (error, cancelled,
    or no result at all)."""
    if finish is not None and finish.failure is not None:
        return finish.failure
    return engine_failure("no result")


def outcome(generation: Generation) -> tuple[Usage, str]:
    """The usage and the finish reason of a generation that ended well; raises its error
    otherwise."""
    finish = generation.finish
    if finish is None or finish.reason in ("error", "cancelled"):
        raise failure_of(finish)
    return usage_of(finish), finish.reason


def usage_of(finish: Finish) -> Usage:
    """A finished generation's usage, with the prompt tokens served from a cache (0 when
    none were, as OpenAI reports them)."""
    prompt, completion = finish.prompt_tokens, finish.completion_tokens
    details = PromptTokensDetails(min(finish.cached_tokens, prompt))
    return Usage(prompt, completion, prompt + completion, details)


def _spent(generation: Generation) -> Usage | None:
    """What a generation that failed part-way used (sent before its error event, so that
    whoever meters the stream, such as the router, bills it exactly)."""
    finish = generation.finish
    return usage_of(finish) if finish is not None else None


def error_frame(generation: Generation) -> bytes | None:
    """The SSE error event of a generation that failed (None if it did not)."""
    finish = generation.finish
    if finish is not None and finish.reason != "error":
        return None
    failure = failure_of(finish)
    error = ErrorDetail(failure.message, failure.error_type, failure.code, failure.param)
    return sse(ErrorResponse(error))


def usage_options(body: SamplingFields) -> tuple[bool, bool]:
    """Whether a stream ends with a usage chunk, and whether every chunk carries the usage
    so far (vLLM's `continuous_usage_stats`, which benchmark clients ask for)."""
    options = body.stream_options
    if options is None:
        return False, False
    return options.include_usage, options.continuous_usage_stats


def _usage_so_far(generation: Generation) -> Usage:
    """The prompt and the completion tokens behind the output streamed so far (the final
    count once the generation has ended)."""
    finish = generation.finish
    if finish is not None and finish.reason in ("stop", "length"):
        return outcome(generation)[0]
    prompt, completion = generation.prompt.total_size, generation.tokens_read
    return Usage(prompt, completion, prompt + completion)


# --- streams ----------------------------------------------------------------------------


def _chat_chunk_choices(piece: list[str | ChoiceDelta], ended: set[int]) -> list[ChatChunkChoice]:
    """One chunk choice per item of a rich piece; `ended` collects the choices whose
    finish reason came with them."""
    choices = []
    for item in piece:
        if isinstance(item, str):
            choices.append(ChatChunkChoice(0, ChatDelta(content=item)))
            continue
        if item.finish_reason is not None:
            ended.add(item.index)
        delta = ChatDelta(content=item.text or None, tool_calls=item.tool_calls)
        choices.append(ChatChunkChoice(item.index, delta, item.finish_reason, item.logprobs))
    return choices


def _completion_chunk_choices(
    piece: list[str | ChoiceDelta], ended: set[int]
) -> list[CompletionChoice]:
    choices = []
    for item in piece:
        if isinstance(item, str):
            choices.append(CompletionChoice(0, item))
            continue
        if item.finish_reason is not None:
            ended.add(item.index)
        choices.append(CompletionChoice(item.index, item.text, item.finish_reason, item.logprobs))
    return choices


@dataclass(frozen=True, slots=True)
class _Shape:
    """How one endpoint's stream chunks look: chat completions or completions."""

    chunk: Callable[[Reply, list[Any], Usage | None], object]  # the chunk Struct
    text: Callable[[str], Any]  # plain text of choice 0 as a chunk choice
    pieces: Callable[[list[str | ChoiceDelta], set[int]], list[Any]]  # rich pieces
    final: Callable[[int, str], Any]  # a choice's last chunk, with its finish reason
    opening: Callable[[int], Any] | None = None  # the first chunk of each choice


_CHAT = _Shape(
    chunk=lambda reply, choices, usage: ChatCompletionChunk(
        reply.id, reply.created, reply.model, choices, usage=usage
    ),
    text=lambda text: ChatChunkChoice(0, ChatDelta(content=text)),
    pieces=_chat_chunk_choices,
    final=lambda index, reason: ChatChunkChoice(index, ChatDelta(), reason),
    opening=lambda index: ChatChunkChoice(index, ChatDelta(role="assistant", content="")),
)
_COMPLETION = _Shape(
    chunk=lambda reply, choices, usage: Completion(
        reply.id, reply.created, reply.model, choices, usage=usage
    ),
    text=lambda text: CompletionChoice(0, text),
    pieces=_completion_chunk_choices,
    final=lambda index, reason: CompletionChoice(index, "", reason),
)


def chat_events(
    generation: Generation,
    reply: Reply,
    *,
    include_usage: bool,
    continuous: bool = False,
    keep: Keep | None = None,
) -> AsyncIterator[bytes]:
    return _events(_CHAT, generation, reply, include_usage, continuous, keep)


def completion_events(
    generation: Generation,
    reply: Reply,
    *,
    include_usage: bool,
    continuous: bool = False,
    keep: Keep | None = None,
) -> AsyncIterator[bytes]:
    return _events(_COMPLETION, generation, reply, include_usage, continuous, keep)


async def _events(  # noqa: PLR0917 - the two public wrappers name them
    shape: _Shape,
    generation: Generation,
    reply: Reply,
    include_usage: bool,
    continuous: bool,
    keep: Keep | None,
) -> AsyncIterator[bytes]:
    """A generation as SSE chunks: text as it comes, rich pieces per choice, then each
    choice's finish (or the error frame), the usage chunk if asked for, and [DONE]."""

    def chunk(choice: object) -> bytes:
        usage = _usage_so_far(generation) if continuous else None
        return sse(shape.chunk(reply, [choice], usage))

    choices = choice_count(generation)
    if shape.opening is not None:
        for index in range(choices):
            yield chunk(shape.opening(index))
    kept = Aggregate(choices) if keep is not None else None
    ended: set[int] = set()
    async for piece in generation.pieces():
        if kept is not None:
            kept.add(piece)
        if isinstance(piece, str):
            yield chunk(shape.text(piece))
            continue
        for choice in shape.pieces(piece, ended):
            yield chunk(choice)
    if keep is not None and kept is not None:
        keep(kept.answer())
    if (frame := error_frame(generation)) is not None:
        if include_usage and (spent := _spent(generation)) is not None:
            yield sse(shape.chunk(reply, [], spent))
        yield frame
        return
    usage, reason = outcome(generation)
    for index in range(choices):
        if index not in ended:
            yield chunk(shape.final(index, reason))
    if include_usage:
        yield sse(shape.chunk(reply, [], usage))
    yield DONE
