"""Shared plumbing for `palisade` client commands (imported by each package's CLI only).

Kept out of `federation/__init__` because it pulls in typer and httpx.
"""

from federation._private.client import (
    DEFAULT_URL,
    JsonFlag,
    KeyOpt,
    Target,
    UrlOpt,
    call_api,
    error_text,
    fail,
    instant,
    print_json,
    resolve_target,
    table,
    trusted_cas,
    unreachable,
)
from federation._private.observability_cli import (
    LogFormatOpt,
    OtlpEndpointOpt,
    SampleRatioOpt,
    observability_settings,
)

__all__ = [
    "DEFAULT_URL",
    "JsonFlag",
    "KeyOpt",
    "LogFormatOpt",
    "OtlpEndpointOpt",
    "SampleRatioOpt",
    "Target",
    "UrlOpt",
    "call_api",
    "error_text",
    "fail",
    "instant",
    "observability_settings",
    "print_json",
    "resolve_target",
    "table",
    "trusted_cas",
    "unreachable",
]
