"""The OpenTelemetry SDK behind `tracing.py`: a tracer provider exporting over OTLP/HTTP in
batches, parent-based ratio sampling. Imported only when traces are on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from federation._private.request_context import RequestContext

SpanKindName = Literal["server", "client", "internal"]
Attributes = Mapping[str, str | int | float | bool | Sequence[str]]
_KINDS = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT, "internal": SpanKind.INTERNAL}
# Spans are exported in batches this often (the SDK's default is 5 s).
_EXPORT_EVERY_MS = 1000
_EXPORT_TIMEOUT_S = 5.0


class Tracing:
    """A server's tracer: `serve` starts a request's server span, `child` the spans of its
    steps; `close` exports what is left."""

    def __init__(
        self, url: str, sample_ratio: float, *, service: str, node: str, region: str | None
    ) -> None:
        resource = {"service.name": service, "service.instance.id": node}
        if region is not None:
            resource["cloud.region"] = region
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            resource=Resource.create(resource),
        )
        exporter = OTLPSpanExporter(endpoint=url, timeout=_EXPORT_TIMEOUT_S)
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=_EXPORT_EVERY_MS)
        )
        self._tracer = self._provider.get_tracer("palisade")

    def serve(self, context: RequestContext, name: str, attributes: Attributes) -> Span:
        """Start `context`'s server span (continuing the caller's trace, if it sent one)
        and give the context its ids; the caller ends the span."""
        span = self._tracer.start_span(name, _remote_parent(context), SpanKind.SERVER, attributes)
        ids = span.get_span_context()
        context.trace_id = f"{ids.trace_id:032x}"
        context.span_id = f"{ids.span_id:016x}"
        context.sampled = ids.trace_flags.sampled
        context.tracing = self
        context.span = span if span.is_recording() else None
        return span

    def child(
        self,
        parent: Span,
        name: str,
        kind: SpanKindName = "internal",
        attributes: Attributes | None = None,
        start_ns: int | None = None,
    ) -> Span:
        return self._tracer.start_span(
            name, set_span_in_context(parent), _KINDS[kind], attributes, start_time=start_ns
        )

    def close(self) -> None:
        """Export the spans still queued, then stop (at shutdown)."""
        self._provider.shutdown()


def mark_failed(span: Span, code: str) -> None:
    """Mark `span` as failed with an error code (never a message: it may quote input)."""
    span.set_status(Status(StatusCode.ERROR, code))


def _remote_parent(context: RequestContext) -> Context | None:
    """The OpenTelemetry context of the caller's span (None: a new trace)."""
    parent = context.parent
    if parent is None:
        return None
    remote = SpanContext(
        int(parent.trace_id, 16),
        int(parent.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if parent.sampled else TraceFlags.DEFAULT),
    )
    return set_span_in_context(NonRecordingSpan(remote))
