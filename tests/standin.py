"""A stand-in OpenAI-compatible server for what cannot run here (a SambaNova RDU endpoint,
vLLM on a GPU): a real HTTP server speaking the real protocol, with deterministic output.

    python -m tests.standin --host 127.0.0.1 --port 0 [--ttft-ms N] [--token-ms N]
                            [--tokens N] [--api-key K] [--model NAME]
                            [--tls-cert PEM --tls-key PEM [--tls-ca PEM]]

prints `standin listening on http://HOST:PORT` once bound and serves until SIGTERM/SIGINT
(HTTPS with `--tls-cert`/`--tls-key`, TLS 1.3, asking for optional client certificates
signed by `--tls-ca`: how an enrolled appliance serves the router).
Each completion is `--tokens` tokens (" tok0", " tok1", ...), capped by the request's
`max_tokens`; `prompt_tokens` is the number of whitespace-separated words in the prompt.
`GET /stats` counts what happened (for tests to assert on) and `POST /control` changes
latency, length or the key, or injects OpenAI-shaped errors, at runtime (the fields of
`Settings`; `cached_tokens` makes usage report that many prompt tokens, at most all of
them, as `prompt_tokens_details.cached_tokens`, as vLLM and OpenAI do). With zero delays
nothing ever sleeps: this is the fast upstream of the router overhead benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import msgspec
from aiohttp import web

from tests.support import stop as stop_process
from tests.support import wait_for

REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"standin listening on (?P<url>https?://\S+)")
_ENCODE = msgspec.json.encode
_DECODE = msgspec.json.decode
_JSON = "application/json"
_DONE = b"data: [DONE]\n\n"
_DIMENSIONS = 8
_CONTROLS = frozenset(
    {
        "ttft_ms",
        "token_ms",
        "tokens",
        "fail_status",
        "fail_code",
        "fail_after_tokens",
        "api_key",
        "cached_tokens",
        "omit_usage",
    }
)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


@dataclass
class Settings:
    """Behaviour, changeable at runtime through `POST /control`."""

    ttft_ms: float = 0.0
    token_ms: float = 0.0
    tokens: int = 8
    model: str = "standin-model"
    api_key: str | None = None
    fail_status: int | None = None
    fail_code: str | None = None
    # After this many tokens of a stream, end it with an OpenAI error event.
    fail_after_tokens: int | None = None
    # Prompt tokens reported as served from a prompt cache (None: no prompt_tokens_details).
    cached_tokens: int | None = None
    # Answers and streams carry no usage (some servers send none).
    omit_usage: bool = False


@dataclass
class Stats:
    requests: dict[str, int] = field(default_factory=dict)
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    # Whole (non-streamed) answers whose client left before they were sent.
    answers_cancelled: int = 0
    in_flight: int = 0
    last_body: Any = None
    last_path: str | None = None


@lru_cache(maxsize=1024)
def _text(count: int) -> str:
    return "".join(f" tok{index}" for index in range(count))


def _words(value: object) -> int:
    """A deterministic prompt size: words in every string, items in every token list."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        if "content" in value:
            return _words(value["content"])
        return _words(value.get("text", ""))
    return 0


def _stopped_at(count: int, stop: object) -> int | None:
    """How many tokens come before the first stop sequence in the text (whole tokens:
    a stop starting inside a token drops that token); None when no stop occurs."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    text = _text(count)
    found = [text.find(item) for item in stops if isinstance(item, str) and item in text]
    if not found:
        return None
    cut = min(found)
    return next(index for index in range(count + 1) if len(_text(index + 1)) > cut)


def _vector(item: object) -> list[float]:
    seed = zlib.crc32(_ENCODE(item))
    return [((seed >> (index * 4)) & 0xFF) / 255.0 - 0.5 for index in range(_DIMENSIONS)]


def _error(status: int, message: str, code: str | None, param: str | None = None) -> web.Response:
    error_type = _ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": error_type, "code": code, "param": param}}
    return web.Response(body=_ENCODE(body), status=status, content_type=_JSON)


class Standin:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = Stats()
        self._ids = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/readyz", self.ready)
        app.router.add_get("/healthz", self.ready)
        app.router.add_get("/health", self.ready)  # vLLM's and trtllm-serve's health check
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/stats", self.stats_view)
        app.router.add_post("/control", self.control)
        return app

    # --- common -----------------------------------------------------------------------

    def _count(self, path: str) -> None:
        requests = self.stats.requests
        requests[path] = requests.get(path, 0) + 1

    def _refuse(self, request: web.Request) -> web.Response | None:
        """An OpenAI-shaped error when the key is wrong or an error is injected."""
        settings = self.settings
        if settings.api_key is not None and (
            request.headers.get("Authorization") != f"Bearer {settings.api_key}"
        ):
            return _error(
                401, "Incorrect API key provided to the stand-in.", "invalid_api_key", None
            )
        if settings.fail_status is not None:
            code = settings.fail_code or "standin_failure"
            return _error(
                settings.fail_status, f"The stand-in was told to fail ({code}).", code, None
            )
        return None

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = _DECODE(await request.read())
        except msgspec.DecodeError:
            return _error(400, "The body is not valid JSON.", "invalid_json")
        if not isinstance(body, dict):
            return _error(400, "The body must be a JSON object.", "invalid_json")
        self.stats.last_body = body
        self.stats.last_path = request.path
        return body

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-standin-{self._ids}"

    # --- generation -------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        self._count(request.path)
        refused = self._refuse(request)
        if refused is not None:
            return refused
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        settings = self.settings
        prompt = body.get("messages") if chat else body.get("prompt")
        if prompt is None:
            name = "messages" if chat else "prompt"
            return _error(400, f"Missing required parameter `{name}`.", "missing", name)
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        count = settings.tokens
        reason = "stop"
        if isinstance(limit, int) and limit < count:
            count, reason = limit, "length"
        stopped = _stopped_at(count, body.get("stop"))
        if stopped is not None:
            count, reason = stopped, "stop"
        usage: dict[str, Any] = {
            "prompt_tokens": _words(prompt),
            "completion_tokens": count,
            "total_tokens": _words(prompt) + count,
        }
        if settings.cached_tokens is not None:
            cached = min(settings.cached_tokens, usage["prompt_tokens"])
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        model = body.get("model", settings.model)
        if _wants_rich(body):
            answer = _RichAnswer(body, chat=chat, count=count, reason=reason)
            return await self._rich(request, answer, chat=chat, model=model, usage=usage)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            usage_wanted = bool(options.get("include_usage"))
            return await self._stream(
                request,
                chat=chat,
                model=model,
                count=count,
                reason=reason,
                usage=usage if usage_wanted and not settings.omit_usage else None,
            )
        return await self._whole(
            chat=chat,
            model=model,
            count=count,
            reason=reason,
            usage=None if settings.omit_usage else usage,
        )

    async def _whole(
        self, *, chat: bool, model: str, count: int, reason: str, usage: dict[str, Any] | None
    ) -> web.Response:
        """A whole (non-streamed) answer, after the time its tokens would take."""
        settings = self.settings
        self.stats.in_flight += 1
        try:
            if settings.ttft_ms or settings.token_ms:
                delay = settings.ttft_ms + settings.token_ms * max(0, count - 1)
                await asyncio.sleep(delay / 1000)
        except asyncio.CancelledError:
            self.stats.answers_cancelled += 1
            raise
        finally:
            self.stats.in_flight -= 1
        text = _text(count)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        payload: dict[str, Any] = {
            "id": self._next_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
        if usage is not None:
            payload["usage"] = usage
        return web.Response(body=_ENCODE(payload), content_type=_JSON)

    async def _stream(
        self,
        request: web.Request,
        *,
        chat: bool,
        model: str,
        count: int,
        reason: str,
        usage: dict[str, Any] | None,
    ) -> web.StreamResponse:
        settings = self.settings
        stats = self.stats
        ident = self._next_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, *, first: bool = False) -> bytes:
            if chat:
                delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            event = {"id": ident, "object": kind, "created": created, "model": model}
            event["choices"] = [choice]
            return b"data: " + _ENCODE(event) + b"\n\n"

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        stats.streams_started += 1
        stats.in_flight += 1
        try:
            await response.prepare(request)
            if settings.ttft_ms:
                await asyncio.sleep(settings.ttft_ms / 1000)
            if chat:
                await response.write(chunk(None, first=True))
            for index in range(count):
                if index and settings.token_ms:
                    await asyncio.sleep(settings.token_ms / 1000)
                if settings.fail_after_tokens is not None and index >= settings.fail_after_tokens:
                    error = {
                        "error": {
                            "message": "The stand-in failed mid-stream.",
                            "type": "server_error",
                            "code": settings.fail_code or "standin_failure",
                            "param": None,
                        }
                    }
                    await response.write(b"data: " + _ENCODE(error) + b"\n\n")
                    stats.streams_completed += 1
                    return response
                await response.write(chunk(f" tok{index}"))
            await response.write(chunk(None if chat else "", reason))
            if usage is not None:
                event = {"id": ident, "object": kind, "created": created, "model": model}
                event |= {"choices": [], "usage": usage}
                await response.write(b"data: " + _ENCODE(event) + b"\n\n")
            await response.write(_DONE)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            stats.streams_cancelled += 1
            raise
        finally:
            stats.in_flight -= 1
        stats.streams_completed += 1
        return response

    async def _rich(
        self,
        request: web.Request,
        answer: _RichAnswer,
        *,
        chat: bool,
        model: str,
        usage: dict[str, Any],
    ) -> web.StreamResponse:
        """n choices, tool calls, log probabilities or JSON output (`_RichAnswer`)."""
        usage = usage | {
            "completion_tokens": answer.completion_tokens,
            "total_tokens": usage["prompt_tokens"] + answer.completion_tokens,
        }
        event: dict[str, Any] = {
            "id": self._next_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        body = answer.body
        if not body.get("stream"):
            payload = event | {"choices": answer.whole(), "usage": usage}
            return web.Response(body=_ENCODE(payload), content_type=_JSON)
        event["object"] += ".chunk" if chat else ""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        self.stats.streams_started += 1
        await response.prepare(request)
        for choices in answer.chunks():
            await response.write(b"data: " + _ENCODE(event | {"choices": choices}) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = event | {"choices": [], "usage": usage}
            await response.write(b"data: " + _ENCODE(tail) + b"\n\n")
        await response.write(_DONE)
        await response.write_eof()
        self.stats.streams_completed += 1
        return response

    # --- the rest of the API ------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        self._count(request.path)
        refused = self._refuse(request)
        if refused is not None:
            return refused
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        raw = body.get("input")
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            inputs: list[Any] = [raw]
        elif isinstance(raw, list) and raw:
            inputs = raw
        else:
            return _error(400, "`input` must be a string or a non-empty list.", "invalid_value")
        tokens = _words(inputs)
        payload = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": _vector(item)}
                for index, item in enumerate(inputs)
            ],
            "model": body.get("model", self.settings.model),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.Response(body=_ENCODE(payload), content_type=_JSON)

    async def models(self, request: web.Request) -> web.Response:
        self._count(request.path)
        refused = self._refuse(request)
        if refused is not None:
            return refused
        card = {"id": self.settings.model, "object": "model", "created": 0, "owned_by": "standin"}
        return web.Response(body=_ENCODE({"object": "list", "data": [card]}), content_type=_JSON)

    async def ready(self, request: web.Request) -> web.Response:
        del request
        return web.Response(body=b'{"status": "ok"}', content_type=_JSON)

    async def metrics(self, request: web.Request) -> web.Response:
        del request
        return web.Response(text=self.metrics_text("vllm:"), content_type="text/plain")

    def metrics_text(self, prefix: str) -> str:
        """A few Prometheus series as an engine names them (`vllm:`, `trtllm_`)."""
        label = f'{{model_name="{self.settings.model}"}}'
        running, done = self.stats.in_flight, self.stats.streams_completed
        return (
            f"# HELP {prefix}num_requests_running Requests running now.\n"
            f"# TYPE {prefix}num_requests_running gauge\n"
            f"{prefix}num_requests_running{label} {running}\n"
            f"# HELP {prefix}request_success_total Requests finished.\n"
            f"# TYPE {prefix}request_success_total counter\n"
            f"{prefix}request_success_total{label} {done}\n"
        )

    async def stats_view(self, request: web.Request) -> web.Response:
        del request
        stats = self.stats
        payload = {
            "requests": stats.requests,
            "streams_started": stats.streams_started,
            "streams_completed": stats.streams_completed,
            "streams_cancelled": stats.streams_cancelled,
            "answers_cancelled": stats.answers_cancelled,
            "in_flight": stats.in_flight,
            "last_body": stats.last_body,
            "last_path": stats.last_path,
        }
        return web.Response(body=_ENCODE(payload), content_type=_JSON)

    async def control(self, request: web.Request) -> web.Response:
        try:
            body = _DECODE(await request.read())
        except msgspec.DecodeError:
            return _error(400, "The body is not valid JSON.", "invalid_json")
        if not isinstance(body, dict) or not set(body) <= _CONTROLS:
            return _error(400, f"Send a JSON object with keys among {sorted(_CONTROLS)}.", None)
        settings = self.settings
        for name, value in body.items():
            setattr(settings, name, value)
        current = {
            "ttft_ms": settings.ttft_ms,
            "token_ms": settings.token_ms,
            "tokens": settings.tokens,
            "fail_status": settings.fail_status,
            "fail_code": settings.fail_code,
            "fail_after_tokens": settings.fail_after_tokens,
            "cached_tokens": settings.cached_tokens,
            "omit_usage": settings.omit_usage,
            "api_key_required": settings.api_key is not None,
        }
        return web.Response(body=_ENCODE(current), content_type=_JSON)


# --- rich answers: n choices, tool calls, log probabilities, JSON output -----------------


def _wants_rich(body: dict[str, Any]) -> bool:
    form = (body.get("response_format") or {}).get("type", "text")
    return bool(
        body.get("n", 1) != 1
        or body.get("tools")
        or body.get("logprobs") not in (None, False)
        or form != "text"
        or body.get("echo")
        or len(_prompts(body)) > 1
    )


def _prompts(body: dict[str, Any]) -> list[str]:
    """A completion's prompts as text (token ids joined by spaces): several when `prompt`
    is a list of texts or of token lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return [_prompt_text(item) for item in prompt]
    return [_prompt_text(prompt)] if prompt is not None else []


def _prompt_text(prompt: object) -> str:
    if isinstance(prompt, str):
        return prompt
    return " ".join(map(str, prompt)) if isinstance(prompt, list) else ""


class _RichAnswer:
    """A deterministic rich answer. Choice i says " tok0 tok1 ..." (choice 0) or
    " c{i}tok0 ..." (the others); with `tools` (and tool_choice not "none") every choice
    calls the first tool with each of its parameters set to "standin", its arguments
    streamed in two fragments; with `logprobs`, every piece has log probability -0.5 (and
    `top_logprobs` alternatives); with `response_format` json_object or json_schema, the
    text is a JSON object (the schema's properties filled by type), streamed in pieces.
    A completion with several prompts has n choices for each (choice p * n + i is the i-th
    of prompt p); with `echo`, each choice starts with its prompt (whose first token has
    no log probability)."""

    def __init__(self, body: dict[str, Any], *, chat: bool, count: int, reason: str) -> None:
        self.body, self.chat, self.count, self.reason = body, chat, count, reason
        self.prompts = [""] if chat else _prompts(body) or [""]
        self.n = max(1, int(body.get("n", 1))) * len(self.prompts)
        self.per_prompt = self.n // len(self.prompts)
        tools = body.get("tools") or []
        self.tool = tools[0]["function"] if tools and body.get("tool_choice") != "none" else None
        self.logprobs = body.get("logprobs") not in (None, False)
        top = body.get("top_logprobs") if chat else body.get("logprobs")
        self.top = int(top) if isinstance(top, int) and not isinstance(top, bool) else 0

    @property
    def completion_tokens(self) -> int:
        return self.count * self.n

    def _echo(self, index: int) -> str:
        return self.prompts[index // self.per_prompt] if self.body.get("echo") else ""

    def _echo_logprobs(self, echo: str) -> dict[str, Any]:
        return {
            "tokens": [echo],
            "token_logprobs": [None],
            "top_logprobs": [None],
            "text_offset": [0],
        }

    def _pieces(self, index: int) -> list[str]:
        form = self.body.get("response_format") or {}
        if form.get("type") in ("json_object", "json_schema"):
            text = _ENCODE(_json_answer(form)).decode()
            return [text[start : start + 8] for start in range(0, len(text), 8)]
        prefix = "" if index == 0 else f"c{index}"
        return [f" {prefix}tok{step}" for step in range(self.count)]

    def _logprobs(self, piece: str, offset: int) -> dict[str, Any]:
        if self.chat:
            alternatives = [{"token": f"alt{k}", "logprob": -1.0 - k} for k in range(self.top)]
            entry = {"token": piece, "logprob": -0.5, "bytes": list(piece.encode())}
            return {"content": [entry | {"top_logprobs": alternatives}]}
        return {
            "tokens": [piece],
            "token_logprobs": [-0.5],
            "top_logprobs": [{piece: -0.5}],
            "text_offset": [offset],
        }

    def _calls(self) -> list[str]:
        """The tool call's arguments, in two fragments."""
        assert self.tool is not None
        names = (self.tool.get("parameters") or {}).get("properties") or {}
        arguments = _ENCODE(dict.fromkeys(names, "standin")).decode()
        half = len(arguments) // 2
        return [arguments[:half], arguments[half:]]

    def chunks(self) -> Iterator[list[dict[str, Any]]]:
        """The stream's choices, one chunk per step of every choice."""
        for index in range(self.n):
            if self.chat:
                role: dict[str, Any] = {"role": "assistant", "content": ""}
                yield [{"index": index, "delta": role, "finish_reason": None}]
            if self.tool is not None and self.chat:
                for step, fragment in enumerate(self._calls()):
                    call: dict[str, Any] = {"index": 0, "function": {"arguments": fragment}}
                    if step == 0:
                        call |= {"id": f"call_{index}", "type": "function"}
                        call["function"]["name"] = self.tool["name"]
                    delta = {"tool_calls": [call]}
                    yield [{"index": index, "delta": delta, "finish_reason": None}]
                yield [{"index": index, "delta": {}, "finish_reason": "tool_calls"}]
                continue
            offset = 0
            if echo := self._echo(index):
                first: dict[str, Any] = {"index": index, "text": echo, "finish_reason": None}
                if self.logprobs:
                    first["logprobs"] = self._echo_logprobs(echo)
                yield [first]
                offset = len(echo)
            for piece in self._pieces(index):
                choice: dict[str, Any] = {"index": index, "finish_reason": None}
                choice |= {"delta": {"content": piece}} if self.chat else {"text": piece}
                if self.logprobs:
                    choice["logprobs"] = self._logprobs(piece, offset)
                offset += len(piece)
                yield [choice]
            last: dict[str, Any] = {"index": index, "finish_reason": self.reason}
            yield [last | {"delta": {}} if self.chat else last | {"text": ""}]

    def whole(self) -> list[dict[str, Any]]:
        """The non-streamed choices."""
        choices = []
        for index in range(self.n):
            choice: dict[str, Any] = {"index": index, "finish_reason": self.reason}
            if self.tool is not None and self.chat:
                call = {
                    "id": f"call_{index}",
                    "type": "function",
                    "function": {"name": self.tool["name"], "arguments": "".join(self._calls())},
                }
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
                choices.append(choice | {"message": message, "finish_reason": "tool_calls"})
                continue
            pieces = self._pieces(index)
            echo = self._echo(index)
            text = echo + "".join(pieces)
            choice |= (
                {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            )
            if self.logprobs:
                merged: dict[str, Any] = self._echo_logprobs(echo) if echo else {}
                offset = len(echo)
                for piece in pieces:
                    for key, value in self._logprobs(piece, offset).items():
                        merged[key] = merged.get(key, []) + value
                    offset += len(piece)
                choice["logprobs"] = merged
            choices.append(choice)
        return choices


def _json_answer(form: dict[str, Any]) -> dict[str, Any]:
    """A JSON object for `response_format`: the schema's properties filled by type."""
    schema = (form.get("json_schema") or {}).get("schema") or {}
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {"answer": "standin"}
    by_type: dict[Any, Any] = {"string": "standin", "integer": 1, "number": 0.5, "boolean": True}
    return {
        name: by_type.get(spec.get("type") if isinstance(spec, dict) else None)
        for name, spec in properties.items()
    }


# --- running it -------------------------------------------------------------------------


@dataclass(frozen=True)
class StandinTLS:
    """Serve HTTPS with this certificate and key; clients may present one signed by `ca`."""

    cert: Path
    key: Path
    ca: Path | None = None

    def args(self) -> list[str]:
        found = ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        return found + (["--tls-ca", str(self.ca)] if self.ca is not None else [])

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            context.load_verify_locations(cafile=self.ca)
            context.verify_mode = ssl.CERT_OPTIONAL
        return context


async def serve(
    host: str,
    port: int,
    settings: Settings,
    tls: StandinTLS | None = None,
    extend: Callable[[Standin, web.Application], None] | None = None,
) -> None:
    """Bind, print the listening line, serve until SIGTERM or SIGINT. `extend` adds routes
    (an engine stand-in's own endpoints)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    standin = Standin(settings)
    app = standin.app()
    if extend is not None:
        extend(standin, app)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    context = tls.context() if tls is not None else None
    site = web.SockSite(runner, sock, backlog=2048, ssl_context=context)
    await site.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    url_host = f"[{host}]" if ":" in host else host
    scheme = "https" if tls is not None else "http"
    sys.stdout.write(f"standin listening on {scheme}://{url_host}:{bound}\n")
    sys.stdout.flush()
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.standin", description="A stand-in OpenAI-compatible server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    parser.add_argument("--token-ms", type=float, default=0.0, help="delay between tokens")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per completion")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    parser.add_argument("--model", default="standin-model", help="the model id in /v1/models")
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="... and this private key (PEM)")
    parser.add_argument("--tls-ca", type=Path, help="accept client certificates of this CA")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = None if args.tls_cert is None else StandinTLS(args.tls_cert, args.tls_key, args.tls_ca)
    settings = Settings(
        ttft_ms=args.ttft_ms,
        token_ms=args.token_ms,
        tokens=args.tokens,
        model=args.model,
        api_key=args.api_key,
    )
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, present with uvicorn[standard]
    except ImportError:
        asyncio.run(serve(args.host, args.port, settings, tls))
    else:
        uvloop.run(serve(args.host, args.port, settings, tls))


@dataclass
class RunningStandin:
    """A stand-in process: `url` is the server root; the OpenAI API is under `v1`."""

    url: str
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    # What verifies its certificate when it serves HTTPS (a context trusting its CA).
    verify: ssl.SSLContext | bool = True

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        reply = httpx.get(f"{self.url}/stats", timeout=10, verify=self.verify)
        result: dict[str, Any] = reply.json()
        return result

    def control(self, **settings: object) -> dict[str, Any]:
        reply = httpx.post(f"{self.url}/control", json=settings, timeout=10, verify=self.verify)
        result: dict[str, Any] = reply.json()
        return result

    def stop(self) -> None:
        """SIGTERM, then wait; a no-op when it has already exited."""
        stop_process(self.process)


@contextlib.contextmanager
def run_standin(
    *,
    ttft_ms: float = 0,
    token_ms: float = 0,
    tokens: int = 8,
    api_key: str | None = None,
    model: str = "standin-model",
    host: str = "127.0.0.1",
    ready_timeout: float = 30.0,
    tls: StandinTLS | None = None,
    verify: ssl.SSLContext | bool = True,
) -> Iterator[RunningStandin]:
    """Start the stand-in on an ephemeral port, wait for /readyz, stop it with SIGTERM.

    With `tls` it serves HTTPS; `verify` is what checks its certificate."""
    command = [sys.executable, "-m", "tests.standin", "--host", host, "--port", "0"]
    command += ["--ttft-ms", str(ttft_ms), "--token-ms", str(token_ms), "--tokens", str(tokens)]
    command += ["--model", model]
    if api_key is not None:
        command += ["--api-key", api_key]
    if tls is not None:
        command += tls.args()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    found = threading.Event()
    urls: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if not urls and (match := _LISTENING.search(line)):
                urls.append(match["url"])
                found.set()
        found.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    standin: RunningStandin | None = None
    try:
        found.wait(ready_timeout)
        if not urls:
            raise RuntimeError("the stand-in did not start:\n" + "".join(output))
        standin = RunningStandin(urls[0], process, output, verify)
        _wait_ready(standin, ready_timeout)
        yield standin
    finally:
        if standin is not None:
            standin.stop()
        elif process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def _wait_ready(standin: RunningStandin, timeout: float) -> None:
    wait_for(lambda: _ready(standin), timeout=timeout)


def _ready(standin: RunningStandin) -> bool:
    if standin.process.poll() is not None:
        raise RuntimeError("the stand-in exited:\n" + "".join(standin.output))
    try:
        reply = httpx.get(f"{standin.url}/readyz", timeout=2, verify=standin.verify)
    except httpx.TransportError:
        return False
    return reply.status_code == 200


if __name__ == "__main__":
    main()
