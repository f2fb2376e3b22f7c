"""Served connections on the hot path: their transport gathers the writes of one event-loop
iteration into one (uvicorn writes a response's head and body apart: on TLS, a record and a
system call each), in order, never holding anything back past the iteration or a close;
and each request keeps its own read deadline on a kept-alive connection."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from federation import Listener, ServerConfig, bind_socket, make_server
from federation._private.http_server import _CorkedTransport
from tests.support import wait_for


class Recording(asyncio.Transport):
    """What reaches the socket's transport, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return f"info:{name}" if name == "peername" else default


async def _iteration() -> None:
    await asyncio.sleep(0)  # the writes' flush was scheduled before this task resumes
    await asyncio.sleep(0)


def test_the_writes_of_one_iteration_go_out_as_one_and_the_next_ones_later() -> None:
    async def scenario() -> list[tuple[str, bytes]]:
        inner = Recording()
        corked = _CorkedTransport(inner, asyncio.get_running_loop())
        corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        corked.write(b"ok")
        assert inner.calls == []  # not yet: the iteration is not over
        await _iteration()
        corked.write(b"next")
        await _iteration()
        return inner.calls

    assert asyncio.run(scenario()) == [
        ("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        ("write", b"next"),
    ]


def test_a_close_sends_what_is_pending_first_and_nothing_is_written_after_it() -> None:
    async def scenario() -> list[tuple[str, bytes]]:
        inner = Recording()
        corked = _CorkedTransport(inner, asyncio.get_running_loop())
        corked.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        corked.close()
        corked.write(b"late")  # a straggler once the connection is closing
        await _iteration()
        return inner.calls

    assert asyncio.run(scenario()) == [
        ("write", b"HTTP/1.1 408 Request Timeout\r\n\r\n"),
        ("close", b""),
    ]


def test_everything_but_writing_and_closing_is_the_sockets_transport() -> None:
    async def scenario() -> None:
        inner = Recording()
        corked = _CorkedTransport(inner, asyncio.get_running_loop())
        assert corked.get_extra_info("peername") == "info:peername"
        assert corked.is_closing() is False
        inner.close()
        assert corked.is_closing() is True

    asyncio.run(scenario())


# --- the same connection's deadlines, on a real socket ----------------------------------------


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


@contextmanager
def _serving(config: ServerConfig) -> Iterator[socket.socket]:
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(_hello, config, [Listener(sock)])
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10)
        yield sock
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _read_response(conn: socket.socket) -> bytes:
    data = b""
    while b"hello" not in data and b"Request Timeout" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_kept_alive_connections_next_request_gets_its_own_header_deadline() -> None:
    """Each request's headers have `header_timeout_s` from their first byte, however many
    requests the connection served before, and idle time between requests is not counted."""
    config = ServerConfig(header_timeout_s=0.6, keep_alive_s=30)
    with _serving(config) as sock, socket.create_connection(sock.getsockname()[:2]) as conn:
        conn.settimeout(10)
        for _ in range(3):
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in _read_response(conn)
            time.sleep(0.4)  # the stimulus (idle time), not a wait for a condition
        started = time.monotonic()
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and the headers never end
        answer = _read_response(conn)
        waited = time.monotonic() - started
    assert b"408 Request Timeout" in answer
    assert b'"code":"request_timeout"' in answer
    assert 0.5 <= waited < 3.0
