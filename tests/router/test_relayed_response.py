"""The router's relayed answers reach the ASGI server exactly as Litestar would send them,
through a shorter path (router/_private/proxy.py, `RelayedResponse`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from litestar import MediaType, Request, Response
from litestar.datastructures import Cookie

from router._private.proxy import RelayedResponse

RECEIPT = {
    "X-Palisade-Region": "eu",
    "X-Palisade-Node": "node-1",
    "X-Palisade-Device": "gpu",
    "x-request-id": "route-0123",
}
CASES = [
    (200, b'{"choices":[]}', "application/json", RECEIPT),
    (200, b'{"choices":[]}', MediaType.JSON, RECEIPT),
    (200, b'{"choices":[]}', "application/json; charset=utf-8", {}),
    (503, b'{"error":{}}', MediaType.JSON, RECEIPT | {"Retry-After": "2"}),
    (400, b"bad request", "text/plain", RECEIPT),
    (200, b"{}", MediaType.JSON, {"Content-Type": "application/x-ndjson"}),
]


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [],
        "query_string": b"",
        "state": {},
    }


def sent(response: Response[Any], **litestar_arguments: Any) -> list[dict[str, Any]]:
    """The ASGI messages `response` sends when Litestar's response handler converts it."""
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    request: Request[Any, Any, Any] = Request(_scope())  # type: ignore[arg-type]
    arguments: dict[str, Any] = {"cookies": [], "headers": {}, "background": None}
    asgi = response.to_asgi_response(None, request, **(arguments | litestar_arguments))
    asyncio.run(asgi(_scope(), receive, send))  # type: ignore[arg-type]
    return messages


@pytest.mark.parametrize(("status", "body", "media_type", "headers"), CASES)
def test_a_relayed_answer_is_sent_as_litestar_sends_it(
    status: int, body: bytes, media_type: str, headers: dict[str, str]
) -> None:
    ours = sent(RelayedResponse(body, status_code=status, media_type=media_type, headers=headers))
    litestars = sent(Response(body, status_code=status, media_type=media_type, headers=headers))
    assert ours == litestars
    assert ours[0]["status"] == status
    assert ours[-1]["body"] == body


@pytest.mark.parametrize(
    "extra",
    [
        {"cookies": [Cookie(key="session", value="x")]},
        {"headers": {"x-route-header": "1"}},
        {"is_head_response": True},
    ],
)
def test_what_the_short_path_does_not_cover_takes_litestars(extra: dict[str, Any]) -> None:
    body = b"" if extra.get("is_head_response") else b'{"choices":[]}'
    ours = sent(RelayedResponse(body, media_type=MediaType.JSON, headers=RECEIPT), **extra)
    assert ours == sent(Response(body, media_type=MediaType.JSON, headers=RECEIPT), **extra)


def test_a_bodiless_status_takes_litestars_path() -> None:
    ours = sent(RelayedResponse(b"", status_code=204, media_type=MediaType.JSON))
    assert ours == sent(Response(b"", status_code=204, media_type=MediaType.JSON))
    assert ours[0]["status"] == 204
