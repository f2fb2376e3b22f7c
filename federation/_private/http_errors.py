"""Rendering every error a Palisade server answers in the OpenAI shape.

Shared by the appliance and the router so that a client sees the same body, codes and
`Retry-After` whichever one it talks to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

from federation._private.errors import APIError
from federation._private.openai_wire import ENCODER, ErrorDetail, ErrorResponse

Handler = Callable[[Request[Any, Any, Any], Exception], Response[Any]]

_HTTP_CODES = {
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


def error_response(
    status: int, detail: ErrorDetail, retry_after: int | None = None
) -> Response[Any]:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return Response(
        ENCODER.encode(ErrorResponse(detail)),
        status_code=status,
        media_type=MediaType.JSON,
        headers=headers,
    )


def error_handlers(
    server: str, log: logging.Logger, on_error: Callable[[str], None] | None = None
) -> ExceptionHandlersMap:
    """Litestar exception handlers for `server` ("appliance", "router"), logging to `log`;
    `on_error(code)` for each error answered (metrics count them by code)."""
    counted = on_error or _uncounted
    internal = ErrorDetail(
        f"The {server} hit an internal error; it has been logged. Retry, and report it if it "
        "persists.",
        "server_error",
        "internal_error",
        None,
    )

    def api_error(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        assert isinstance(exc, APIError)
        detail = ErrorDetail(exc.message, exc.error_type, exc.code, exc.param, exc.retry_after)
        counted(exc.code)
        return error_response(exc.status_code, detail, exc.retry_after)

    def http_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        if status >= 500:
            log.error("HTTP %s on %s: %s", status, request.url.path, exc.detail)
            counted(internal.code)
            return error_response(status, internal)
        error_type, code = _HTTP_CODES.get(status, ("invalid_request_error", "invalid_request"))
        counted(code)
        detail = ErrorDetail(_http_message(server, request, exc), error_type, code, None)
        return error_response(status, detail)

    def unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        counted(internal.code)
        return error_response(500, internal)

    return {APIError: api_error, HTTPException: http_exception, Exception: unexpected}


def _uncounted(_: str) -> None:
    return None


def _http_message(server: str, request: Request[Any, Any, Any], exc: HTTPException) -> str:
    path = request.url.path
    if exc.status_code == 404:
        return f"No route for {request.method} {path}; the OpenAI API is under /v1 (docs/api.md)."
    if exc.status_code == 405:
        return f"{request.method} is not allowed on {path}."
    if exc.status_code == 413:
        limit = request.route_handler.resolve_request_max_body_size()
        return (
            f"The request body is larger than this {server} accepts ({limit} bytes); send a "
            f"smaller body or raise `max_body_bytes` in the {server} config."
        )
    return exc.detail
