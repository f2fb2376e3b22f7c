"""`ClosingStream` and `count_exits` under a real Litestar app, driven through ASGI the way
uvicorn drives it, with a client that is already gone or one that stays to the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, get
from litestar.types import Message

from federation import ClosingStream, count_exits

BODY = [b"data: one\n\n", b"data: two\n\n"]


class Served:
    """One streaming route whose body and closing are recorded."""

    def __init__(self) -> None:
        self.started = 0
        self.closed = 0
        self.counted: list[tuple[str, int]] = []
        self.body: AsyncIterator[bytes] | None = None

        async def events() -> AsyncIterator[bytes]:
            self.started += 1
            for event in BODY:
                await asyncio.sleep(0)
                yield event

        @get("/v1/stream")
        async def stream() -> ClosingStream:
            self.body = events()
            return ClosingStream(
                self.body, on_close=self.close, media_type="text/event-stream", headers={}
            )

        def count(label: str, status: int, seconds: float) -> None:
            assert seconds >= 0
            self.counted.append((label, status))

        self.app = Litestar([stream], middleware=[count_exits({"/v1/stream": "stream"}, count)])

    def close(self) -> None:
        self.closed += 1

    def serve(self, *, client_stays: bool) -> list[Message]:
        sent: list[Message] = []
        requested = False
        complete = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if client_stays:
                await complete.wait()  # as uvicorn: "disconnect" once the response is sent
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/v1/stream",
            "raw_path": b"/v1/stream",
            "root_path": "",
            "query_string": b"",
            "headers": [],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
            "state": {},
        }
        asyncio.run(self.app(scope, receive, send))  # type: ignore[arg-type]
        return sent


async def _next(body: AsyncIterator[bytes]) -> bytes | None:
    return await anext(body, None)


def test_a_stream_whose_client_is_gone_still_closes_once_and_counts_499() -> None:
    served = Served()
    served.serve(client_stays=False)
    assert served.closed == 1
    assert served.body is not None
    # Started or not (that is the scheduler's business), the body is finished with: closed,
    # it has nothing more to give (not closed, it would give its first event now).
    assert asyncio.run(_next(served.body)) is None
    assert served.counted == [("stream", 499)]


def test_a_stream_read_to_the_end_closes_once_and_counts_its_status() -> None:
    served = Served()
    sent = served.serve(client_stays=True)
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    assert bodies == BODY
    assert served.started == 1
    assert served.closed == 1
    assert served.counted == [("stream", 200)]
