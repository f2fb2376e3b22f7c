"""The options `palisade router serve` and `palisade appliance serve` share for their logs
and traces, laid over the config file's `[logs]` and `[traces]`."""

from __future__ import annotations

from typing import Annotated

import msgspec
import typer

from federation._private.decoding import convert_config
from federation._private.structured_logs import LogFormat, LogsConfig
from federation._private.tracing import TracesConfig

LogFormatOpt = Annotated[
    LogFormat | None,
    typer.Option(
        "--log-format",
        help="Log lines as text or JSON (one object per line); overrides [logs] format.",
        show_default=False,
    ),
]
OtlpEndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--otlp-endpoint",
        help="Export OpenTelemetry traces to this OTLP/HTTP collector (http://host:4318); "
        "overrides [traces] otlp_endpoint.",
        show_default=False,
    ),
]
SampleRatioOpt = Annotated[
    float | None,
    typer.Option(
        "--trace-sample-ratio",
        min=0.0,
        max=1.0,
        help="Share of new traces recorded (0 to 1); overrides [traces] sample_ratio.",
        show_default=False,
    ),
]


def observability_settings(
    logs: LogsConfig,
    traces: TracesConfig,
    *,
    log_format: LogFormat | None,
    otlp_endpoint: str | None,
    sample_ratio: float | None,
) -> tuple[LogsConfig, TracesConfig]:
    """The config's `[logs]` and `[traces]` with the command line's options laid over them
    (and the OTEL_* variables filling what neither sets)."""
    if log_format is not None:
        logs = msgspec.structs.replace(logs, format=log_format)
    if otlp_endpoint is not None:
        merged = msgspec.to_builtins(traces) | {"otlp_endpoint": otlp_endpoint}
        traces = convert_config(merged, TracesConfig, source="--otlp-endpoint")
    if sample_ratio is not None:
        traces = msgspec.structs.replace(traces, sample_ratio=sample_ratio)
    return logs, traces.resolved()
