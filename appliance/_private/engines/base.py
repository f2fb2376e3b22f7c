"""The seam between the HTTP layer and whatever runs a model.

The HTTP layer asks the engine to prepare a `Prompt` (token ids for an engine with its own
tokenizer, the messages or text themselves for an upstream engine), builds
`SamplingParams`, calls `Engine.submit`, and reads text from the returned `Generation`.
How generations are scheduled (one at a time, batched, or forwarded to an
OpenAI-compatible server) is the engine's business.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from federation import APIError

if TYPE_CHECKING:
    from numpy.typing import NDArray

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one engine (as configured) can do; request validation reads it, so the HTTP
    layer refuses what this model cannot serve and never names an engine.

    `tokenizes_locally`: prompts arrive as token ids (`Prompt.tokens`), the context window
    is checked here and token-id inputs can be turned back into text. `early_errors`: a
    generation can fail before its first text with an error the client should get as the
    HTTP status, so streaming handlers wait for the first event before the 200.
    """

    tokenizes_locally: bool
    early_errors: bool
    generates: bool = True  # chat completions and completions
    embeddings: bool = False
    logprobs: bool = False
    n: bool = False  # more than one choice per request
    tools: bool = False  # tools, tool_choice, tool messages
    structured_output: bool = False  # response_format json_object / json_schema
    logit_bias: bool = False  # `logit_bias` (token id -> bias) is applied
    echo: bool = False  # completions: `echo` (the prompt, with its logprobs if asked for)
    several_prompts: bool = False  # completions: a list of prompts in one request
    predict: bool = False  # tensors in, tensors out (POST /api/v1/models/{id}/predict)
    # Where it runs, as reported in /v1/models, the heartbeat and X-Palisade-Device
    # details: "cpu", "cuda:0", an ONNX execution provider, "gpu-offload:32-layers".
    accelerator: str = "cpu"


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """The OpenAI request fields beyond sampling, for engines whose capabilities include
    them; an OpenAI-speaking engine forwards them verbatim."""

    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # chat: 0-20 alternatives; completions: `logprobs`
    n: int = 1
    echo: bool = False  # completions: each choice starts with its prompt (and its logprobs)
    # Which endpoint asked: the shape of `ChoiceDelta.logprobs` (chat's `{"content": [...]}`
    # or completions' `tokens`/`token_logprobs`/`top_logprobs`/`text_offset`).
    endpoint: Literal["chat", "completion"] = "chat"


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """Rich output for one choice: what a plain `emit(text)` cannot carry (a choice other
    than 0, tool-call fragments, log probabilities, a per-choice finish reason). Fields are
    OpenAI's own shapes, so the HTTP layer renders them without interpreting them."""

    index: int = 0
    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None  # `delta.tool_calls` fragments
    logprobs: dict[str, Any] | None = None  # the choice's `logprobs` object for this piece
    finish_reason: str | None = None  # "stop", "length", "tool_calls", "content_filter"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    # False when the client gave no limit: `max_tokens` is then the appliance's own bound
    # (for admission), and an upstream engine lets the upstream apply its default.
    explicit_max_tokens: bool = True
    # vLLM's extensions (benchmark clients send them); the defaults change nothing.
    ignore_eos: bool = False  # end-of-generation tokens do not end the generation
    min_tokens: int = 0  # end-of-generation tokens cannot be sampled before this many
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True  # False: control tokens are written as text
    include_stop_str_in_output: bool = False
    # Token id -> bias added to its logit (-100 to 100; -100 bans it), for engines whose
    # capabilities include `logit_bias` (ids checked against the vocabulary beforehand).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # n, logprobs, tools, response_format: only for engines whose Capabilities say so.
    features: RequestFeatures | None = None
    # Whose prompt cache this request may read and fill: the caller's org ("" when it has
    # none). An engine with a prompt cache shares cached prefixes only within one scope
    # (another org's cached prompt would show through timing); other engines ignore it.
    cache_scope: str = ""
    # The client takes the answer whole (not streamed): an engine may produce it in one
    # piece (an upstream engine asks its upstream for a whole answer too).
    whole: bool = False


@dataclass(frozen=True, slots=True)
class Prompt:
    """What to continue, as the engine wants it, and how big it is for admission.

    A local engine tokenizes: `tokens` holds the ids and `size` is their count. An upstream
    engine has no tokenizer: it forwards `messages` (chat) or `text` (completion: a string
    or token ids), and `size` is an upper bound on the tokens (UTF-8 bytes plus template
    overhead: byte-level tokenizers never make more tokens than bytes). `len()` is `size`.
    """

    size: int
    tokens: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    text: str | list[int] | None = None
    # A completion's further prompts (engines whose capabilities include `several_prompts`):
    # choice `p * n + i` is the i-th choice of prompt p, this one being prompt 0. `size` is
    # this prompt's own; `total_size` counts them all.
    more: tuple[Prompt, ...] = ()

    def __len__(self) -> int:
        return self.size

    @property
    def total_size(self) -> int:
        return self.size + sum(other.size for other in self.more)

    @property
    def counted(self) -> bool:
        """True when `size` is this model's exact token count (so limits apply locally)."""
        return self.tokens is not None


@dataclass(frozen=True, slots=True)
class Finish:
    """How a generation ended. `failure` (reason "error") is the error the client gets, an
    `APIError` chosen by the engine without knowing HTTP: an upstream's refusal keeps its
    4xx, a broken upstream is a 502, a local engine's own failure `engine_failure(...)`."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    failure: APIError | None = None
    # Prompt tokens served from a prompt cache instead of being computed (part of
    # `prompt_tokens`): reported as `usage.prompt_tokens_details.cached_tokens`.
    cached_tokens: int = 0


def engine_failure(what: str) -> APIError:
    """A local engine's own failure while generating (500 engine_error)."""
    return APIError(f"The engine failed while generating: {what}.", code="engine_error")


class Generation:
    """One admitted request. The engine feeds it from its own thread; the loop reads it.

    Deltas queue up in a deque and the loop is woken only when it is waiting, so a busy
    loop takes several tokens in one go instead of paying a wake-up per token.
    """

    __slots__ = (
        "_cancelled",
        "_delivered",
        "_first_taken",
        "_lock",
        "_loop",
        "_on_cancel",
        "_on_done",
        "_owner",
        "_pending",
        "_posted_tokens",
        "_rich",
        "_waiter",
        "finish",
        "first_token_at",
        "params",
        "prompt",
        "started_at",
        "submitted_at",
        "tokens_read",
    )

    def __init__(
        self,
        prompt: Prompt,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
        on_done: Callable[[Finish], None] | None = None,
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.finish: Finish | None = None
        self.submitted_at = time.perf_counter()
        # When it left its engine's queue (took a slot, a place in flight): `mark_started`.
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self._loop = loop
        self._owner = _thread_running(loop)
        self._lock = threading.Lock()
        self._pending: deque[str | ChoiceDelta | Finish] = deque()
        self._rich = False  # an emit_delta happened: readers get pieces, not joined text
        self._waiter: asyncio.Future[None] | None = None
        # Held until the reader has taken the first text (a lock is cheaper to make than an
        # Event, and every request makes one).
        self._delivered = threading.Lock()
        self._delivered.acquire()
        self._first_taken = False
        self._cancelled = False
        self._on_cancel: Callable[[Generation], None] | None = None
        self._on_done = on_done
        self._posted_tokens = 0
        # Completion tokens behind the text the reader has taken so far (for usage in
        # every streamed chunk: `stream_options.continuous_usage_stats`).
        self.tokens_read = 0

    # --- engine side (any thread) ------------------------------------------------------

    def mark_started(self) -> None:
        """It left the engine's queue: its wait ends here (the `queue` span), its prefill
        begins."""
        self.started_at = time.perf_counter()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def emit(self, text: str, wakes: WakeBatch | None = None, tokens: int | None = None) -> None:
        """Queue `text` for the reader; with `wakes`, its wake-up waits for `wakes.flush()`.

        `tokens` is how many completion tokens the engine has produced up to this text.
        """
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._post(text, wakes, tokens)

    def emit_delta(
        self, delta: ChoiceDelta, wakes: WakeBatch | None = None, tokens: int | None = None
    ) -> None:
        """Queue rich output (another choice, tool-call fragments, log probabilities, a
        per-choice finish reason); plain choice-0 text goes through `emit`."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._rich = True
        self._post(delta, wakes, tokens)

    def close(self, finish: Finish) -> None:
        """The end, exactly once: `on_done` runs on the loop, and the reader sees `finish`.

        `on_done` is queued first, so it has run before anything the reader does after
        seeing the end (such as completing the response) can reach another request.
        """
        if self._on_done is not None:
            try:
                self._call_soon(self._on_done, finish)
            except RuntimeError:
                self._cancelled = True  # the loop is gone; so is whoever wanted to know
        self._post(finish)

    def wait_delivered(self, timeout: float) -> None:
        """Block until the consumer has taken the first text (or `timeout` passes).

        Called once, after the first token: letting the event loop write it before the
        engine's threads take both cores for the next step keeps time-to-first-token low.
        """
        if self._delivered.acquire(timeout=timeout):
            self._delivered.release()

    def _taken(self) -> None:
        """The reader has taken the first text (or left): `wait_delivered` returns."""
        if not self._first_taken:
            self._first_taken = True
            self._delivered.release()

    def _call_soon(self, callback: Callable[[Any], None], argument: Any) -> None:
        """`callback(argument)` on the loop; from the loop's own thread (an engine that runs
        on it) without the thread-safe wake-up, a system call."""
        if threading.get_ident() == self._owner:
            self._loop.call_soon(callback, argument)
        else:
            self._loop.call_soon_threadsafe(callback, argument)

    def _post(
        self,
        event: str | ChoiceDelta | Finish,
        wakes: WakeBatch | None = None,
        tokens: int | None = None,
    ) -> None:
        with self._lock:
            self._pending.append(event)
            if tokens is not None:
                self._posted_tokens = tokens
            waiter, self._waiter = self._waiter, None
        if waiter is None:
            return
        if wakes is not None:
            wakes.add(self, waiter)
            return
        try:
            self._call_soon(_wake, waiter)
        except RuntimeError:
            self._cancelled = True  # the loop is gone: nobody is listening any more

    # --- consumer side (event loop) ----------------------------------------------------

    def on_cancel(self, callback: Callable[[Generation], None]) -> None:
        self._on_cancel = callback

    def cancel(self) -> None:
        """Stop generating: the engine notices before its next decode step."""
        if self._cancelled or self.finish is not None:
            return
        self._cancelled = True
        if self._on_cancel is not None:
            self._on_cancel(self)

    async def pieces(self) -> AsyncIterator[str | list[str | ChoiceDelta]]:
        """Yield output until the engine finishes: choice-0 text joined into one string, or,
        once the engine has emitted a `ChoiceDelta`, the list of what came (strings being
        choice-0 text); leaving early cancels the generation."""
        try:
            while self.finish is None:
                piece = await self._take()
                if piece:
                    yield piece
                    self._taken()
        finally:
            self._taken()
            if self.finish is None:
                self.cancel()

    async def stream(self) -> AsyncIterator[str]:
        """Yield choice-0 text until the engine finishes; leaving early cancels it."""
        async for piece in self.pieces():
            if isinstance(piece, str):
                yield piece
                continue
            text = "".join(
                item if isinstance(item, str) else item.text
                for item in piece
                if isinstance(item, str) or item.index == 0
            )
            if text:
                yield text

    async def wait_started(self) -> Finish | None:
        """Wait for the first text or the end, taking nothing; the `Finish` if it ended first.

        A handler awaits this before committing a 200, so a generation that fails before
        producing any text becomes an HTTP error rather than an error inside a stream.
        """
        while True:
            with self._lock:
                if self._pending:
                    first = self._pending[0]
                    return first if isinstance(first, Finish) else None
                if self.finish is not None:
                    return None  # already being read: it has started
                waiter = self._waiter = self._loop.create_future()
            await waiter

    async def _take(self) -> str | list[str | ChoiceDelta]:
        """Everything the engine has produced since the last call, waiting if none."""
        while True:
            with self._lock:
                if self._pending:
                    events = list(self._pending)
                    self._pending.clear()
                    self.tokens_read = self._posted_tokens
                    break
                waiter = self._waiter = self._loop.create_future()
            await waiter
        last = events[-1]
        if isinstance(last, Finish):
            self.finish = last
            events.pop()
        if self._rich:
            return [event for event in events if not isinstance(event, Finish)]
        return "".join(event for event in events if isinstance(event, str))

    async def text(self) -> str:
        return "".join([delta async for delta in self.stream()])


def _thread_running(loop: asyncio.AbstractEventLoop) -> int | None:
    """This thread's id if it runs `loop` (the usual case: a generation is made where it
    is submitted, on the loop), else None."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return threading.get_ident() if running is loop else None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wake_all(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        _wake(waiter)


class WakeBatch:
    """Readers to wake together, with one call into their event loop.

    An engine stepping many generations at once collects their wake-ups and flushes them
    just before its next decode (or before it idles): one wake-up instead of one per token,
    and the loop then runs while the decode holds no interpreter lock instead of taking it
    from the engine thread half-way through its bookkeeping.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[tuple[Generation, asyncio.Future[None]]] = []

    def add(self, generation: Generation, waiter: asyncio.Future[None]) -> None:
        self._pending.append((generation, waiter))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        by_loop: dict[asyncio.AbstractEventLoop, list[Generation]] = {}
        waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for generation, waiter in pending:
            by_loop.setdefault(generation._loop, []).append(generation)
            waiters.setdefault(generation._loop, []).append(waiter)
        for loop, generations in by_loop.items():
            try:
                loop.call_soon_threadsafe(_wake_all, waiters[loop])
            except RuntimeError:
                for generation in generations:
                    generation._cancelled = True  # the loop is gone: nobody listens


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What an engine is doing right now, for metrics, `Retry-After` and the router."""

    running: int
    waiting: int
    slots: int


@dataclass(slots=True)
class StepStats:
    """What one decode step of a batching engine did (handed to `EngineContext.on_step`,
    exported as Prometheus metrics)."""

    sequences: int
    prefill_tokens: int
    decode_tokens: int
    seconds: float
    kv_cells_in_use: int
    kv_cells_cached: int
    reused_tokens: int = 0
    # The prompt cache (both tiers: KV kept in slots and the host pool). Counts since the
    # previous step: lookups (one per prompt read), prompt tokens served from the cache,
    # prompt tokens looked up, host-pool blocks evicted; gauges: the pool's bytes, its budget.
    cache_lookups: int = 0
    cache_hit_tokens: int = 0
    cache_query_tokens: int = 0
    cache_evicted_blocks: int = 0
    cache_bytes: int = 0
    cache_capacity_bytes: int = 0


class Engine(Protocol):
    """What the HTTP layer needs from a model runtime."""

    @property
    def ready(self) -> bool: ...

    @property
    def context_length(self) -> int: ...

    @property
    def capabilities(self) -> Capabilities:
        """What this engine (as configured) serves; request validation reads it."""

    def load(self) -> None:
        """Load weights (or check the upstream); blocking, called off the event loop before
        `ready` turns true. Raises `ModelLoadError` with the fix in its message."""

    def close(self) -> None:
        """Stop: called off the event loop (in a thread) at shutdown."""

    async def prepare_chat(
        self, messages: list[dict[str, Any]], features: RequestFeatures | None = None
    ) -> Prompt:
        """The prompt for these messages (templated and tokenized by a local engine): role
        and text content, plus `tool_calls`, `tool_call_id` and `name` for an engine whose
        capabilities include tools. `features` are the request's (its `tools` shape the
        prompt of a local engine); a feature the engine cannot serve as asked (a JSON
        schema outside what it enforces) is refused here, as a 400 naming it."""

    async def prepare_text(self, source: str | list[int], param: str = "prompt") -> Prompt:
        """The prompt for a completion's text or token ids. Token ids are checked first
        (`inference.check_token_ids`): an id the engine cannot take is a 400 naming its
        place in the request (`param`), never something for the engine to fail on."""

    def detokenize(self, tokens: list[int], param: str = "input") -> str:
        """Token ids back to text (embedding inputs given as ids), each id checked as for
        `prepare_text`; ids that have no text (control tokens) are refused too. An engine
        without a tokenizer raises `UnsupportedParameterError`."""

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        on_done: Callable[[Finish], None] | None = None,
    ) -> Generation:
        """Admit a generation or raise `QueueFullError`; never blocks.

        `on_done` runs on the event loop once the generation has ended for any reason.
        """

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One embedding per text, and the number of tokens read."""

    def load_now(self) -> EngineLoad: ...

    def metrics_text(self) -> str | None:
        """The engine's own Prometheus series (text exposition, labelled `model="<id>"`),
        such as a supervised server's; None when it has none. Called in a thread at each
        scrape of the appliance's /metrics, so it may block briefly."""


@dataclass(frozen=True, slots=True)
class EngineContext:
    """What the node hands an engine's factory besides the engine's own config."""

    home: Path  # the state directory ($PALISADE_HOME or data_dir)
    path: Path | None  # the model's file or directory, resolved against `home`; None: none
    on_finish: Callable[[Generation, Finish], None]  # from the engine's thread, once each
    on_step: Callable[[Any], None] | None = None  # an engine's own step statistics
    environ: Mapping[str, str] | None = None  # None: os.environ (tests pass their own)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a predict engine's graph, as the predict API names it."""

    name: str
    datatype: str  # the wire's name of its element type: "FP32", "INT64", "BOOL", ...
    shape: tuple[int | None, ...]  # None: a dynamic dimension (any size)
    # The graph's names of its dynamic dimensions ("batch"), None where it has none.
    dim_names: tuple[str | None, ...] = ()

    def shape_text(self) -> str:
        """The shape as messages show it: `[batch, 4]`, `?` for an unnamed dynamic one."""
        names = self.dim_names or (None,) * len(self.shape)
        dims = (
            str(size) if size is not None else (name or "?")
            for size, name in zip(self.shape, names, strict=True)
        )
        return f"[{', '.join(dims)}]"


@runtime_checkable
class Vocabulary(Protocol):
    """What an engine with its own tokenizer tells the HTTP layer besides `Engine`: how
    many token ids it has, so ids in a request (`logit_bias` keys) are checked before they
    reach the engine."""

    @property
    def vocabulary_size(self) -> int:
        """The number of token ids (valid ids are 0 to this minus one); 0 before `load`."""


@runtime_checkable
class Predictor(Protocol):
    """What an engine whose capabilities include `predict` serves besides `Engine`:
    tensors in, tensors out (`POST /api/v1/models/{id}/predict`)."""

    def signature(self) -> list[TensorSpec]:
        """The graph's inputs (checked before `predict`: names, datatypes, shapes)."""

    def output_signature(self) -> list[TensorSpec]:
        """The graph's outputs (a request may ask for some of them by name)."""

    @property
    def max_elements(self) -> int:
        """The most input elements (all inputs together) one request may carry."""

    async def predict(
        self, inputs: dict[str, NDArray[Any]], outputs: list[str] | None = None
    ) -> dict[str, NDArray[Any]]:
        """Run the graph on checked inputs; `outputs` (None: all) in the graph's order.
        Raises `QueueFullError` when its queue is full, `TensorInputError` for values
        the graph refuses (an index out of range), `APIError` when the runtime fails."""
