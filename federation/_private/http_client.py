"""Palisade's HTTP/1.1 client for its hot paths (the router's requests to its nodes, an
appliance's requests to an OpenAI-compatible upstream): keep-alive connections pooled per
server, responses parsed by httptools (the C parser uvicorn uses), bodies read whole or as
they arrive.

Why not aiohttp's client here: at concurrency 1 against the stand-in it spent about 175 µs
of CPU a request on this class of machine, against about 25 µs for an asyncio protocol doing
the same exchange over the same event loop, and a relay is little more than that exchange
(see docs/architecture.md, the router's request path). What it keeps of aiohttp's
behaviour, because the router's retry policy (`proxy.classify`) and the upstream engine's
error mapping depend on it:

- a connection that could not be made (refused, no route, TLS handshake refused, no
  connection within `connect_timeout_s`) is `UnreachedError`: the server never got the
  request;
- once the request is written, a connection that closes, resets or sends something that is
  not HTTP before the answer is complete is `ConnectionLostError`, and nothing received for
  `read_timeout_s` while an answer is due is `TimeoutError`: the server may have the request;
- an idle connection is reused only within `keepalive_s` of its last answer (below the
  server's own keep-alive, so the server never closes one the client is about to reuse);
- a response read to its end gives its connection back to the pool; `close()` before that
  drops the connection (the server sees the client go and stops generating);
- an answer arriving faster than it is relayed pauses reading past `_HIGH_WATER` bytes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import cast
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 1 << 16  # buffered answer bytes that pause reading from the server


class HttpClientError(ConnectionError):
    """A request to a server failed in transport (the message never names an address)."""


class UnreachedError(HttpClientError):
    """No connection to the server could be made: it never got the request."""


class ConnectionLostError(HttpClientError):
    """The connection failed after the request was written, before the answer was complete."""


class Headers(dict[str, str]):
    """Response headers by lower-case name (a repeated header keeps its last value)."""

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str
    port: int
    tls: bool
    base: str  # the URL's path before the endpoint ("" for most servers)
    host_header: str


@lru_cache(maxsize=1024)
def _origin(url: str) -> _Origin:
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnreachedError(f"the server's URL scheme `{parts.scheme}` is not http or https")
    port = parts.port or (443 if tls else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    host_header = host if parts.port is None else f"{host}:{port}"  # never any userinfo
    return _Origin(parts.hostname, port, tls, parts.path.rstrip("/"), host_header)


_PoolKey = tuple[str, int, bool, str | None]


class HttpClient:
    """Pooled HTTP/1.1 connections to servers; at most `limit` open at once."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float,
        limit: int,
    ) -> None:
        self.tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._keepalive_s = keepalive_s
        self._limit = limit
        self._idle: dict[_PoolKey, list[_Connection]] = {}
        self._open = 0
        self._slots: deque[asyncio.Future[None]] = deque()
        self._connections: set[_Connection] = set()

    async def request(
        self,
        method: str,
        url: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str],
        server_hostname: str | None = None,
        read_timeout_s: float | None = None,
    ) -> HttpResponse:
        """Send `method` `path` to the server at `url`; returns once the answer's head is in."""
        origin = _origin(url)
        head = [f"{method} {origin.base}{path} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        head.append(f"Content-Length: {len(body)}\r\n")
        head.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        head.append("\r\n")
        text = "".join(head)
        if text.count("\n") != len(headers) + 4:  # a line break inside a value or the path
            raise ValueError("a request line or header holds a line break")
        timeout = self._read_timeout_s if read_timeout_s is None else read_timeout_s
        connection = await self._connection(origin, server_hostname)
        return await connection.send(text.encode("latin-1") + body, timeout)

    async def close(self) -> None:
        for connection in list(self._connections):
            connection.drop()
        self._idle.clear()

    # --- the pool -----------------------------------------------------------------------------

    async def _connection(self, origin: _Origin, server_hostname: str | None) -> _Connection:
        key = (origin.host, origin.port, origin.tls, server_hostname)
        while True:
            idle = self._idle.get(key)
            now = asyncio.get_running_loop().time()
            while idle:
                connection = idle.pop()
                if not connection.lost and now - connection.idle_since < self._keepalive_s:
                    return connection
                connection.drop()
            if self._open < self._limit:
                self._open += 1
                try:
                    return await self._connect(origin, key, server_hostname)
                except BaseException:
                    self._forget()
                    raise
            self._drop_one_idle()  # an idle connection elsewhere gives its place
            waiter = asyncio.get_running_loop().create_future()
            self._slots.append(waiter)
            await waiter

    def _drop_one_idle(self) -> None:
        for idle in self._idle.values():
            if idle:
                idle.pop(0).drop()
                return

    def _forget(self) -> None:
        """A connection slot is free again."""
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        """Wake one request waiting for a connection (it looks at the pool again)."""
        while self._slots:
            waiter = self._slots.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(
        self, origin: _Origin, key: _PoolKey, server_hostname: str | None
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if origin.tls:
            context = self.tls if self.tls is not None else ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, key),
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=(server_hostname or origin.host) if origin.tls else None,
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            raise UnreachedError("the connection could not be made") from exc
        self._connections.add(connection)
        return connection

    def _reuse(self, connection: _Connection) -> None:
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(connection.key, []).append(connection)
        self._wake_one()

    def _lost(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            idle = self._idle.get(connection.key)
            if idle is not None and connection in idle:
                idle.remove(connection)
            self._forget()


class HttpResponse:
    """A server's answer: status and headers now, the body through `read` or `iter_any`."""

    __slots__ = ("_body", "_buffered", "_connection", "_error", "_waiter", "complete", "headers",
                 "status")  # fmt: skip

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self.status = 0
        self.headers = Headers()
        self._body: list[bytes] = []
        self._buffered = 0
        self.complete = False
        self._error: HttpClientError | TimeoutError | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool (or is dropped on failure)."""
        try:
            while not self.complete:
                await self._more()
        except BaseException:
            self.close()
            raise
        return self._take()

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive (each whatever was buffered)."""
        while True:
            if self._body:
                yield self._take()
            elif self.complete:
                return
            else:
                await self._more()

    def release(self) -> None:
        """Done with a response read to its end (its connection is already back in the pool);
        before that, the same as `close`."""
        if not self.complete:
            self.close()

    def close(self) -> None:
        """Drop the connection unless the answer is complete; a read in progress fails."""
        connection, self._connection = self._connection, None
        if connection is not None and not self.complete:
            connection.drop()
            self._fail(ConnectionLostError("the response was closed"))

    async def _more(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _take(self) -> bytes:
        data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        if self._buffered >= _HIGH_WATER and self._connection is not None:
            self._connection.resume()
        self._buffered = 0
        return data

    # --- fed by the connection ----------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered >= _HIGH_WATER and self._connection is not None:
            self._connection.pause()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._connection = None
        self._wake()

    def _fail(self, error: HttpClientError | TimeoutError) -> None:
        if not self.complete and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a server; at most one request on it at a time."""

    def __init__(self, client: HttpClient, key: _PoolKey) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.idle_since = 0.0
        self.response: HttpResponse | None = None
        self.head: asyncio.Future[HttpResponse] | None = None
        self.keep_alive = False
        self.paused = False
        # The read timeout: one timer per answer, moved on lazily (`_check_silence`).
        self.timeout_s = 0.0
        self.heard_at = 0.0
        self.timer: asyncio.TimerHandle | None = None

    async def send(self, message: bytes, timeout_s: float) -> HttpResponse:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.response = HttpResponse(self)
        self.head = loop.create_future()
        self.timeout_s, self.heard_at = timeout_s, loop.time()
        self.timer = loop.call_at(self.heard_at + timeout_s, self._check_silence)
        self.transport.write(message)
        try:
            return await self.head
        except BaseException:
            self.drop()  # cancelled or failed mid-answer: the connection's state is unknown
            raise

    def drop(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()
        self._ended(ConnectionLostError("the connection was closed"))

    def pause(self) -> None:
        if self.transport is not None and not self.paused and not self.lost:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self.paused and not self.lost:
            self.paused = False
            self.heard_at = asyncio.get_running_loop().time()
            self.transport.resume_reading()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport has the Transport methods without being a subclass.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing is due on an idle connection
            self.drop()
            return
        self.heard_at = asyncio.get_running_loop().time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.drop()

    def eof_received(self) -> bool | None:
        return None  # close the transport; `connection_lost` follows

    def connection_lost(self, _exc: Exception | None) -> None:
        self.lost = True
        self._ended(ConnectionLostError("the connection closed before the answer was complete"))
        self.client._lost(self)

    # --- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response, head = self.response, self.head
        if response is None or head is None:
            return
        response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.head = None
        if not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        response, self.response = self.response, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if response is None:
            return
        response._finish()
        if self.keep_alive and not self.lost:
            self.client._reuse(self)
        else:
            self.drop()

    # --- failures -----------------------------------------------------------------------------

    def _check_silence(self) -> None:
        self.timer = None
        if self.response is None:
            return
        loop = asyncio.get_running_loop()
        due = self.heard_at + self.timeout_s
        if self.paused or loop.time() < due:
            self.timer = loop.call_at(max(due, loop.time() + 0.01), self._check_silence)
            return
        silent = TimeoutError(f"nothing arrived for {self.timeout_s:g} s")
        self._ended(silent)
        if self.transport is not None and not self.lost:
            self.transport.close()

    def _ended(self, error: HttpClientError | TimeoutError) -> None:
        """Fail whatever is still due on this connection."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        head, self.head = self.head, None
        if head is not None and not head.done():
            head.set_exception(error)
        response, self.response = self.response, None
        if response is not None:
            response._fail(error)
