"""`read_body` under a real Litestar app, driven through ASGI the way uvicorn drives it: the
body arriving in pieces, announced or not, within and past the route's size limit, and a
client that leaves half-way."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Litestar, Request, post
from litestar.types import Message

from federation import ClientGoneError, client_gone_response, read_body

LIMIT = 64


def app(seen: list[bytes]) -> Litestar:
    @post("/echo", status_code=200)
    async def echo(request: Request[Any, Any, Any]) -> bytes:
        body = await read_body(request)
        assert await read_body(request) is body  # kept for later calls
        assert await request.body() == body  # and for Litestar's own reader
        seen.append(body)
        return body

    return Litestar(
        [echo],
        request_max_body_size=LIMIT,
        exception_handlers={ClientGoneError: client_gone_response},
    )


def serve(pieces: list[bytes], *, announced: int | None, leaves: bool = False) -> tuple[int, bytes]:
    """POST /echo with `pieces` as the body's messages; the status and body answered."""
    seen: list[bytes] = []
    sent: list[Message] = []
    queue = [
        {"type": "http.request", "body": piece, "more_body": index < len(pieces) - 1}
        for index, piece in enumerate(pieces)
    ]
    if leaves:
        queue[-1] = {"type": "http.disconnect"}

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0)
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/octet-stream")]
    if announced is not None:
        headers.append((b"content-length", str(announced).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/echo",
        "raw_path": b"/echo",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    asyncio.run(app(seen)(scope, receive, send))  # type: ignore[arg-type]
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def test_a_body_in_pieces_is_read_whole_and_kept() -> None:
    assert serve([b"ab", b"cd", b"ef"], announced=6) == (200, b"abcdef")
    assert serve([b"x" * LIMIT], announced=None) == (200, b"x" * LIMIT)


def test_a_body_past_the_limit_is_413_announced_or_not() -> None:
    assert serve([b"x" * (LIMIT + 1)], announced=LIMIT + 1)[0] == 413
    assert serve([b"x" * 40, b"x" * 40], announced=None)[0] == 413  # chunked, no length


def test_a_client_leaving_mid_body_is_client_gone() -> None:
    assert serve([b"ab", b"cd"], announced=10, leaves=True)[0] == 499
