"""ScopeHeaders: one header at a time from an ASGI scope, as Litestar's headers would give it."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Request

from federation import ScopeHeaders

RAW = [
    (b"host", b"127.0.0.1:8400"),
    (b"authorization", b"Bearer pal-sk-one"),
    (b"x-palisade-fleet-request", b"route-0123"),
    (b"authorization", b"Bearer pal-sk-two"),
    (b"x-note", "caf\u00e9".encode("latin-1")),
]


def scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/", "headers": list(RAW)}


def test_looks_up_names_in_any_case_and_takes_the_first_of_repeated_ones() -> None:
    headers = ScopeHeaders(scope())
    assert headers.get("Authorization") == "Bearer pal-sk-one"
    assert headers["X-Palisade-Fleet-Request"] == "route-0123"
    assert headers.get("x-note") == "caf\u00e9"  # latin-1, as ASGI servers hand them over


def test_a_missing_header_is_none_or_a_key_error() -> None:
    headers = ScopeHeaders(scope())
    assert headers.get("X-Palisade-Assertion") is None
    assert headers.get("X-Palisade-Assertion", "-") == "-"
    with pytest.raises(KeyError):
        headers["x-palisade-assertion"]


def test_agrees_with_litestar_request_headers() -> None:
    request: Request[Any, Any, Any] = Request(scope())  # type: ignore[arg-type]
    headers = ScopeHeaders(request)  # a request is read through its scope
    for name in ("host", "Authorization", "x-note", "absent"):
        assert headers.get(name) == request.headers.get(name)
    assert len(headers) == len(RAW)
    assert list(headers) == [name.decode() for name, _ in RAW]
