"""Forwarding a request to a node: selection, retries the request cannot have caused, and
relaying.

The hot path uses `HttpClient` (`federation/_private/http_client.py`), a lean HTTP/1.1
client over the event loop: aiohttp's client, several times faster than httpx's default
transport, still cost about 150 µs of CPU a request more (see docs/architecture.md); aiohttp
stays for probes and evidence exports. A request is sent on to the next candidate in the
same residency set, at most `max_retries` times, only when the failure cannot be the
request's doing: the node refused the connection or did not accept it in time (the request
never reached it), answered 503 (alive, busy), or was declared down by missed heartbeats
while the request waited (once per request). A node that fails while it holds the request
(reset, closed, silent past the read timeout), or answers 502/504, is not replayed
elsewhere: a request that kills a node must not take the next one down too. Once bytes have
reached the client a failure ends the stream with an error frame in the OpenAI shape
instead.

The router always asks streaming nodes for the usage chunk: it meters and settles budgets
from it, and strips it again when the client did not ask for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import aiohttp
import msgspec
from litestar import MediaType, Response
from litestar.datastructures import MutableScopeHeaders
from litestar.response.base import ASGIResponse
from litestar.utils.helpers import get_enum_string_value

from compliance import Recorder
from federation import (
    ASSERTION_HEADER,
    ENCODER,
    FLEET_REQUEST_HEADER,
    NOT_ROUTED,
    PROMPT_TOKENS_HEADER,
    Admission,
    APIError,
    AssertionSigner,
    Children,
    ClosingStream,
    ErrorDetail,
    ErrorResponse,
    Gate,
    HttpClient,
    HttpClientError,
    HttpResponse,
    InvalidRequestError,
    Principal,
    ReportedUsage,
    RequestContext,
    RequestRecord,
    UnreachedError,
    child_span,
    decode_request,
    end_span,
    node_dns_name,
    receipt_headers,
    span_id_of,
)
from router._private.config import RouterConfig
from router._private.errors import BackendCrashedError, BackendUnavailableError, NoBackendError
from router._private.fleet import Fleet, Node
from router._private.metrics import RouterMetrics

if TYPE_CHECKING:
    from litestar import Litestar, Request
    from litestar.background_tasks import BackgroundTask, BackgroundTasks
    from litestar.datastructures import Cookie
    from litestar.types import TypeEncodersMap
    from opentelemetry.trace import Span

log = logging.getLogger("palisade.router")
T = TypeVar("T")

# A node answering 503 is alive and says it cannot take this request now: try another.
_BUSY = 503
# The node's engine or upstream failed, or timed out, on this request: not replayed (the
# request may be the cause), but counted towards the node's ejection.
_GATEWAY_FAILURES = frozenset({502, 504})
# Idle pooled connections are dropped before the appliance's own keep-alive (`[server]
# keep_alive_s`, 5 s) closes them, so a request is never written onto a connection the node
# is closing: that failure would look like a node failing while it held the request.
_KEEPALIVE_S = 4.0
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]"
_BODILESS = frozenset({204, 304})
_ERROR_FRAME = b'data: {"error"'
_SERVER_ERROR = 500


class _UsageCarrier(msgspec.Struct):
    """The only fields the router reads from a node's reply (the rest is relayed as is)."""

    usage: ReportedUsage | None = None
    choices: list[msgspec.Raw] = msgspec.field(default_factory=list)


_USAGE = msgspec.json.Decoder(_UsageCarrier)
_ANY_JSON: msgspec.json.Decoder[Any] = msgspec.json.Decoder()


# Whether a failure can have been caused by the request: `unreached` (it never got there),
# `silent` (the node was declared down by missed heartbeats while the request waited: a
# frozen or cut-off node), `crashed` (the node failed while it held the request).
FailureKind = Literal["unreached", "silent", "crashed"]


class _NodeFailedError(Exception):
    """A node failed before its answer was complete (internal: becomes a retry, a 502 or a
    frame). The message is safe to show the client; the cause goes to the log only."""

    def __init__(self, reason: str, kind: FailureKind = "crashed") -> None:
        super().__init__(reason)
        self.kind: FailureKind = kind


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
    # The device classes to try, in order, when not the router's (a canary's pinned one).
    preference: Sequence[str] | None = None
    # The client request it serves (its id and trace go on to the node), if made by one.
    context: RequestContext | None = None
    tried: list[str] = field(default_factory=list)
    # A stream being relayed settles the call when it closes; otherwise `Forwarder.accounting`
    # does, on whatever way out. `settled` makes the second settlement a no-op.
    relayed: bool = False
    settled: bool = False


@dataclass(slots=True)
class _Refusal:
    """A node's 503 answer, kept in case every candidate answers the same."""

    node: Node
    status: int
    body: bytes
    retry_after: str | None


@dataclass(slots=True, eq=False)
class _Relayed:
    """A node's stream being relayed to the client, and what it has produced so far."""

    node: Node
    call: Call
    reply: HttpResponse
    prompt_tokens: int
    produced: int = 0  # events relayed with text (see `_text_events`)
    usage: ReportedUsage | None = None
    status: str = "cancelled"  # until the stream ends otherwise
    span: Span | None = None  # the attempt's, when traced: it ends with the stream
    complete: bool = False  # read to its end
    closed: bool = False
    watchdog: asyncio.Future[object] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def cut(self, _: object) -> None:
        self.reply.close()


class _Accounting:
    """`Forwarder.accounting`: a plain context manager (no generator) on the hot path."""

    __slots__ = ("_call", "_forwarder")

    def __init__(self, forwarder: Forwarder, call: Call) -> None:
        self._forwarder = forwarder
        self._call = call

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        self._forwarder.settle_exit(self._call, exc)


class RelayedResponse(Response[bytes]):
    """A node's answer (or refusal) relayed to the client: its body is bytes already, so it
    goes to the ASGI server as it is, with its headers encoded once, instead of through
    Litestar's general rendering and header mapping: about 20 of the 55-65 µs of CPU that
    Litestar spends on a request on the development machine. Anything that path does not
    cover (cookies, background tasks, HEAD, bodiless statuses) takes Litestar's own."""

    def to_asgi_response(
        self,
        app: Litestar | None,
        request: Request[Any, Any, Any],
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Iterable[Cookie] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: MediaType | str | None = None,
        status_code: int | None = None,
        type_encoders: TypeEncodersMap | None = None,
    ) -> ASGIResponse:
        status = self.status_code or status_code or 200
        extras = background or self.background or cookies or self.cookies or headers
        plain = isinstance(self.content, bytes) and status >= 200 and status not in _BODILESS
        if not plain or extras or encoded_headers or is_head_response:
            return super().to_asgi_response(
                app,
                request,
                background=background,
                cookies=cookies,
                encoded_headers=encoded_headers,
                headers=headers,
                is_head_response=is_head_response,
                media_type=media_type,
                status_code=status_code,
                type_encoders=type_encoders,
            )
        media = get_enum_string_value(self.media_type or media_type or MediaType.JSON)
        return _BytesASGIResponse(status, self.content, media, self.headers)


class _BytesASGIResponse(ASGIResponse):
    """What `ASGIResponse` sends for a bytes body with plain headers, built directly."""

    __slots__ = ()

    def __init__(self, status: int, body: bytes, media_type: str, headers: dict[str, Any]) -> None:
        raw = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in headers.items()
        ]
        named = {name for name, _ in raw}
        if b"content-type" not in named:
            if media_type.startswith("text/"):
                media_type += "; charset=utf-8"
            raw.append((b"content-type", media_type.encode("latin-1")))
        if b"content-length" not in named:
            raw.append((b"content-length", str(len(body)).encode("latin-1")))
        self.headers = MutableScopeHeaders({"headers": raw})
        self.status_code = status
        self.body = body
        self.content_length = len(body)
        self.background = None
        self._encoded_cookies = ()
        self.encoding = "utf-8"
        self.is_head_response = False


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
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._config = config
        self._fleet = fleet
        self._signer = signer
        self._metrics = metrics
        self.gate = gate
        self._recorder = recorder
        # The router's client context (its fleet certificate, the fleet CA and CRL): every
        # https node is reached with it and must present the certificate of its node id.
        self.tls = tls
        self._session: aiohttp.ClientSession | None = None
        self._client: HttpClient | None = None
        self._attempts = Children(metrics.attempts)  # by node and outcome
        self._failovers = Children(metrics.failovers)
        self._device_failovers = Children(metrics.device_failovers)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Forwarder.start() has not run")
        return self._session

    @property
    def client(self) -> HttpClient:
        if self._client is None:
            raise RuntimeError("Forwarder.start() has not run")
        return self._client

    async def start(self) -> None:
        proxy = self._config.proxy
        self._client = HttpClient(
            tls=self.tls,
            connect_timeout_s=proxy.connect_timeout_s,
            read_timeout_s=proxy.read_timeout_s,
            keepalive_s=_KEEPALIVE_S,
            limit=proxy.max_connections,
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=proxy.max_connections,
                limit_per_host=0,
                keepalive_timeout=_KEEPALIVE_S,
                ssl=self.tls if self.tls is not None else True,
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
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def probe(self, node: Node, timeout_s: float) -> bool | None:
        """`GET /readyz` within `timeout_s`: True if ready, None if alive but still loading
        (503), False if it failed (refused, reset, timed out, another status)."""
        try:
            async with self.session.get(
                node.url + "/readyz",
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                server_hostname=tls_name(node),
            ) as reply:
                await reply.read()
        except (aiohttp.ClientError, TimeoutError):
            return False
        if reply.status == 503:
            return None
        return reply.status == 200

    # --- one request ------------------------------------------------------------------------

    async def forward(self, call: Call) -> Response[Any]:
        payload = call.body  # already with `include_usage` for streams (see `with_usage`)
        preference = call.preference or self._config.preference(call.model)
        refusal: _Refusal | None = None
        failures: list[FailureKind] = []
        why: str = ""  # why the last node did not answer: the failover's reason
        for attempt in range(1 + self._config.proxy.max_retries):
            node = self._pick(call, preference)
            if node is None:
                break
            if attempt:
                self._metrics.retries.inc()
                self._failovers(why).inc()
            call.tried.append(node.id)
            span = child_span(call.context, "attempt", "client", _attempted_attributes(node))
            outcome = await self._attempt(node, call, payload, span)
            if span is not None and not isinstance(outcome, ClosingStream):
                _end_attempt(span, outcome)
            if isinstance(outcome, Response):
                self._count_device_failover(call, node, preference)
                return outcome
            if isinstance(outcome, _Refusal):
                refusal, why = outcome, "overloaded"
                continue
            why = outcome.kind
            failures.append(outcome.kind)
            if not may_replay(failures):
                self._settle(call, node, None, status="backend_crashed")
                raise BackendCrashedError(node.id, node.region, call.model, str(outcome))
        if refusal is not None:
            self._settle(call, refusal.node, None, status=f"http_{refusal.status}")
            return self._refusal_response(call, refusal)
        if self._fleet.pick(call.model, call.regions, preference, call.tried, mark=False):
            self._settle(call, None, None, status="backend_unavailable")
            raise BackendUnavailableError(call.model, call.tried)
        self._settle(call, None, None, status="no_backend_in_region")
        self._metrics.no_backend.labels(call.model).inc()
        raise NoBackendError(call.model, call.regions, tried=len(call.tried))

    def _count_device_failover(self, call: Call, node: Node, preference: Sequence[str]) -> None:
        """Count a request served below the most preferred device class declared for it."""
        fallback = self._fleet.device_fallback(call.model, call.regions, preference, node)
        if fallback is not None:
            self._device_failovers(*fallback).inc()

    def _pick(self, call: Call, preference: Sequence[str]) -> Node | None:
        """The next node for `call`; a traced call records the choice and the candidates."""
        span = child_span(call.context, "select_node")
        node = self._fleet.pick(call.model, call.regions, preference, call.tried)
        if span is not None:
            candidates = [
                other.id
                for other in self._fleet.nodes.values()
                if other.region in call.regions and call.model in other.models
            ]
            span.set_attributes(
                {
                    "palisade.model": call.model,
                    "palisade.regions": sorted(call.regions),
                    "palisade.preference": list(preference),
                    "palisade.candidates": candidates,
                    "palisade.tried": list(call.tried),
                    "palisade.chosen": node.id if node is not None else "",
                }
            )
            end_span(span, None if node is not None else "no_node")
        return node

    async def _attempt(
        self, node: Node, call: Call, payload: bytes, span: Span | None = None
    ) -> Response[Any] | _Refusal | _NodeFailedError:
        """The node's answer as the client's response, its 503 refusal, or how it failed."""
        headers = {
            "Content-Type": "application/json",
            ASSERTION_HEADER: self._signer.assertion(call.principal, node.id),
            FLEET_REQUEST_HEADER: call.id,
        }
        if call.context is not None:  # its request id and trace, the attempt as the parent
            headers |= call.context.forwarded(span_id_of(span) if span is not None else None)
        node.in_flight += 1
        handed_off = False
        try:
            reply = await self._guarded(
                node,
                self.client.request(
                    "POST",
                    node.url,
                    call.endpoint,
                    body=payload,
                    headers=headers,
                    server_hostname=tls_name(node),
                ),
            )
            if reply.status == _BUSY:
                return await self._refused(node, reply)
            if call.stream and reply.status == 200:
                handed_off = True
                relay = self._open_relay(node, call, reply)
                relay.span = span
                return ClosingStream(
                    self._relay(relay),
                    on_close=lambda: self._close_relay(relay),
                    media_type="text/event-stream",
                    headers=self._receipt(node, call) | _SSE_HEADERS,
                )
            data = await self._body(node, reply)
        except _NodeFailedError as exc:
            self._fleet.failed(node)
            self._attempted(node, "failed")
            if exc.kind == "crashed":
                log.warning(
                    "node %s failed while handling request %s: %s (%r)",
                    node.id,
                    call.id,
                    exc,
                    exc.__cause__,
                )
            else:
                log.info("node %s failed before answering: %s (%r)", node.id, exc, exc.__cause__)
            return exc
        finally:
            if not handed_off:
                node.in_flight -= 1
        if reply.status in _GATEWAY_FAILURES:  # relayed as is, and held against the node
            self._fleet.failed(node)
            self._attempted(node, "failed")
        else:
            self._fleet.succeeded(node)
            self._attempted(node, "ok")
        usage = _usage_of(data) if reply.status == 200 else None
        status = "ok" if reply.status == 200 else f"http_{reply.status}"
        self._settle(call, node, usage, status=status)
        headers = self._receipt(node, call)
        if (retry_after := reply.headers.get("Retry-After")) is not None:
            headers["Retry-After"] = retry_after
        media_type = reply.headers.get("Content-Type", MediaType.JSON)
        return RelayedResponse(
            data, status_code=reply.status, media_type=media_type, headers=headers
        )

    async def _refused(self, node: Node, reply: HttpResponse) -> _Refusal:
        data = await self._body(node, reply)
        self._attempted(node, "overloaded")
        return _Refusal(node, reply.status, data, reply.headers.get("Retry-After"))

    async def _body(self, node: Node, reply: HttpResponse) -> bytes:
        """The whole body; a step of its own (a task) only when part of it is still due."""
        if reply.complete:  # it came with the head, as a small answer does: nothing to wait for
            return await reply.read()
        return await self._guarded(node, reply.read())

    async def _guarded(self, node: Node, awaitable: Awaitable[T]) -> T:
        """Await a step of talking to `node`; if the node is declared down meanwhile, give up."""
        step = asyncio.ensure_future(awaitable)
        node.waiting.add(step)
        try:
            return await step
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if step.cancelled() and (task is None or not task.cancelling()):
                raise _NodeFailedError(
                    "it stopped answering and was declared down", "silent"
                ) from None
            raise
        except (HttpClientError, TimeoutError) as exc:
            raise classify(exc, self._config.proxy.read_timeout_s) from exc
        finally:
            node.waiting.discard(step)

    def _open_relay(self, node: Node, call: Call, reply: HttpResponse) -> _Relayed:
        """The node's stream now belongs to the client's response: it settles the call."""
        call.relayed = True
        relay = _Relayed(node, call, reply, _count(reply.headers.get(PROMPT_TOKENS_HEADER)))
        # Cancelled by the fleet when the node goes down: cutting the connection ends the
        # read in `_relay`, and the client gets an error frame instead of waiting.
        relay.watchdog.add_done_callback(relay.cut)
        node.streams.add(relay.watchdog)
        return relay

    async def _relay(self, relay: _Relayed) -> AsyncIterator[bytes]:
        """SSE frames as they arrive; an error frame if the node fails part-way."""
        node, call = relay.node, relay.call
        try:
            pending = b""
            finished = failed = False
            async for data in relay.reply.iter_any():
                pending += data
                end = pending.rfind(b"\n\n")
                if end < 0:
                    continue
                out, pending = pending[: end + 2], pending[end + 2 :]
                relay.produced += _text_events(out)
                if b'"usage"' in out:
                    out, found = _take_usage(out, keep=call.wants_usage)
                    relay.usage = found or relay.usage
                failed = failed or _ERROR_FRAME in out
                finished = finished or failed or _DONE in out
                if out:
                    yield out
            if not finished:
                raise _truncated()
            relay.complete = True
            relay.status = "error" if failed else "ok"  # "error": the node's own error event
            self._fleet.succeeded(node)
            self._attempted(node, "ok")
        except (_NodeFailedError, HttpClientError, TimeoutError) as exc:
            relay.status = "backend_failed"
            self._fleet.failed(node)
            self._attempted(node, "failed")
            self._metrics.midstream_failures.inc()
            log.warning("node %s failed mid-stream: %s", node.id, exc)
            yield _error_frame(node, call)
        finally:
            self._close_relay(relay)

    def _close_relay(self, relay: _Relayed) -> None:
        """Once, however the stream ended (also if it never started): release the node's
        response and settle. A client that left is billed the prompt the node reported and
        the text events relayed, when no usage chunk came."""
        if relay.closed:
            return
        relay.closed = True
        node = relay.node
        node.streams.discard(relay.watchdog)
        node.in_flight -= 1
        relay.watchdog.remove_done_callback(relay.cut)
        if relay.complete:
            relay.reply.release()  # read to the end: the connection goes back to the pool
        else:
            relay.reply.close()  # a client that hung up: the node sees it and stops generating
        usage = relay.usage or ReportedUsage(relay.prompt_tokens, relay.produced)
        self._settle(relay.call, node, usage, status=relay.status)
        if relay.span is not None:
            relay.span.set_attribute("palisade.outcome", relay.status)
            end_span(relay.span, None if relay.status == "ok" else relay.status)

    # --- receipts, metering, errors ------------------------------------------------------------

    def _attempted(self, node: Node, outcome: str) -> None:
        self._attempts(node.id, outcome).inc()

    def _receipt(self, node: Node, call: Call) -> dict[str, str]:
        return receipt_headers(node.region, node.id, node.device(call.model)) | call.headers

    def _refusal_response(self, call: Call, refusal: _Refusal) -> Response[Any]:
        headers = self._receipt(refusal.node, call)
        if refusal.retry_after is not None:
            headers["Retry-After"] = refusal.retry_after
        return RelayedResponse(
            refusal.body, status_code=refusal.status, media_type=MediaType.JSON, headers=headers
        )

    def accounting(self, call: Call) -> _Accounting:
        """Own `call`'s admission: every way out of this `with` block settles it exactly once.

        The paths through `forward` settle with what they know; a stream handed to the
        client settles when it closes (`_close_relay`). Anything else (an exception, the
        request task cancelled, a path that did not settle) releases the reservation here.
        """
        return _Accounting(self, call)

    def settle_exit(self, call: Call, exc: BaseException | None) -> None:
        """Settle `call` (with nothing used) if it left `accounting` unsettled and unrelayed."""
        if not call.relayed:
            self._settle(call, None, None, status="error" if exc is None else _exit_status(exc))

    def _settle(
        self, call: Call, node: Node | None, usage: ReportedUsage | None, *, status: str
    ) -> None:
        """Budget, usage record and audit row, once per call (later calls do nothing)."""
        if call.settled:
            return
        call.settled = True
        prompt = usage.prompt_tokens if usage is not None else 0
        completion = usage.completion_tokens if usage is not None else 0
        cached = usage.cached_tokens if usage is not None else 0
        region = node.region if node is not None else NOT_ROUTED
        node_id = node.id if node is not None else NOT_ROUTED
        if self.gate is not None and call.admission is not None:
            served = node.models.get(call.model) if node is not None else None
            answered = int(usage is not None)  # a per-request price is due once a node answered
            cost = 0.0
            if served is not None:
                cost = served.pricing.cost(prompt, completion, answered, cached)
            self.gate.settle(
                call.admission,
                model=call.model,
                input_tokens=prompt,
                output_tokens=completion,
                status=status,
                cost=cost,
                region=region,
                node=node_id,
                cached_tokens=cached,
            )
        if self._recorder is not None:
            principal = call.principal
            record = RequestRecord(
                id=call.id,
                org=principal.org,
                user=principal.user,
                key_id=principal.key_id,
                model=call.model,
                region=region,
                node=node_id,
                input_tokens=prompt,
                output_tokens=completion,
                status=status,
                tried=list(call.tried),
            )
            self._recorder.request(principal.logging_mode, record)


def _attempted_attributes(node: Node) -> dict[str, str]:
    return {"palisade.node": node.id, "palisade.region": node.region, "url.full": node.url}


def _end_attempt(span: Span, outcome: Response[Any] | _Refusal | _NodeFailedError) -> None:
    """End an attempt's span with how it went: the node's status, or how it failed."""
    if isinstance(outcome, _NodeFailedError):
        span.set_attribute("palisade.outcome", f"failed_{outcome.kind}")
        end_span(span, f"node_failed_{outcome.kind}")
        return
    status = (outcome.status_code or 200) if isinstance(outcome, Response) else outcome.status
    span.set_attribute("http.response.status_code", status)
    end_span(span, f"http_{status}" if status >= _SERVER_ERROR else None)


def tls_name(node: Node) -> str | None:
    """The name a node's certificate must carry: its node id's fleet DNS name, whatever
    address it advertised (None for a plain-HTTP lab node)."""
    return node_dns_name(node.id) if node.url.startswith("https:") else None


def classify(exc: HttpClientError | TimeoutError, read_timeout_s: float) -> _NodeFailedError:
    """What a transport failure says about the request: only a connection that was never
    made proves the node did not get it."""
    if isinstance(exc, UnreachedError):
        return _NodeFailedError("the connection could not be made", "unreached")
    if isinstance(exc, TimeoutError):
        return _NodeFailedError(f"it sent nothing for {read_timeout_s:g} s")
    return _NodeFailedError("the connection failed before the answer was complete")


def may_replay(failures: Sequence[FailureKind]) -> bool:
    """Whether a request that failed in these ways may go to another node: never after a
    node failed while holding it; after one node went silent with it, but not two."""
    return "crashed" not in failures and failures.count("silent") <= 1


def with_usage(body: bytes) -> bytes:
    """The body with `stream_options.include_usage` switched on (the router meters from it).

    Called before admission: a body the router cannot decode in full (a number out of
    range, a string that is not UTF-8) or encode again is the client's 400, not a 500.
    """
    try:
        request = _ANY_JSON.decode(body)
    except msgspec.ValidationError as exc:  # a number out of range: there is no field to name
        problem = str(exc).split(" - at ", 1)[0]
        raise InvalidRequestError(
            f"The request body holds a value this server cannot read ({problem}).",
            code="invalid_value",
        ) from exc
    except (msgspec.DecodeError, RecursionError):
        request = decode_request(body, _ANY_JSON)  # raises the usual 400 (invalid_json)
    if not isinstance(request, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    options = request.get("stream_options")
    options = options if isinstance(options, dict) else {}
    request["stream_options"] = {**options, "include_usage": True}
    try:
        return msgspec.json.encode(request)
    except (msgspec.EncodeError, ValueError, OverflowError) as exc:
        raise InvalidRequestError(
            f"The request body cannot be forwarded: {exc}.", code="invalid_value"
        ) from exc


def _text_events(frames: bytes) -> int:
    """Events in `frames` that carry text: a lower bound on the completion tokens in them
    (chat deltas and completion chunks; the empty role and finish chunks do not count)."""
    chat = frames.count(b'"content":"') - frames.count(b'"content":""')
    completion = frames.count(b'"text":"') - frames.count(b'"text":""')
    return chat + completion


def _count(header: str | None) -> int:
    """A token count from a node's header; 0 when absent or not a count."""
    if header is None or not header.isdecimal():
        return 0
    return int(header)


def _exit_status(exc: BaseException) -> str:
    """The usage record's status for a request that ended with `exc`."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, APIError):
        return exc.code
    return "error"


def _truncated() -> _NodeFailedError:
    return _NodeFailedError("the stream ended before `data: [DONE]`")


def _usage_of(data: bytes) -> ReportedUsage | None:
    try:
        return _USAGE.decode(data).usage
    except msgspec.MsgspecError:
        return None


def _take_usage(frames: bytes, *, keep: bool) -> tuple[bytes, ReportedUsage | None]:
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
