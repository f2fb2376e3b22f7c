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

__all__ = [
    "DEFAULT_URL",
    "JsonFlag",
    "KeyOpt",
    "Target",
    "UrlOpt",
    "call_api",
    "error_text",
    "fail",
    "instant",
    "print_json",
    "resolve_target",
    "table",
    "trusted_cas",
    "unreachable",
]
