"""OpenTelemetry traces of inference requests, exported over OTLP/HTTP; off unless configured.

`[traces] otlp_endpoint` (or `--otlp-endpoint`, or the standard `OTEL_EXPORTER_OTLP_*`
variables) turns them on; `sample_ratio` (or `OTEL_TRACES_SAMPLER_ARG`) samples a share of
the traces the server starts, and a caller's `traceparent` decides for the traces it
continues (parent-based sampling), so a trace is sampled whole or not at all across the
router and its nodes.

A request that is not sampled still gets its server span's ids (its logs name the trace,
its next hop continues it unsampled), and nothing more: no child span is made for it. The
OpenTelemetry SDK and its exporter (`tracing_sdk.py`) are imported only when tracing is on.
Spans carry ids, counts, timings and names of models, nodes and regions: never a prompt or
an answer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated

from msgspec import Meta, Struct

from federation._private.request_context import RequestContext

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from federation._private.tracing_sdk import Attributes, SpanKindName, Tracing

log = logging.getLogger("palisade.tracing")
_TRACES_PATH = "/v1/traces"


class TracesConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """`[traces]` in the router and appliance configs."""

    # The OTLP/HTTP collector: its base URL (`/v1/traces` is added) or the traces URL
    # itself. None: traces are off (unless the OTEL_EXPORTER_OTLP_* variables name one).
    otlp_endpoint: Annotated[str, Meta(pattern=r"^https?://\S+$")] | None = None
    # The share of the traces this server starts that are recorded and exported.
    sample_ratio: Annotated[float, Meta(ge=0, le=1)] = 1.0

    def resolved(self, environ: Mapping[str, str] | None = None) -> TracesConfig:
        """The config with the standard OpenTelemetry variables filling what it leaves
        unset (`OTEL_SDK_DISABLED=true` turns traces off whatever the config says)."""
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return TracesConfig(otlp_endpoint=None, sample_ratio=self.sample_ratio)
        endpoint = self.otlp_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        endpoint = endpoint or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        ratio = self.sample_ratio
        if "OTEL_TRACES_SAMPLER_ARG" in env and self.sample_ratio == 1.0:
            try:
                ratio = min(1.0, max(0.0, float(env["OTEL_TRACES_SAMPLER_ARG"])))
            except ValueError:
                log.warning("OTEL_TRACES_SAMPLER_ARG is not a ratio; sampling %g", ratio)
        return TracesConfig(otlp_endpoint=endpoint or None, sample_ratio=ratio)

    def traces_url(self) -> str | None:
        """Where spans are sent (the collector's `/v1/traces`), or None: traces are off."""
        if self.otlp_endpoint is None:
            return None
        base = self.otlp_endpoint.rstrip("/")
        return base if base.endswith(_TRACES_PATH) else base + _TRACES_PATH


def start_tracing(
    config: TracesConfig, *, service: str, node: str, region: str | None = None
) -> Tracing | None:
    """The tracer `config` asks for (after `resolved`), or None when traces are off."""
    url = config.traces_url()
    if url is None:
        return None
    from federation._private.tracing_sdk import Tracing  # noqa: PLC0415 - only when on

    tracing = Tracing(url, config.sample_ratio, service=service, node=node, region=region)
    log.info("exporting traces to %s (sampling %g)", url, config.sample_ratio)
    return tracing


def child_span(
    context: RequestContext | None,
    name: str,
    kind: SpanKindName = "internal",
    attributes: Attributes | None = None,
    start_ns: int | None = None,
) -> Span | None:
    """A span under `context`'s server span when its trace is recorded, else None (the
    common, cheap case: the caller skips its span work)."""
    if context is None or context.span is None or context.tracing is None:
        return None
    return context.tracing.child(context.span, name, kind, attributes, start_ns)


def span_id_of(span: Span) -> str:
    return f"{span.get_span_context().span_id:016x}"


def end_span(span: Span, error_code: str | None = None, end_ns: int | None = None) -> None:
    """End `span`; with `error_code`, as failed (a code, never a message: it may quote
    the request)."""
    if error_code is not None:
        from federation._private.tracing_sdk import mark_failed  # noqa: PLC0415 - tracing is on

        span.set_attribute("palisade.error_code", error_code)
        mark_failed(span, error_code)
    span.end(end_ns)
