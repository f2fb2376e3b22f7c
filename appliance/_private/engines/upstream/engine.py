"""The OpenAI-compatible upstream engine: an appliance in front of an RDU or GPU endpoint.

`OpenAIUpstreamEngine` forwards each generation to any server speaking the OpenAI API
(SambaNova Cloud, vLLM, llama-server, TensorRT-LLM's OpenAI frontend). It has no tokenizer:
prompts are the messages or text themselves (see `Prompt`), usage comes from the upstream,
and the upstream enforces its own context window. Generations run as asyncio tasks on the
event loop over federation's pooled keep-alive `HttpClient` (the router's client to its
nodes: httptools parsing, about a quarter of aiohttp's CPU per request); at most
`max_concurrency` requests are in flight upstream, `max_queue` more wait, and beyond that
`submit` answers `QueueFullError`. The upstream API key is read from the environment
variable named by `upstream_key_env` and goes nowhere but the `Authorization` header.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, NoReturn

import httpx
import msgspec
from msgspec import Struct

from appliance._private import inference
from appliance._private.engines.admission import AdmissionQueue
from appliance._private.engines.base import (
    Capabilities,
    ChoiceDelta,
    EngineContext,
    EngineLoad,
    Finish,
    FinishReason,
    Generation,
    Prompt,
    RequestFeatures,
    SamplingParams,
)
from appliance._private.engines.upstream.config import UpstreamModel
from appliance._private.errors import (
    ModelLoadError,
    ModelNotReadyError,
    UnsupportedParameterError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from federation import (
    APIError,
    HttpClient,
    HttpClientError,
    HttpResponse,
    InvalidRequestError,
    ReportedUsage,
    UnreachedError,
)

log = logging.getLogger("palisade.appliance.upstream")

FinishFn = Callable[[Generation, Finish], None]
# Chat templates add a few tokens per message (role markers, separators) and a BOS.
_MESSAGE_OVERHEAD = 8
_LOAD_RETRY_SECONDS = 3.0
_MAX_ERROR_TEXT = 500
_CONNECT_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 10.0
# Idle upstream connections are dropped before common servers' own keep-alive timeouts
# (uvicorn's, which vLLM uses, is 5 s), so a request is never sent on one being closed.
_KEEPALIVE_S = 4.0


# --- the upstream's wire format: only what is read; unknown fields are ignored ------------


class _Delta(Struct):
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class _ChunkChoice(Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None
    index: int = 0
    logprobs: dict[str, Any] | None = None


class _AnswerChoice(Struct):
    """A whole answer's choice: its message is read as a stream's one delta."""

    delta: _Delta | None = msgspec.field(default=None, name="message")
    text: str | None = None
    finish_reason: str | None = None
    index: int = 0
    logprobs: dict[str, Any] | None = None


class _ErrorBody(Struct):
    message: str | None = None
    code: str | int | None = None
    type: str | None = None
    param: str | None = None


class _Chunk(Struct):
    choices: list[_ChunkChoice] | None = None
    usage: ReportedUsage | None = None
    error: _ErrorBody | None = None


class _Answer(Struct):
    choices: list[_AnswerChoice] | None = None
    usage: ReportedUsage | None = None
    error: _ErrorBody | None = None


class _ErrorReply(Struct):
    error: _ErrorBody | str | None = None
    message: str | None = None  # some servers answer {"message": ...} or {"detail": ...}
    detail: str | None = None


class _Model(Struct):
    id: str


class _ModelList(Struct):
    data: list[_Model]


class _Embedding(Struct):
    embedding: list[float] | str
    index: int = 0


class _EmbeddingReply(Struct):
    data: list[_Embedding]
    usage: ReportedUsage | None = None


_CHUNK = msgspec.json.Decoder(_Chunk)
_ANSWER = msgspec.json.Decoder(_Answer)
_ERROR_REPLY = msgspec.json.Decoder(_ErrorReply)
_MODEL_LIST = msgspec.json.Decoder(_ModelList)
_EMBEDDING_REPLY = msgspec.json.Decoder(_EmbeddingReply)
_ENCODE = msgspec.json.encode
_JSON_HEADERS = {"Content-Type": "application/json"}


class OpenAIUpstreamEngine:
    """Forwards generations and embeddings to an OpenAI-compatible server."""

    def __init__(
        self,
        config: UpstreamModel,
        context: EngineContext,
    ) -> None:
        on_finish, environ = context.on_finish, context.environ
        if config.upstream_url is None:
            raise ModelLoadError(
                f'`{config.id}` has engine = "openai" but no upstream_url; set it to the '
                "upstream's base URL including /v1."
            )
        self._config = config
        self._on_finish = on_finish
        self._environ = environ
        self._base = config.upstream_url.rstrip("/")
        self._model = config.upstream_model or config.id
        self._headers: dict[str, str] = {}
        self._secret: str | None = None
        self._http: HttpClient | None = None
        self._post_headers: dict[str, str] = {}
        self._tls: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admission = AdmissionQueue(
            config.id,
            config.max_concurrency,
            config.max_queue,
            activity="in flight to the upstream",
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._closer: asyncio.Task[None] | None = None
        self._ready = False
        # Whole answers are asked for whole until the upstream answers one without usage;
        # from then on they are streamed, as streams are counted by their chunks.
        self._whole_answers = True

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def context_length(self) -> int:
        return self._config.context_length

    @property
    def capabilities(self) -> Capabilities:
        # An OpenAI-compatible upstream decides what it serves: its 400 passes through.
        # Its 4xx/5xx become the HTTP status (early errors).
        return Capabilities(
            tokenizes_locally=False,
            early_errors=True,
            embeddings=self._config.embeddings,
            logprobs=True,
            n=True,
            tools=True,
            structured_output=True,
            logit_bias=True,
            echo=True,
            several_prompts=True,
            accelerator=self._config.device_class,
        )

    # --- lifecycle (load and close run in a worker thread, off the event loop) ----------

    def load(self) -> None:
        """Read the key, then check that the upstream answers GET /models (retrying briefly
        while it refuses connections, e.g. when it starts together with the appliance)."""
        # httpx logs every request at INFO: far too much for a gateway forwarding thousands.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self._secret = self._config.api_key(self._environ)
        if self._secret is not None:
            self._headers = {"Authorization": f"Bearer {self._secret}"}
        # The CAs that check an https upstream (certifi's bundle, or SSL_CERT_FILE /
        # SSL_CERT_DIR): the same for this check as for the requests; read here, off the loop.
        self._tls = httpx.create_ssl_context()
        url = f"{self._base}/models"
        deadline = time.monotonic() + _LOAD_RETRY_SECONDS
        delay = 0.1
        with httpx.Client(
            headers=self._headers, timeout=self._timeout(), verify=self._tls
        ) as client:
            while True:
                try:
                    response: httpx.Response | None = client.get(url)
                    failure = None
                except httpx.TransportError as exc:
                    response, failure = None, exc
                down = response is None or response.status_code >= 500
                if down and time.monotonic() + delay < deadline:
                    time.sleep(delay)  # a bounded back-off, in a worker thread
                    delay *= 2
                    continue
                break
        if response is None:  # the upstream never answered
            raise ModelLoadError(
                f"Cannot reach the upstream for `{self._config.id}` at {url}: "
                f"{self._scrub(str(failure)) or type(failure).__name__}. Start the upstream "
                "server, or fix `upstream_url` in the appliance config."
            ) from failure
        self._check_models_reply(url, response)
        self._ready = True

    def _check_models_reply(self, url: str, response: httpx.Response) -> None:
        status = response.status_code
        if status in (401, 403):
            where = (
                f"the environment variable {self._config.upstream_key_env} (upstream_key_env)"
                if self._config.upstream_key_env
                else "an environment variable, and name it in upstream_key_env"
            )
            raise ModelLoadError(
                f"The upstream at {url} refused the appliance's API key (HTTP {status}) for "
                f"`{self._config.id}`. Put a valid key in {where}."
            )
        if status != 200:
            raise ModelLoadError(
                f"The upstream at {url} answered HTTP {status} to GET /models for "
                f"`{self._config.id}`: {self._error_text(response.content)}. Check that "
                "`upstream_url` is the base URL of an OpenAI-compatible API, including /v1."
            )
        try:
            models = [model.id for model in _MODEL_LIST.decode(response.content).data]
        except msgspec.DecodeError as exc:
            raise ModelLoadError(
                f"The upstream at {url} did not answer GET /models with an OpenAI model list "
                f"for `{self._config.id}`. Check that `upstream_url` points at an "
                "OpenAI-compatible API and includes /v1."
            ) from exc
        if self._model not in models:
            log.warning(
                "upstream %s does not list model %s (it lists: %s); requests for %s will "
                "name it anyway: set upstream_model if the upstream calls it something else",
                url,
                self._model,
                ", ".join(models[:20]) or "none",
                self._config.id,
            )

    def close(self) -> None:
        self._ready = False
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            self._closer = loop.create_task(self._shutdown())
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            future.result(timeout=_CLOSE_TIMEOUT)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("upstream client for %s did not close in time", self._config.id)

    async def _shutdown(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _timeout(self) -> httpx.Timeout:
        seconds = self._config.upstream_timeout_s
        return httpx.Timeout(seconds, connect=min(seconds, _CONNECT_TIMEOUT))

    def _upstream(self) -> HttpClient:
        """The shared keep-alive client, made on the event loop at first use."""
        if self._http is None:
            seconds = self._config.upstream_timeout_s
            self._http = HttpClient(
                tls=self._tls,
                connect_timeout_s=min(seconds, _CONNECT_TIMEOUT),
                read_timeout_s=seconds,
                keepalive_s=_KEEPALIVE_S,
                limit=self._config.max_concurrency,
            )
            self._post_headers = self._headers | _JSON_HEADERS
            self._loop = asyncio.get_running_loop()
        return self._http

    # --- prompts: no tokenizer here, so sizes are upper bounds ------------------------------

    async def prepare_chat(
        self, messages: list[dict[str, Any]], features: RequestFeatures | None = None
    ) -> Prompt:
        del features  # forwarded with the request (submit)
        return Prompt(sum(map(_message_size, messages)), messages=messages)

    async def prepare_text(self, source: str | list[int], param: str = "prompt") -> Prompt:
        if isinstance(source, str):
            return Prompt(len(source.encode()) + 1, text=source)
        inference.check_token_ids(source, param, None)  # the upstream knows its vocabulary
        return Prompt(len(source), text=source)

    def detokenize(self, tokens: list[int], param: str = "input") -> str:
        del tokens, param
        raise UnsupportedParameterError(
            "input",
            f"`{self._config.id}` is served by an upstream engine and this appliance has no "
            "tokenizer for it, so token ids cannot be embedded; send the text instead.",
        )

    # --- generation -------------------------------------------------------------------

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        on_done: Callable[[Finish], None] | None = None,
    ) -> Generation:
        if not self._ready:
            raise ModelNotReadyError(
                f"The model `{self._config.id}` is not connected to its upstream yet; retry "
                "shortly.",
                retry_after=1,
            )
        if prompt.messages is None and prompt.text is None:
            raise InvalidRequestError(
                "An upstream engine needs the messages or the prompt text, not token ids alone.",
                code="invalid_value",
                param="prompt",
            )
        loop = asyncio.get_running_loop()
        generation = Generation(prompt, params, loop, on_done)
        self._admission.admit()
        task = loop.create_task(self._run(generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        generation.on_cancel(lambda _: _cancel(task))
        return generation

    def load_now(self) -> EngineLoad:
        return self._admission.load()

    def metrics_text(self) -> str | None:
        return None  # everything it measures is in the appliance's own registry

    async def _run(self, generation: Generation) -> None:
        """One generation, start to end; always closes it and reports the finish."""
        progress = _Progress(generation.prompt)
        try:
            # One of max_concurrency in flight upstream; completed ones time Retry-After.
            async with self._admission.slot():
                generation.mark_started()
                await self._generate(generation, progress)
            finish = progress.finish()
        except asyncio.CancelledError:
            finish = progress.finish("cancelled")
        except APIError as exc:
            finish = progress.failed(exc)
        except Exception as exc:
            log.exception("upstream generation failed for model %s", self._config.id)
            reason = self._scrub(repr(exc))
            finish = progress.failed(
                UpstreamError(f"The upstream engine's reply could not be read ({reason}).")
            )
        generation.close(finish)
        self._on_finish(generation, finish)

    async def _generate(self, generation: Generation, progress: _Progress) -> None:
        prompt, path = generation.prompt, "/completions"
        body: dict[str, Any] = {"model": self._model}
        if prompt.messages is not None:
            path = "/chat/completions"
            body["messages"] = prompt.messages
        else:
            body["prompt"] = _prompt_field(prompt)
        body |= _sampling(generation.params)
        body |= _features(generation.params.features, chat=prompt.messages is not None)
        whole = generation.params.whole and self._whole_answers
        if not whole:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        client = self._upstream()
        try:
            response = await client.request(
                "POST", self._base, path, body=_ENCODE(body), headers=self._post_headers
            )
            try:
                if response.status != 200:
                    self._reject(path, response.status, await response.read())
                progress.sent = True
                if whole:
                    self._take_answer(generation, progress, await response.read())
                else:
                    await self._read_stream(generation, progress, response)
            finally:
                response.release()  # before the end (cancelled): drops the connection
        except (HttpClientError, TimeoutError) as exc:
            self._transport_failure(path, exc)

    async def _read_stream(
        self, generation: Generation, progress: _Progress, response: HttpResponse
    ) -> None:
        kind = response.headers.get("Content-Type", "") or ""
        if not kind.startswith("text/event-stream"):
            self._malformed(f"it answered {kind or 'no content type'} instead of an event stream")
        async for line in _lines(response.iter_any()):
            if not line.startswith(b"data:"):
                continue  # blank lines, comments (": keep-alive") and event names
            data = line[5:].strip()
            if data == b"[DONE]":
                progress.done = True
                return
            try:
                chunk = _CHUNK.decode(data)
            except msgspec.DecodeError:
                text = data[:100].decode("utf-8", "replace")
                self._malformed(f"a stream event is not OpenAI JSON: {text!r}")
            if chunk.error is not None:
                self._failed_generating(chunk.error)
            if chunk.usage is not None:
                progress.usage = chunk.usage
            for choice in chunk.choices or ():
                self._take_choice(generation, progress, chunk.usage, choice)
        if progress.reason is None:
            self._malformed("the stream ended before a finish_reason or [DONE]")
        progress.done = True

    def _take_answer(self, generation: Generation, progress: _Progress, raw: bytes) -> None:
        """A whole answer (the client did not stream): each choice goes to the generation as
        one delta, as a stream's would in pieces."""
        try:
            answer = _ANSWER.decode(raw)
        except msgspec.DecodeError:
            self._malformed(f"the answer is not OpenAI JSON: {self._error_text(raw[:100])!r}")
        if answer.error is not None:
            self._failed_generating(answer.error)
        if not answer.choices:
            self._malformed("the answer has no choices")
        progress.usage = answer.usage
        for choice in answer.choices:
            self._take_choice(generation, progress, answer.usage, choice)
        if answer.usage is None:
            self._no_usage_in()
            progress.produced = sum(map(_answer_bytes, answer.choices))
        # Arrived all at once: the client's first token comes with the whole answer, and that
        # time is what the router's latency-aware choice must see (a node serving only whole
        # answers would otherwise report no latency at all).
        progress.reason = progress.reason or "stop"
        progress.done = True

    def _no_usage_in(self) -> None:
        """An upstream that reports no usage in a whole answer: this one is billed an upper
        bound (its bytes, as prompts are) and the next are streamed and counted by chunks."""
        if self._whole_answers:
            log.warning(
                "upstream %s reports no usage in whole answers; model %s now streams every "
                "request from it and counts the chunks",
                self._base,
                self._config.id,
            )
        self._whole_answers = False

    def _failed_generating(self, error: _ErrorBody) -> NoReturn:
        message = self._scrub(error.message or "no message")
        raise UpstreamError(
            f"The upstream engine failed while generating: {message[:_MAX_ERROR_TEXT]}"
        )

    def _take_choice(
        self,
        generation: Generation,
        progress: _Progress,
        usage: ReportedUsage | None,
        choice: _ChunkChoice | _AnswerChoice,
    ) -> None:
        """Choice-0 text goes out as plain text (the hot path); anything else (another
        choice, tool-call fragments, log probabilities, a finish reason other than stop or
        length) as a `ChoiceDelta`, in the upstream's own shapes."""
        delta, reason = choice.delta, choice.finish_reason
        text = (delta.content if delta is not None else choice.text) or ""
        tool_calls = (delta.tool_calls if delta is not None else None) or None
        if choice.index == 0 and reason is not None:
            progress.reason = "length" if reason == "length" else "stop"
        if choice.index == 0 and reason in (None, "stop", "length"):
            reason = None  # the generation's own end says it
            if tool_calls is None and choice.logprobs is None:
                if text:
                    progress.produced += 1
                    generation.emit(text, tokens=_completion_tokens(progress, usage))
                return
        if text or tool_calls or choice.logprobs:
            progress.produced += 1
        elif reason is None:
            return  # nothing in it (a role-only first chunk of another choice)
        rich = ChoiceDelta(choice.index, text, tool_calls, choice.logprobs, reason)
        generation.emit_delta(rich, tokens=_completion_tokens(progress, usage))

    # --- embeddings -------------------------------------------------------------------

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        if not self._config.embeddings:
            raise InvalidRequestError(
                f"Embeddings are disabled for `{self._config.id}` (embeddings = false in the "
                "appliance config).",
                code="embeddings_disabled",
                param="model",
            )
        if not self._ready:
            raise ModelNotReadyError(
                f"The model `{self._config.id}` is not connected to its upstream yet.",
                retry_after=1,
            )
        self._admission.admit()
        body = {"model": self._model, "input": texts, "encoding_format": "float"}
        path = "/embeddings"
        async with self._admission.slot():
            try:
                response = await self._upstream().request(
                    "POST", self._base, path, body=_ENCODE(body), headers=self._post_headers
                )
                try:
                    status, raw = response.status, await response.read()
                finally:
                    response.release()
            except (HttpClientError, TimeoutError) as exc:
                self._transport_failure(path, exc)
        if status != 200:
            self._reject(path, status, raw)
        try:
            reply = _EMBEDDING_REPLY.decode(raw)
        except msgspec.DecodeError:
            self._malformed("the embeddings reply is not an OpenAI embedding list")
        if len(reply.data) != len(texts):
            self._malformed(f"it returned {len(reply.data)} embeddings for {len(texts)} inputs")
        vectors = [_floats(item.embedding) for item in sorted(reply.data, key=lambda d: d.index)]
        tokens = reply.usage.prompt_tokens if reply.usage is not None else 0
        return vectors, tokens

    # --- failures: say what failed and how to fix it; never the key -----------------------

    def _reject(self, path: str, status: int, raw: bytes) -> NoReturn:
        """An HTTP error from the upstream (its status and body), as the error the client
        should see."""
        message, code, param = self._error_detail(raw)
        if status in (401, 403):
            log.warning(
                "upstream %s%s refused the appliance's API key (HTTP %s) for model %s; check "
                "the variable named by upstream_key_env",
                self._base,
                path,
                status,
                self._config.id,
            )
            raise UpstreamError(
                f"The upstream engine refused this appliance's credentials (HTTP {status}). "
                "The appliance's operator must fix the upstream API key; retry on another "
                "node meanwhile."
            )
        if status == 404:
            log.warning(
                "upstream %s%s answered 404 for model %s (upstream model %s): %s",
                self._base,
                path,
                self._config.id,
                self._model,
                message,
            )
            raise UpstreamError(
                f"The upstream engine does not serve `{self._model}` at this endpoint "
                f"(HTTP 404: {message}). The appliance's operator must fix upstream_model or "
                "upstream_url."
            )
        if 400 <= status < 500:
            raise UpstreamRejectedError.for_status(
                status,
                f"The upstream engine rejected the request (HTTP {status}): {message}",
                code or "upstream_rejected",
                param,
            )
        log.warning("upstream %s%s answered HTTP %s: %s", self._base, path, status, message)
        raise UpstreamError(
            f"The upstream engine failed (HTTP {status}: {message}). Retry, or retry on "
            "another node."
        )

    def _transport_failure(self, path: str, exc: HttpClientError | TimeoutError) -> NoReturn:
        reason = self._scrub(str(exc)) or type(exc).__name__
        log.warning("upstream %s%s: %s: %s", self._base, path, type(exc).__name__, reason)
        if isinstance(exc, UnreachedError):
            raise UpstreamUnavailableError(
                f"The upstream engine is unreachable ({type(exc).__name__}: {reason}). Retry "
                "on another node; the appliance's operator must check that the upstream is "
                "running."
            ) from exc
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeoutError(
                f"The upstream engine did not answer within {self._config.upstream_timeout_s:g}s"
                f" ({type(exc).__name__}). Retry, or retry on another node; the operator can "
                "raise upstream_timeout_s."
            ) from exc
        raise UpstreamError(
            f"The upstream engine failed while handling the request ({type(exc).__name__}:"
            f" {reason})."
        ) from exc

    def _malformed(self, what: str) -> NoReturn:
        log.warning("upstream %s answered malformed: %s", self._base, what)
        raise UpstreamError(
            f"The upstream engine's reply is not the OpenAI API: {what}. The appliance's "
            "operator must check that upstream_url points at an OpenAI-compatible server."
        )

    def _error_detail(self, raw: bytes) -> tuple[str, str | None, str | None]:
        """Message, code and param of an upstream error body (OpenAI's shape or close)."""
        try:
            reply = _ERROR_REPLY.decode(raw)
        except msgspec.DecodeError:
            return self._error_text(raw), None, None
        error = reply.error
        if isinstance(error, _ErrorBody):
            code = error.code if isinstance(error.code, str) else None
            message = self._scrub(error.message or "no message")[:_MAX_ERROR_TEXT]
            return message, code, error.param
        text = error or reply.message or reply.detail
        return (self._scrub(text)[:_MAX_ERROR_TEXT] if text else self._error_text(raw)), None, None

    def _error_text(self, raw: bytes) -> str:
        text = raw[:_MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
        return self._scrub(text) or "empty reply"

    def _scrub(self, text: str) -> str:
        """Upstream text with the key removed, in case the upstream echoes it back."""
        return text.replace(self._secret, "***") if self._secret else text


class _Progress:
    """What one generation has got from the upstream so far, turned into its `Finish`."""

    __slots__ = ("done", "produced", "prompt", "reason", "sent", "usage")

    def __init__(self, prompt: Prompt) -> None:
        self.prompt = prompt
        self.sent = False
        self.done = False
        self.produced = 0
        self.reason: FinishReason | None = None
        self.usage: ReportedUsage | None = None

    def _counts(self) -> tuple[int, int]:
        if self.usage is not None:
            return self.usage.prompt_tokens, self.usage.completion_tokens
        if not self.sent:
            return 0, 0  # never reached the upstream: nothing to bill
        # No usage from the upstream: its prompt size is bounded by ours; count the chunks.
        return self.prompt.total_size, self.produced

    def finish(self, reason: FinishReason | None = None) -> Finish:
        prompt_tokens, completion_tokens = self._counts()
        cached = self.usage.cached_tokens if self.usage is not None else 0
        ended = reason or self.reason or "stop"
        return Finish(ended, prompt_tokens, completion_tokens, cached_tokens=cached)

    def failed(self, exc: APIError) -> Finish:
        prompt_tokens, completion_tokens = self._counts() if self.produced else (0, 0)
        return Finish("error", prompt_tokens, completion_tokens, exc)


def _completion_tokens(progress: _Progress, usage: ReportedUsage | None) -> int:
    """Tokens so far: the upstream's own count when it gave one (a whole answer's usage,
    vLLM's continuous usage), else one per content chunk, as servers stream them."""
    return usage.completion_tokens if usage is not None else progress.produced


def _answer_bytes(choice: _AnswerChoice) -> int:
    """An upper bound on a whole choice's tokens: its UTF-8 bytes (text and tool calls)."""
    delta = choice.delta
    text = (delta.content if delta is not None else choice.text) or ""
    calls = delta.tool_calls if delta is not None else None
    return len(text.encode()) + (len(_ENCODE(calls)) if calls else 0)


def _sampling(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams as OpenAI request fields (defaults left out where the API allows)."""
    fields: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p}
    if params.explicit_max_tokens:
        fields["max_tokens"] = params.max_tokens
    if params.seed is not None:
        fields["seed"] = params.seed
    if params.presence_penalty:
        fields["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        fields["frequency_penalty"] = params.frequency_penalty
    if params.stop:
        fields["stop"] = list(params.stop)
    if params.logit_bias:
        fields["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
    # vLLM's extensions go only when asked for: an upstream that does not know them
    # refuses them, and its 400 names the parameter.
    extensions = {
        "ignore_eos": params.ignore_eos,
        "min_tokens": params.min_tokens,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "skip_special_tokens": params.skip_special_tokens,
        "include_stop_str_in_output": params.include_stop_str_in_output,
    }
    defaults = SamplingParams(max_tokens=1)
    fields |= {
        name: value for name, value in extensions.items() if value != getattr(defaults, name)
    }
    return fields


def _features(features: RequestFeatures | None, *, chat: bool) -> dict[str, Any]:
    """What the client asked for beyond sampling, as OpenAI request fields (only what it
    set: an upstream decides what it serves, and its 400 names what it refuses)."""
    if features is None:
        return {}
    fields: dict[str, Any] = {"n": features.n} if features.n != 1 else {}
    if not chat:  # completions: `logprobs` is the number of alternatives
        if features.logprobs:
            fields["logprobs"] = features.top_logprobs or 0
        if features.echo:
            fields["echo"] = True
        return fields
    if features.logprobs:
        fields["logprobs"] = True
    optional = {
        "top_logprobs": features.top_logprobs,
        "tools": features.tools,
        "tool_choice": features.tool_choice,
        "parallel_tool_calls": features.parallel_tool_calls,
        "response_format": features.response_format,
    }
    return fields | {name: value for name, value in optional.items() if value is not None}


def _prompt_field(prompt: Prompt) -> str | list[int] | list[str] | list[list[int]]:
    """A completion's `prompt`: its text or token ids, or the list of them all when it
    has several (choice `p * n + i` of the answer is then the i-th of prompt p)."""
    if not prompt.more:
        return prompt.text or ""
    texts = [each.text for each in (prompt, *prompt.more) if isinstance(each.text, str)]
    if len(texts) == 1 + len(prompt.more):
        return texts
    return [each.text for each in (prompt, *prompt.more) if isinstance(each.text, list)]


def _message_size(message: dict[str, Any]) -> int:
    """An upper bound on one message's tokens: its text bytes, its tool calls' JSON and
    the template's overhead."""
    content = message.get("content")
    size = len(content.encode()) if isinstance(content, str) else 0
    if message.get("tool_calls"):
        size += len(_ENCODE(message["tool_calls"]))
    return size + _MESSAGE_OVERHEAD


async def _lines(pieces: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The lines of a body as they arrive, without their ends and however long they are
    (an event can be long: an echo with log probabilities of a long prompt is one)."""
    partial: list[bytes] = []
    async for received in pieces:
        if b"\n" not in received:
            partial.append(received)
            continue
        data = received
        if partial:
            partial.append(received)
            data = b"".join(partial)
            partial.clear()
        *lines, rest = data.split(b"\n")
        for line in lines:
            yield line
        if rest:
            partial.append(rest)
    if partial:
        yield b"".join(partial)


def _cancel(task: asyncio.Task[None]) -> None:
    # The task closes the generation and reports its finish, but only once it has started:
    # cancelled before its first step, `_run` would never run. Its first step was scheduled
    # when it was created, so a cancel scheduled now comes after it.
    task.get_loop().call_soon(task.cancel)


def _floats(embedding: list[float] | str) -> list[float]:
    if isinstance(embedding, list):
        return embedding
    raw = base64.b64decode(embedding)
    return list(memoryview(raw).cast("f"))
