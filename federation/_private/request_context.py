"""Who a request is, for logs and traces: its request id, its trace, its org.

The outermost ASGI layer (`http_observed.py`) makes one `RequestContext` per HTTP request
and keeps it in a context variable for the request's task, so that a log line written
anywhere while the request runs names it (`structured_logs.py`), and the handlers add
their spans to its trace (`tracing.py`).

A request id is the client's own `X-Request-Id` when it is well formed (bounded length and
charset: the value goes into every log line of the request); otherwise the id this server
gives the request: its admission's (`adopt`, the `route-…` or `chatcmpl-…` id that its usage
record and audit row carry), else a `req-…` one made when first needed. A trace is the
W3C `traceparent` the caller sent, else a new trace id.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from federation._private.tracing_sdk import Tracing

TRACEPARENT_HEADER: Final = "traceparent"
REQUEST_ID_FORWARD_HEADER: Final = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Version 00 (a later version's first four fields are read the same way, W3C says); an
# all-zero trace or parent id is invalid.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def well_formed_request_id(value: str | None) -> str | None:
    """A client's `X-Request-Id` if it may be used (1-128 of `A-Za-z0-9._:-`, starting with
    a letter or digit), else None: anything else is hostile or broken and is replaced."""
    if value is None or _REQUEST_ID.fullmatch(value) is None:
        return None
    return value


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A W3C `traceparent`: the caller's trace, its span, and whether it samples."""

    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16 lowercase hex digits
    sampled: bool

    @classmethod
    def parse(cls, header: str | None) -> TraceParent | None:
        """The header's trace context, or None when absent or malformed (then ignored)."""
        if header is None or len(header) > 512:
            return None
        match = _TRACEPARENT.fullmatch(header.strip())
        if match is None:
            return None
        version, trace_id, span_id, flags = match.group(1, 2, 3, 4)
        if version == "ff" or (version == "00" and match[5]):
            return None
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return None
        return cls(trace_id, span_id, bool(int(flags, 16) & 1))

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


class RequestContext:
    """One HTTP request's identity while it is served (see the module's docstring)."""

    __slots__ = (
        "_request_id",
        "client_id",
        "org",
        "parent",
        "sampled",
        "span",
        "span_id",
        "trace_id",
        "tracing",
    )

    def __init__(self, client_id: str | None, parent: TraceParent | None) -> None:
        self.client_id = client_id
        self._request_id = client_id
        self.parent = parent
        self.trace_id = parent.trace_id if parent else os.urandom(16).hex()
        # With tracing on (`Tracing.serve`): the server span's id, and the span itself when
        # the trace is sampled. A request not sampled gets no child span at all, so that it
        # costs no tracing work beyond its root.
        self.tracing: Tracing | None = None
        self.span: Span | None = None
        self.span_id: str | None = None
        self.sampled = False
        self.org: str | None = None

    @property
    def request_id(self) -> str:
        """The id the response's `X-Request-Id` and every log line of the request carry;
        fixed the first time it is read."""
        if self._request_id is None:
            self._request_id = f"req-{os.urandom(12).hex()}"
        return self._request_id

    def adopt(self, own_id: str) -> None:
        """This server's id for the request (its admission's), unless the client named the
        request or its id has been used already (a request keeps one id throughout)."""
        if self._request_id is None:
            self._request_id = own_id

    def forwarded(self, hop_span_id: str | None = None) -> dict[str, str]:
        """The headers that carry this request's identity to the next hop: its id, and its
        trace with the hop's span (else the server span) as the parent. Without tracing,
        the caller's own parent is passed on (or a made-up one for a trace we started)."""
        span_id = hop_span_id or self.span_id
        if span_id is not None:
            parent = TraceParent(self.trace_id, span_id, self.sampled)
        elif self.parent is not None:
            parent = self.parent
        else:
            parent = TraceParent(self.trace_id, os.urandom(8).hex(), sampled=False)
        return {REQUEST_ID_FORWARD_HEADER: self.request_id, TRACEPARENT_HEADER: parent.header()}


_CURRENT: ContextVar[RequestContext | None] = ContextVar("palisade_request", default=None)


def current_request() -> RequestContext | None:
    """The request being served by the running task (None outside a request)."""
    return _CURRENT.get()


def enter_request(context: RequestContext) -> object:
    """Make `context` the running task's request; returns the token `leave_request` takes."""
    return _CURRENT.set(context)


def leave_request(token: object) -> None:
    _CURRENT.reset(token)  # type: ignore[arg-type]
