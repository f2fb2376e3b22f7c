"""Which node failures the router may replay on another node, with aiohttp's real errors from
real loopback sockets (no processes): only a connection that was never made proves that the
node did not get the request."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest

from federation import APIError
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
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
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


async def failure_of(url: str) -> FailureKind:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=1, sock_read=READ_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.post(url, data=b"{}") as reply:
                await reply.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return classify(exc, READ_TIMEOUT_S).kind
    raise AssertionError("the request did not fail")


def test_a_refused_connection_never_reached_the_node() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()  # nothing listens there now
    kind = asyncio.run(failure_of(f"http://127.0.0.1:{port}/v1/chat/completions"))
    assert kind == "unreached"


def test_a_connect_timeout_never_reached_the_node() -> None:
    error = aiohttp.ConnectionTimeoutError("Connection timeout to host http://10.0.0.1:1")
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
            timeout = aiohttp.ClientTimeout(sock_read=READ_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                try:
                    await session.post(url, data=b"{}")
                except TimeoutError as exc:
                    return str(classify(exc, READ_TIMEOUT_S))
        raise AssertionError("no timeout")

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
