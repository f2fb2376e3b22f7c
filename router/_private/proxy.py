"""Forwarding a request to a node: selection, retries before the first byte, and relaying.

The hot path uses aiohttp's client (measured several times faster than httpx's default
transport as a proxy client on this class of machine; see docs/architecture.md). A node
that refuses, resets, times out, answers 502/503/504, or is declared down while the
router still waits for its first byte, is replaced by the next candidate in the same
residency set, at most `max_retries` times. Once bytes have reached the client a failure
ends the stream with an error frame in the OpenAI shape instead.

The router always asks streaming nodes for the usage chunk: it meters and settles budgets
from it, and strips it again when the client did not ask for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import msgspec
from litestar import MediaType, Response
from litestar.response import Stream

from compliance import Recorder
from federation import (
    ASSERTION_HEADER,
    ENCODER,
    Admission,
    AssertionSigner,
    ErrorDetail,
    ErrorResponse,
    Gate,
    Principal,
    Usage,
)
from router._private.config import RouterConfig
from router._private.errors import BackendUnavailableError, NoBackendError
from router._private.fleet import Fleet, Node
from router._private.metrics import RouterMetrics

log = logging.getLogger("palisade.router")
T = TypeVar("T")

_RETRYABLE = frozenset({502, 503, 504})
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]"
_ERROR_FRAME = b'data: {"error"'


class _UsageCarrier(msgspec.Struct):
    """The only fields the router reads from a node's reply (the rest is relayed as is)."""

    usage: Usage | None = None
    choices: list[msgspec.Raw] = msgspec.field(default_factory=list)


_USAGE = msgspec.json.Decoder(_UsageCarrier)


class _NodeFailedError(Exception):
    """A node failed before its answer was complete (internal: becomes a retry or a frame)."""


@dataclass(slots=True)
class Call:
    """One client request on its way through the router."""

    endpoint: str
    body: bytes
    model: str
    principal: Principal
    regions: frozenset[str]
    stream: bool
    wants_usage: bool
    admission: Admission | None
    headers: dict[str, str]
    id: str = field(default_factory=lambda: f"route-{os.urandom(12).hex()}")
    tried: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Refusal:
    """A node's 502/503/504 answer, kept in case every candidate answers the same."""

    node: Node
    status: int
    body: bytes
    retry_after: str | None


class Forwarder:
    def __init__(
        self,
        config: RouterConfig,
        fleet: Fleet,
        signer: AssertionSigner,
        metrics: RouterMetrics,
        *,
        gate: Gate | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self._config = config
        self._fleet = fleet
        self._signer = signer
        self._metrics = metrics
        self.gate = gate
        self._recorder = recorder
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Forwarder.start() has not run")
        return self._session

    async def start(self) -> None:
        proxy = self._config.proxy
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=proxy.max_connections, limit_per_host=0, keepalive_timeout=30
            ),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=proxy.connect_timeout_s,
                sock_read=proxy.read_timeout_s,
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def probe(self, node: Node, timeout_s: float) -> bool | None:
        """`GET /readyz` within `timeout_s`: True if ready, None if alive but still loading
        (503), False if it failed (refused, reset, timed out, another status)."""
        try:
            async with self.session.get(
                node.url + "/readyz", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as reply:
                await reply.read()
        except (aiohttp.ClientError, TimeoutError):
            return False
        if reply.status == 503:
            return None
        return reply.status == 200

    # --- one request ------------------------------------------------------------------------

    async def forward(self, call: Call) -> Response[Any]:
        payload = _with_usage(call.body) if call.stream and not call.wants_usage else call.body
        preference = self._config.preference(call.model)
        refusal: _Refusal | None = None
        for attempt in range(1 + self._config.proxy.max_retries):
            node = self._fleet.pick(call.model, call.regions, preference, call.tried)
            if node is None:
                break
            if attempt:
                self._metrics.retries.inc()
            call.tried.append(node.id)
            outcome = await self._attempt(node, call, payload)
            if isinstance(outcome, Response):
                return outcome
            refusal = outcome or refusal
        if refusal is not None:
            self._settle(call, refusal.node, None, status=f"http_{refusal.status}")
            return self._refusal_response(call, refusal)
        if self._fleet.pick(call.model, call.regions, preference, call.tried, mark=False):
            self._settle(call, None, None, status="backend_unavailable")
            raise BackendUnavailableError(call.model, call.tried)
        self._settle(call, None, None, status="no_backend_in_region")
        self._metrics.no_backend.labels(call.model).inc()
        raise NoBackendError(call.model, call.regions, tried=len(call.tried))

    async def _attempt(
        self, node: Node, call: Call, payload: bytes
    ) -> Response[Any] | _Refusal | None:
        """The node's answer as the client's response, its 5xx refusal, or None if it failed."""
        headers = {
            "Content-Type": "application/json",
            ASSERTION_HEADER: self._signer.assertion(call.principal, node.id),
        }
        node.in_flight += 1
        handed_off = False
        try:
            reply = await self._guarded(
                node, self.session.post(node.url + call.endpoint, data=payload, headers=headers)
            )
            if reply.status in _RETRYABLE:
                return await self._refused(node, reply)
            if call.stream and reply.status == 200:
                handed_off = True
                stream = self._relay(node, call, reply)
                headers = self._receipt(node, call) | _SSE_HEADERS
                return Stream(stream, media_type="text/event-stream", headers=headers)
            data = await self._guarded(node, reply.read())
        except _NodeFailedError as exc:
            self._fleet.failed(node)
            self._metrics.attempts.labels(node.id, "failed").inc()
            log.info("node %s failed before answering: %s", node.id, exc)
            return None
        finally:
            if not handed_off:
                node.in_flight -= 1
        self._fleet.succeeded(node)
        self._metrics.attempts.labels(node.id, "ok").inc()
        usage = _usage_of(data) if reply.status == 200 else None
        status = "ok" if reply.status == 200 else f"http_{reply.status}"
        self._settle(call, node, usage, status=status)
        headers = self._receipt(node, call)
        if (retry_after := reply.headers.get("Retry-After")) is not None:
            headers["Retry-After"] = retry_after
        media_type = reply.headers.get("Content-Type", MediaType.JSON)
        return Response(data, status_code=reply.status, media_type=media_type, headers=headers)

    async def _refused(self, node: Node, reply: aiohttp.ClientResponse) -> _Refusal:
        data = await self._guarded(node, reply.read())
        if reply.status == 503:
            self._metrics.attempts.labels(node.id, "overloaded").inc()
        else:
            self._fleet.failed(node)
            self._metrics.attempts.labels(node.id, "failed").inc()
        return _Refusal(node, reply.status, data, reply.headers.get("Retry-After"))

    async def _guarded(self, node: Node, awaitable: Awaitable[T]) -> T:
        """Await a step of talking to `node`; if the node is declared down meanwhile, give up."""
        step = asyncio.ensure_future(awaitable)
        node.waiting.add(step)
        try:
            return await step
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if step.cancelled() and (task is None or not task.cancelling()):
                raise _NodeFailedError("declared down while the router waited for it") from None
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _NodeFailedError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            node.waiting.discard(step)

    async def _relay(
        self, node: Node, call: Call, reply: aiohttp.ClientResponse
    ) -> AsyncIterator[bytes]:
        """SSE frames as they arrive; an error frame if the node fails part-way."""
        usage: Usage | None = None
        frames = 0
        status = "cancelled"
        # Cancelled by the fleet when the node goes down: cutting the connection ends the
        # read below, and the client gets an error frame instead of waiting for a timeout.
        watchdog: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        def cut(_: object) -> None:
            reply.close()

        watchdog.add_done_callback(cut)
        node.streams.add(watchdog)
        try:
            pending = b""
            finished = False
            async for data in reply.content.iter_any():
                pending += data
                end = pending.rfind(b"\n\n")
                if end < 0:
                    continue
                out, pending = pending[: end + 2], pending[end + 2 :]
                frames += out.count(b"\n\n")
                if b'"usage"' in out:
                    out, found = _take_usage(out, keep=call.wants_usage)
                    usage = found or usage
                finished = finished or _DONE in out or _ERROR_FRAME in out
                if out:
                    yield out
            if not finished:
                raise _truncated()
            status = "ok"
            self._fleet.succeeded(node)
            self._metrics.attempts.labels(node.id, "ok").inc()
        except (_NodeFailedError, aiohttp.ClientError, TimeoutError) as exc:
            status = "backend_failed"
            self._fleet.failed(node)
            self._metrics.attempts.labels(node.id, "failed").inc()
            self._metrics.midstream_failures.inc()
            log.warning("node %s failed mid-stream: %s", node.id, exc)
            yield _error_frame(node, call)
        finally:
            node.streams.discard(watchdog)
            node.in_flight -= 1
            watchdog.remove_done_callback(cut)
            if status == "ok":
                reply.release()  # read to the end: the connection goes back to the pool
            else:
                reply.close()  # a client that hung up: the node sees it and stops generating
            if usage is None:
                usage = Usage(0, frames, frames)  # no usage chunk: count what was relayed
            self._settle(call, node, usage, status=status)

    # --- receipts, metering, errors ------------------------------------------------------------

    def _receipt(self, node: Node, call: Call) -> dict[str, str]:
        headers = {
            "X-Palisade-Region": node.region,
            "X-Palisade-Node": node.id,
            "X-Palisade-Device": node.device_class(call.model),
        }
        return headers | call.headers

    def _refusal_response(self, call: Call, refusal: _Refusal) -> Response[Any]:
        headers = self._receipt(refusal.node, call)
        if refusal.retry_after is not None:
            headers["Retry-After"] = refusal.retry_after
        return Response(
            refusal.body, status_code=refusal.status, media_type=MediaType.JSON, headers=headers
        )

    def _settle(self, call: Call, node: Node | None, usage: Usage | None, *, status: str) -> None:
        prompt = usage.prompt_tokens if usage is not None else 0
        completion = usage.completion_tokens if usage is not None else 0
        if self.gate is not None and call.admission is not None:
            cost = 0.0
            served = node.models.get(call.model) if node is not None else None
            if served is not None:
                pricing = served.pricing
                spent = prompt * pricing.input_per_million + completion * pricing.output_per_million
                cost = round(spent / 1e6, 9)
            self.gate.settle(
                call.admission,
                model=call.model,
                input_tokens=prompt,
                output_tokens=completion,
                status=status,
                cost=cost,
                region=node.region if node is not None else "-",
                node=node.id if node is not None else "-",
            )
        if self._recorder is not None:
            principal = call.principal
            self._recorder.request(
                principal.logging_mode,
                {
                    "id": call.id,
                    "org": principal.org,
                    "user": principal.user,
                    "key_id": principal.key_id,
                    "model": call.model,
                    "region": node.region if node is not None else None,
                    "node": node.id if node is not None else None,
                    "input_tokens": prompt,
                    "output_tokens": completion,
                    "status": status,
                    "tried": list(call.tried),
                },
            )


def _with_usage(body: bytes) -> bytes:
    """The body with `stream_options.include_usage` switched on (the router meters from it)."""
    request = msgspec.json.decode(body)
    options = request.get("stream_options")
    options = options if isinstance(options, dict) else {}
    request["stream_options"] = {**options, "include_usage": True}
    return msgspec.json.encode(request)


def _truncated() -> _NodeFailedError:
    return _NodeFailedError("the stream ended before `data: [DONE]`")


def _usage_of(data: bytes) -> Usage | None:
    try:
        return _USAGE.decode(data).usage
    except msgspec.MsgspecError:
        return None


def _take_usage(frames: bytes, *, keep: bool) -> tuple[bytes, Usage | None]:
    """The usage found in `frames`; the usage-only chunk is dropped unless `keep`."""
    found = None
    kept = []
    for frame in frames.split(b"\n\n")[:-1]:
        if b'"usage"' in frame and frame.startswith(b"data:"):
            try:
                chunk = _USAGE.decode(frame[5:])
            except msgspec.MsgspecError:
                chunk = None
            if chunk is not None and chunk.usage is not None:
                found = chunk.usage
                if not keep and not chunk.choices:
                    continue
        kept.append(frame + b"\n\n")
    return b"".join(kept), found


def _error_frame(node: Node, call: Call) -> bytes:
    detail = ErrorDetail(
        f"Node `{node.id}` ({node.region}) failed while streaming `{call.model}`; the answer "
        "above is incomplete. Retry the request: the router will pick a healthy node.",
        "server_error",
        "backend_failed",
        None,
    )
    return b"data: " + ENCODER.encode(ErrorResponse(detail)) + b"\n\n"
