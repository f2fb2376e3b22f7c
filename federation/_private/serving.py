"""Binding a server's socket before it starts, so a busy port is a clear error, not a trace;
and the `[server]` config of connection limits that `http_server.make_server` enforces."""

from __future__ import annotations

import socket
from typing import Annotated

from msgspec import Meta, Struct

from federation._private.errors import ConfigError

Timeout = Annotated[float, Meta(gt=0, le=3600)]


class ServerConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """`[server]` in the appliance and router configs: limits on each client connection."""

    # From a connection's opening (or the first byte of the next request on a kept-alive one) to
    # the end of the request's headers.
    header_timeout_s: Timeout = 10.0
    # From the end of the headers to the end of the request body.
    body_timeout_s: Timeout = 60.0
    # How long an idle kept-alive connection stays open between requests.
    keep_alive_s: Annotated[int, Meta(ge=1, le=3600)] = 5
    max_requests_per_connection: Annotated[int, Meta(ge=1)] = 10_000
    max_header_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    # Connections beyond this are answered 503 and closed at once.
    max_connections: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` (port 0 picks a free one), inheritable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"Cannot listen on {host}:{port}: {exc.strerror}. Pick another --port "
            "(0 picks a free one) or stop whatever holds it."
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, scheme: str = "http") -> str:
    """`http://host:port` (or `https://…`) for a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
