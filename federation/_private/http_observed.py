"""The outermost layer of a server's ASGI app: every HTTP request gets its identity.

`observed(app, ...)` wraps the whole app (outside Litestar, so that 404s and every other
answer are covered): it makes the request's `RequestContext` from its `X-Request-Id` and
`traceparent` headers, puts the id in the response's `X-Request-Id`, and for the inference
paths starts the server span (when tracing is on) and writes the access line (when asked).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from federation._private.request_context import (
    RequestContext,
    TraceParent,
    enter_request,
    leave_request,
    well_formed_request_id,
)
from federation._private.structured_logs import ACCESS_LOGGER
from federation._private.tracing import end_span

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from federation._private.tracing_sdk import Tracing

access_log = logging.getLogger(ACCESS_LOGGER)
_REQUEST_ID = b"x-request-id"
_TRACEPARENT = b"traceparent"
_SERVER_ERROR = 500


def observed(
    app: ASGIApp,
    *,
    routes: Mapping[str, str],
    tracing: Tracing | None = None,
) -> ASGIApp:
    """`app` with request ids on every answer, and spans and access lines for the paths in
    `routes` (path -> the route's name in spans)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        context = _context_of(scope)
        route = routes.get(scope["path"])
        span = None
        if tracing is not None and route is not None:
            method = scope["method"]
            attributes = {"http.request.method": method, "http.route": route}
            span = tracing.serve(context, f"{method} {route}", attributes)
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = _with_request_id(message["headers"], context.request_id)
            await send(message)

        token = enter_request(context)
        started = time.perf_counter()
        try:
            await app(scope, receive, send_with_id)
        finally:
            if route is not None:
                _finish(context, span, route, status or _SERVER_ERROR, started)
            leave_request(token)

    return wrapped


def _context_of(scope: Scope) -> RequestContext:
    client_id = parent = None
    for name, value in scope["headers"]:
        if name == _REQUEST_ID:
            client_id = value.decode("latin-1")
        elif name == _TRACEPARENT:
            parent = value.decode("latin-1")
    return RequestContext(well_formed_request_id(client_id), TraceParent.parse(parent))


def _with_request_id(
    headers: Iterable[tuple[bytes, bytes]], request_id: str
) -> list[tuple[bytes, bytes]]:
    """The response's headers with the request's id as its one `x-request-id` (an
    admission's header, set by the handler, is the same id unless the client named it)."""
    kept = [(name, value) for name, value in headers if name.lower() != _REQUEST_ID]
    kept.append((_REQUEST_ID, request_id.encode("ascii")))
    return kept


def _finish(
    context: RequestContext, span: Span | None, route: str, status: int, started: float
) -> None:
    if span is not None:
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            span.set_attribute("palisade.request_id", context.request_id)
            if context.org is not None:
                span.set_attribute("palisade.org", context.org)
        end_span(span, f"http_{status}" if status >= _SERVER_ERROR else None)
    if access_log.isEnabledFor(logging.INFO):
        took = round((time.perf_counter() - started) * 1000, 3)
        access_log.info(
            "%s %d %.1f ms",
            route,
            status,
            took,
            extra={"path": route, "status": status, "duration_ms": took},
        )
