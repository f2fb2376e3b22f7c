"""Which node failures the router may replay on another node, with the router's node client's
real errors from real loopback sockets (no processes): only a connection that was never made
proves that the node did not get the request."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from federation import APIError, HttpClient, HttpClientError
from router import BackendCrashedError
from router._private.proxy import FailureKind, classify, may_replay

READ_TIMEOUT_S = 0.3
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def node(handler: Handler) -> AsyncIterator[str]:
    """A one-route node on a loopback port that answers every connection with `handler`."""
    connections: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(2)  # the body, `{}`


async def closes_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.close()


async def resets_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST, as when a process dies with unread data


async def dies_mid_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"choices"')
    await writer.drain()
    writer.close()


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await asyncio.sleep(READ_TIMEOUT_S * 10)
    writer.close()


def client(connect_timeout_s: float = 1.0) -> HttpClient:
    return HttpClient(
        tls=None,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=READ_TIMEOUT_S,
        keepalive_s=4.0,
        limit=8,
    )


async def failure(url: str, connect_timeout_s: float = 1.0) -> HttpClientError | TimeoutError:
    """How a request to `url` (`http://host:port`) fails."""
    nodes = client(connect_timeout_s)
    try:
        reply = await nodes.request("POST", url, "/v1/chat/completions", body=b"{}", headers={})
        await reply.read()
    except (HttpClientError, TimeoutError) as exc:
        return exc
    finally:
        await nodes.close()
    raise AssertionError("the request did not fail")


async def failure_of(url: str) -> FailureKind:
    return classify(await failure(url), READ_TIMEOUT_S).kind


def test_a_refused_connection_never_reached_the_node() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()  # nothing listens there now
    kind = asyncio.run(failure_of(f"http://127.0.0.1:{port}"))
    assert kind == "unreached"


def test_a_connect_timeout_never_reached_the_node() -> None:
    """A listener whose backlog is full leaves a new connection unanswered: the connect
    times out (on a host that refuses instead, the answer is the same: never reached)."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        waiting = [socket.socket() for _ in range(4)]
        for held in waiting:  # non-blocking: the ones past the backlog stay unanswered
            held.setblocking(False)
            held.connect_ex(("127.0.0.1", port))
        try:
            error = asyncio.run(failure(f"http://127.0.0.1:{port}", connect_timeout_s=0.2))
        finally:
            for held in waiting:
                held.close()
    assert classify(error, READ_TIMEOUT_S).kind == "unreached"


@pytest.mark.parametrize(
    "handler", [closes_after_reading, resets_after_reading, dies_mid_answer, never_answers]
)
def test_a_node_failing_after_it_read_the_request_may_have_been_killed_by_it(
    handler: Handler,
) -> None:
    async def scenario() -> FailureKind:
        async with node(handler) as url:
            return await failure_of(url)

    assert asyncio.run(scenario()) == "crashed"


def test_the_reason_shown_to_the_client_names_no_address() -> None:
    async def scenario() -> str:
        async with node(never_answers) as url:
            error = await failure(url)
            assert isinstance(error, TimeoutError)
            return str(classify(error, READ_TIMEOUT_S))

    reason = asyncio.run(scenario())
    assert reason == "it sent nothing for 0.3 s"


@pytest.mark.parametrize(
    ("failures", "replay"),
    [
        (["unreached"], True),
        (["unreached", "unreached"], True),
        (["silent"], True),  # a frozen or cut-off node: the request goes elsewhere once
        (["unreached", "silent"], True),
        (["silent", "silent"], False),  # two nodes went quiet holding it: suspect it
        (["crashed"], False),
        (["unreached", "crashed"], False),
    ],
)
def test_only_failures_the_request_cannot_have_caused_are_replayed(
    failures: list[FailureKind], replay: bool
) -> None:
    assert may_replay(failures) is replay


def test_backend_crashed_is_an_openai_shaped_502_that_says_why_it_was_not_retried() -> None:
    error = BackendCrashedError("eu-1", "eu-west", "m", "the connection failed")
    assert isinstance(error, APIError)
    assert (error.status_code, error.code) == (502, "backend_crashed")
    assert "not retried on another node" in error.message
    assert "eu-1" in error.message
