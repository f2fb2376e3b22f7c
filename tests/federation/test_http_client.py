"""The hot-path HTTP client (the router's to its nodes) against real loopback servers (no
processes): connections are reused only when the node allows it and within the keep-alive,
answers arrive in pieces as they are sent, closing a response part-way drops its
connection, and the connection limit makes requests wait instead of failing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from federation import ConnectionLostError, HttpClient

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Palisade-Node: n1\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


class Node:
    """A loopback node answering each request with `answer` (which says whether to keep the
    connection); counts connections and the requests it read."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                if not await self.answer(reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


@asynccontextmanager
async def running(answer: Answer) -> AsyncIterator[Node]:
    node = Node(answer)
    server = await asyncio.start_server(node.serve, "127.0.0.1", 0)
    node.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield node
    finally:
        server.close()


def client(*, keepalive_s: float = 4.0, limit: int = 8) -> HttpClient:
    return HttpClient(
        tls=None, connect_timeout_s=1, read_timeout_s=5, keepalive_s=keepalive_s, limit=limit
    )


async def answer_ok(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(OK)
    await writer.drain()
    return True


async def post(nodes: HttpClient, node: Node) -> bytes:
    reply = await nodes.request("POST", node.url, "/v1/chat/completions", body=b"{}", headers={})
    assert reply.status == 200
    assert reply.headers.get("x-palisade-node") == reply.headers.get("X-Palisade-Node") == "n1"
    return await reply.read()


def test_one_connection_serves_consecutive_requests_and_the_request_is_well_formed() -> None:
    async def scenario() -> Node:
        async with running(answer_ok) as node:
            nodes = client()
            assert [await post(nodes, node) for _ in range(3)] == [b"{}"] * 3
            await nodes.close()
            return node

    node = asyncio.run(scenario())
    assert node.connections == 1
    head, _, body = node.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Length: 2" in head
    assert body == b"{}"


@pytest.mark.parametrize("keep", ["closes", "expired"])
def test_a_connection_is_not_reused_when_the_node_closes_it_or_it_idled_too_long(
    keep: str,
) -> None:
    async def closing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        await writer.drain()
        return False

    async def scenario() -> int:
        async with running(closing if keep == "closes" else answer_ok) as node:
            nodes = client(keepalive_s=0.0 if keep == "expired" else 4.0)
            for _ in range(2):
                await post(nodes, node)
            await nodes.close()
            return node.connections

    assert asyncio.run(scenario()) == 2


def test_a_stream_arrives_in_pieces_and_closing_it_drops_the_connection() -> None:
    sent_second = asyncio.Event()

    async def streaming(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await sent_second.wait()
        writer.write(b"7\r\ndata: 2\r\n")
        await writer.drain()
        await reader.read()  # until the client goes away
        return False

    async def scenario() -> list[bytes]:
        async with running(streaming) as node:
            nodes = client()
            reply = await nodes.request("POST", node.url, "/v1/x", body=b"{}", headers={})
            pieces: list[bytes] = []

            async def relay() -> None:
                async for piece in reply.iter_any():
                    pieces.append(piece)
                    if len(pieces) == 1:
                        sent_second.set()  # the first piece came before the second was sent
                    else:
                        reply.close()

            with pytest.raises(ConnectionLostError):
                await relay()
            await asyncio.wait_for(node.closed.wait(), 5)  # the node saw the client go
            await nodes.close()
            return pieces

    assert asyncio.run(scenario()) == [b"data: 1", b"data: 2"]


def test_requests_past_the_connection_limit_wait_for_a_free_connection() -> None:
    release = asyncio.Event()

    async def held(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(OK)
        await writer.drain()
        return True

    async def scenario() -> tuple[list[bytes], int]:
        async with running(held) as node:
            nodes = client(limit=1)
            both = asyncio.gather(post(nodes, node), post(nodes, node))
            await asyncio.sleep(0)  # both started; one holds the only connection
            release.set()
            answers = list(await asyncio.wait_for(both, 5))
            await nodes.close()
            return answers, node.connections

    assert asyncio.run(scenario()) == ([b"{}", b"{}"], 1)


def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async def scenario() -> int:
        async with running(answer_ok) as node:
            nodes = client()
            with pytest.raises(ValueError, match="line break"):
                await nodes.request("POST", node.url, "/v1/x", headers={"X-A": "1\r\nX-B: 2"})
            await post(nodes, node)  # the client is still usable
            await nodes.close()
            return len(node.requests)

    assert asyncio.run(scenario()) == 1
