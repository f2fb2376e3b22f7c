"""Running a Palisade app under uvicorn with connection hygiene: slow or idle clients cost a
socket for a bounded time, never the node's health.

One app may serve several listeners, each with its own TLS context (or none): the router's
public listener beside its mTLS fleet listener. On a TLS connection every request's scope
carries the ASGI TLS extension (`scope["extensions"]["tls"]`), with the client's verified
certificate if it presented one; `peer_identity` reads the fleet identity from it.

The handshake checks a client certificate against the CRL once; a kept-alive connection
outlives it. When a CRL changes, `drop_revoked` cuts the connections it now refuses.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import socket
import ssl
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from federation._private.openai_wire import ENCODER, ErrorDetail, ErrorResponse
from federation._private.pki import PeerIdentity, identity_of, load_pem_certificate
from federation._private.serving import ServerConfig

log = logging.getLogger("palisade.serving")

# ASGI TLS extension values: the protocol version and the IANA cipher suite numbers.
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_TLS13_SUITES = {
    "TLS_AES_128_GCM_SHA256": 0x1301,
    "TLS_AES_256_GCM_SHA384": 0x1302,
    "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
}


@dataclass(frozen=True)
class Listener:
    """A bound socket and the TLS context its connections are served with (None: plain)."""

    sock: socket.socket
    ssl: ssl.SSLContext | None = None


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-file limit to the hard one; returns the limit now in force.

    The usual soft limit (1024) is below what `max_connections` needs, and when accept()
    fails with EMFILE asyncio stops accepting for a while: health checks fail with it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %s: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the open-file limit (%s) is below what [server] max_connections needs (%s, with "
            "the server's own files); raise it (ulimit -n, LimitNOFILE=) or lower "
            "max_connections",
            soft,
            wanted,
        )
    return soft


class _Server(uvicorn.Server):
    """uvicorn's server, serving each `Listener` with its own TLS context."""

    def __init__(
        self, config: uvicorn.Config, listeners: Sequence[Listener], handshake_timeout_s: float
    ) -> None:
        super().__init__(config)
        self.listeners = list(listeners)
        self._handshake_timeout_s = handshake_timeout_s

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        listeners = self.listeners + [Listener(sock) for sock in sockets or []]
        await super().startup(sockets=[])  # the lifespan; servers are made below
        loop = asyncio.get_running_loop()
        protocol = self.config.http_protocol_class
        for listener in listeners:
            server = await loop.create_server(
                lambda: protocol(  # type: ignore[call-arg]
                    config=self.config,
                    server_state=self.server_state,
                    app_state=self.lifespan.state,
                ),
                sock=listener.sock,
                ssl=listener.ssl,
                backlog=self.config.backlog,
                # A client that never finishes its handshake holds a socket no longer than
                # one that never finishes its headers.
                ssl_handshake_timeout=self._handshake_timeout_s if listener.ssl else None,
            )
            self.servers.append(server)

    def drop_revoked(self, serials: Collection[int]) -> int:
        """Cut every open connection whose client certificate's serial is in `serials` (a
        CRL's, just loaded); returns how many. Call from the event loop. Nothing is tracked
        per request: uvicorn's own set of open connections is walked here, when a CRL
        changes, and each one's certificate read from its TLS session."""
        revoked = [
            protocol
            for protocol in self.server_state.connections
            if peer_serial(protocol.transport) in serials
        ]
        for protocol in revoked:
            # At once, without a TLS close_notify exchange: nothing more is read from it, a
            # request still arriving is never served.
            protocol.transport.abort()
        if revoked:
            log.warning("closed %d connections of revoked certificates", len(revoked))
        return len(revoked)


def make_server(app: Any, config: ServerConfig, listeners: Sequence[Listener] = ()) -> _Server:
    """A uvicorn server for `app` on `listeners` that enforces `config` on every connection
    (`server.run()`; sockets given to `run(sockets=...)` are served as plain listeners)."""
    raise_fd_limit(config.max_connections + 256)
    return _Server(
        uvicorn.Config(
            app,
            http=guarded_protocol(config),
            log_level="warning",
            log_config=None,  # uvicorn's records go to the process's handler (text or JSON)
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=config.keep_alive_s,
            # Nothing reads the client's address, so uvicorn's rewriting of it from
            # X-Forwarded-For (a middleware pass on every request) has nothing to do.
            proxy_headers=False,
        ),
        listeners,
        config.header_timeout_s,
    )


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection (None when it is not TLS): the client's
    certificate (already verified by the handshake) as PEM, the version and cipher suite."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _TLS13_SUITES.get(cipher[0]) if cipher else None,
    }


def peer_serial(transport: asyncio.BaseTransport | None) -> int | None:
    """The serial of the client certificate a connection presented (None: no TLS, none
    presented, or the connection is gone)."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return _serial_of_der(der) if der else None


@functools.lru_cache(maxsize=4096)
def _serial_of_der(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def peer_identity(source: Any) -> PeerIdentity | None:
    """The fleet identity of the client certificate a request (or ASGI scope) came with;
    None without TLS or without a certificate. The handshake verified the certificate
    against the fleet CA and CRL: a certificate that fails never gets this far."""
    scope: Mapping[str, Any] = getattr(source, "scope", source)
    tls = scope.get("extensions", {}).get("tls")
    if not tls or not tls["client_cert_chain"]:
        return None
    return _identity_of_pem(tls["client_cert_chain"][0])


@functools.lru_cache(maxsize=4096)
def _identity_of_pem(pem: str) -> PeerIdentity | None:
    """Parsed once per certificate: every request of every connection presents the same."""
    try:
        return identity_of(load_pem_certificate(pem.encode("ascii")))
    except ValueError as exc:  # signed by the CA, but names no fleet identity
        log.warning("a client certificate names no fleet identity, taken as none: %s", exc)
        return None


class _CorkedTransport:
    """A connection's transport that gathers the writes of one event-loop iteration into
    one. uvicorn writes a response's head and its body separately; on TLS each write is a
    record of its own and a system call, on both ends. What is written goes out at the end
    of the iteration (before anything is closed), so a stream's chunks are not held back.
    Everything but writing and closing is the wrapped transport's."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _error_reply(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP response in the OpenAI error shape, for answers uvicorn's app never
    sees (the connection is closed after it)."""
    error_type = "service_unavailable" if status == 503 else "invalid_request_error"
    body = ENCODER.encode(ErrorResponse(ErrorDetail(message, error_type, code, None)))
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def guarded_protocol(config: ServerConfig) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with deadlines on reading each request and a cap on
    connections. uvicorn times out idle kept-alive connections only, not a connection that
    stops in the middle of its first request's headers or body."""
    header_timeout = _error_reply(
        408,
        "Request Timeout",
        f"The request headers did not arrive within {config.header_timeout_s:g} s.",
        "request_timeout",
    )
    body_timeout = _error_reply(
        408,
        "Request Timeout",
        f"The request body did not arrive within {config.body_timeout_s:g} s.",
        "request_timeout",
    )
    too_large = _error_reply(
        431,
        "Request Header Fields Too Large",
        f"The request headers are larger than this server accepts ({config.max_header_bytes} "
        "bytes).",
        "headers_too_large",
    )
    busy = _error_reply(
        503,
        "Service Unavailable",
        f"This server already holds its maximum of {config.max_connections} connections; "
        "retry shortly.",
        "too_many_connections",
    )

    class GuardedProtocol(HttpToolsProtocol):
        # The deadline of the request being read (None: none), what is answered when it
        # passes, and one timer that checks it lazily: moving the deadline on every request
        # costs no timer of its own (two call_later and two cancels a request, before).
        _due: float | None = None
        _reply = b""
        _timer: asyncio.TimerHandle | None = None
        _timer_at = 0.0
        _in_headers = True
        _header_bytes = 0  # of the request being read, while its headers are incomplete
        _tail = b""  # the last bytes received, in case the headers' end straddles two reads
        _requests = 0
        _tls: dict[str, Any] | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = _CorkedTransport(transport, self.loop)  # type: ignore[assignment]
            self._tls = tls_extension(transport)
            if len(self.connections) > config.max_connections:
                self._refuse(busy)
                return
            self._arm(config.header_timeout_s, header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_headers and self._headers_too_large(data):
                self._refuse(too_large)
                return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._tls is not None:
                self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]
            self._in_headers = True
            if self._due is None:  # a kept-alive connection's next request
                self._arm(config.header_timeout_s, header_timeout)

        def _headers_too_large(self, data: bytes) -> bool:
            before, self._header_bytes = self._header_bytes, self._header_bytes + len(data)
            if self._header_bytes <= config.max_header_bytes:
                self._tail = data[-3:]
                return False
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            return end < 0 or before - len(self._tail) + end + 4 > config.max_header_bytes

        def on_headers_complete(self) -> None:
            self._in_headers, self._header_bytes, self._tail = False, 0, b""
            self._arm(config.body_timeout_s, body_timeout)
            super().on_headers_complete()
            self._requests += 1
            if self._requests >= config.max_requests_per_connection and self.cycle is not None:
                self.cycle.keep_alive = False  # uvicorn answers `connection: close`

        def on_message_complete(self) -> None:
            self._disarm()
            self._in_headers = True
            super().on_message_complete()

        def _arm(self, seconds: float, reply: bytes) -> None:
            due = self.loop.time() + seconds
            self._due, self._reply = due, reply
            if self._timer is None or self._timer_at > due:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer, self._timer_at = self.loop.call_at(due, self._check), due

        def _disarm(self) -> None:
            self._due = None  # a timer still set finds nothing due and lapses

        def _check(self) -> None:
            self._timer = None
            due = self._due
            if due is None:
                return
            if self.loop.time() < due:  # moved on since the timer was set
                self._timer, self._timer_at = self.loop.call_at(due, self._check), due
                return
            self._refuse(self._reply)

        def _refuse(self, reply: bytes) -> None:
            """Answer `reply` unless an answer to this request (or, while headers are read,
            to the one before) is under way, then close the connection."""
            self._disarm()
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if self._in_headers:
                quiet = cycle is None or cycle.response_complete
            else:
                quiet = cycle is not None and not cycle.response_started
            if quiet:
                if cycle is not None:
                    cycle.disconnected = True  # the app's own answer would come too late
                self.transport.write(reply)
            self.transport.close()

    return GuardedProtocol
