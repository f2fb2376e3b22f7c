"""How an inference response ends, whatever ends it, for metering and metrics.

Settling a request's admission exactly once needs the HTTP layer to say, exactly once, that
its response is over. `ClosingStream` runs its `on_close` once however a stream ends: sent
in full, the client gone before or after the first byte, an exception, a cancellation, and
also when its body never started (then the body's own `finally` never runs). `count_exits`
counts the responses of some paths by final status, 499 when the client left before the
response was complete, and logs such departures at INFO: a client hanging up is not a
server error.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from litestar import Request, Response
from litestar.enums import ScopeType
from litestar.exceptions import ClientException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp, Empty, Message, Receive, ReceiveMessage, Scope, Send
from litestar.utils.scope.state import ScopeState

from federation._private.scope_headers import ScopeHeaders

log = logging.getLogger("palisade.http")
CLIENT_GONE = 499  # nginx's "client closed request"
# On an appliance's streamed 200: the prompt's token count (an upper bound when the engine
# does not tokenize), so that the router can bill the prompt of a stream cut short.
PROMPT_TOKENS_HEADER = "X-Palisade-Prompt-Tokens"


class ClientGoneError(Exception):
    """The client hung up before its response was ready (answered 499, nobody reads it)."""


def client_gone_response(_: Request[Any, Any, Any], __: Exception) -> Response[Any]:
    """The exception handler for `ClientGoneError`; `count_exits` logs and counts it."""
    return Response(b"", status_code=CLIENT_GONE)


async def read_body(request: Request[Any, Any, Any]) -> bytes:
    """The request body, as Litestar's `request.body()` reads it (kept for later calls,
    that one's included; 413 past the route's `request_max_body_size`, announced or sent),
    without building the header multidict for its length; `ClientGoneError` if the client
    hangs up before sending all of it (Litestar calls that an internal error)."""
    state = ScopeState.from_scope(request.scope)
    if state.body is not Empty:
        return state.body
    limit = request.route_handler.resolve_request_max_body_size() or math.inf
    announced = ScopeHeaders(request).get("content-length")
    if announced is not None and _length(announced) > limit:
        raise RequestEntityTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestEntityTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = state.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return body


def _length(announced: str) -> int:
    try:
        return int(announced)
    except ValueError:
        raise ClientException(f"Invalid content-length: {announced!r}") from None


class ClosingStream(Stream):
    """A `Stream` whose `on_close` runs exactly once after the response, however it ended."""

    __slots__ = ("on_close",)

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        on_close: Callable[[], None] | None = None,
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self.on_close = on_close

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        inner = super().to_asgi_response(*args, **kwargs)
        return _Closing(inner, self.iterator, self.on_close)


class _Closing(ASGIResponse):
    """Delegates to the streaming response, then closes the body and runs `on_close`."""

    __slots__ = ("_inner", "_iterator", "_on_close")

    def __init__(  # a wrapper: no super().__init__(), the wrapped response is initialised
        self, inner: ASGIResponse, iterator: object, on_close: Callable[[], None] | None
    ) -> None:
        self._inner = inner
        self._iterator = iterator
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._inner(scope, receive, send)
        finally:
            try:
                # A generator left suspended (the client left while a chunk was being
                # sent) would otherwise run its `finally` only when collected.
                close = getattr(self._iterator, "aclose", None)
                if close is not None:
                    await close()
            finally:
                if self._on_close is not None:
                    self._on_close()


def count_exits(
    labels: Mapping[str, str], count: Callable[[str, int, float], None]
) -> Callable[[ASGIApp], ASGIApp]:
    """ASGI middleware: `count(label, status, seconds)` once per request to a path in
    `labels`, `seconds` from its arrival to its end.

    The status is the one sent, or 499 when the client left before the response was
    complete (before it started, or part-way through a stream).
    """

    def middleware(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            label = labels.get(scope.get("path", "")) if scope["type"] == ScopeType.HTTP else None
            if label is None:
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            status = 0
            complete = left = False

            async def watch_send(message: Message) -> None:
                nonlocal status, complete
                if message["type"] == "http.response.start":
                    status = message["status"]
                elif message["type"] == "http.response.body" and not message.get("more_body"):
                    complete = True
                await send(message)

            async def watch_receive() -> ReceiveMessage:
                nonlocal left
                message = await receive()
                if message["type"] == "http.disconnect" and not complete:
                    left = True
                return message

            try:
                await app(scope, watch_receive, watch_send)
            finally:
                final = CLIENT_GONE if left else status or 500
                if final == CLIENT_GONE:
                    log.info("client left %s before the response was complete", scope["path"])
                count(label, final, time.perf_counter() - started)

        return wrapped

    return middleware
