"""A revoked certificate loses its open connections: the handshake checks the CRL once, so
when it changes the server cuts every kept-alive connection whose client certificate it
lists (`drop_revoked`), and only those (real TLS on 127.0.0.1, in process)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from cryptography import x509

from federation import (
    Listener,
    ServerConfig,
    bind_socket,
    client_context,
    crl_serials,
    make_server,
    reload_crl,
    server_context,
    write_private,
)
from federation._private.http_server import _Server
from router._private.ca import FleetCA
from tests.federation.test_fleet_protocol import Holder
from tests.support import wait_for

T = TypeVar("T")


async def _client_port(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the client's port: which connection the request came on."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(scope["client"][1]).encode()})


@contextmanager
def _serving(server: _Server) -> Iterator[None]:
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _on_loop(server: _Server, call: Callable[[], T]) -> T:
    """`call()` run on the server's event loop (where the CRL hooks run), its result."""
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            done.set_exception(exc)

    loop: asyncio.AbstractEventLoop = server.servers[0].get_loop()
    loop.call_soon_threadsafe(run)
    return done.result(timeout=10)


def _serial(holder: Holder) -> int:
    return x509.load_pem_x509_certificate(holder.cert.read_bytes()).serial_number


def _port_or_failure(session: httpx.Client, url: str) -> str:
    try:
        return session.get(url).text
    except httpx.TransportError as exc:
        return f"failed: {type(exc).__name__}"


def test_a_new_crl_cuts_the_kept_alive_connections_of_the_certificates_it_lists(
    tmp_path: Path,
) -> None:
    ca = FleetCA.load_or_create(tmp_path / "router")
    node = Holder(tmp_path, ca, "node-srv", "eu-west")
    revoked, kept = (
        Holder(tmp_path, ca, "node-a", "eu-west"),
        Holder(tmp_path, ca, "node-b", "eu-west"),
    )
    sock = bind_socket("127.0.0.1", 0)
    context = server_context(node.cert, node.key, node.ca, node.crl, client_certs=True)
    server = make_server(_client_port, ServerConfig(keep_alive_s=60), [Listener(sock, context)])
    url = f"https://127.0.0.1:{sock.getsockname()[1]}/"
    with (
        _serving(server),
        httpx.Client(verify=client_context(node.ca, revoked.cert, revoked.key)) as doomed,
        httpx.Client(verify=client_context(node.ca, kept.cert, kept.key)) as spared,
        httpx.Client(verify=client_context(node.ca)) as anonymous,
    ):
        before = [session.get(url).text for session in (doomed, spared, anonymous)]
        assert [session.get(url).text for session in (doomed, spared, anonymous)] == before

        # A serial nobody connected with cuts nothing.
        assert _on_loop(server, lambda: server.drop_revoked({12345})) == 0

        write_private(node.crl, ca.crl([(_serial(revoked), time.time())], number=2).decode())

        def reload() -> int:
            reload_crl(context, node.crl)
            return server.drop_revoked(crl_serials(node.crl))

        assert _on_loop(server, reload) == 1
        # The revoked client's connection is gone and a new handshake is refused: every
        # request fails from now on. The others keep their connections.
        for _ in range(3):
            assert _port_or_failure(doomed, url).startswith("failed: ")
        assert [session.get(url).text for session in (spared, anonymous)] == before[1:]


def test_connections_without_a_client_certificate_are_never_cut(tmp_path: Path) -> None:
    """A plain listener beside the TLS one (the router's public listener): nothing to read."""
    plain = bind_socket("127.0.0.1", 0)
    server = make_server(_client_port, ServerConfig(keep_alive_s=60), [Listener(plain)])
    url = f"http://127.0.0.1:{plain.getsockname()[1]}/"
    with _serving(server), httpx.Client() as session:
        port = session.get(url).text
        assert _on_loop(server, lambda: server.drop_revoked(set(range(1, 1000)))) == 0
        assert session.get(url).text == port


def test_crl_serials_reads_what_a_crl_revokes(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    path = tmp_path / "crl.pem"
    write_private(path, ca.crl([(7, time.time()), (2**100, time.time())], number=1).decode())
    assert crl_serials(path) == {7, 2**100}
    write_private(path, "not a CRL\n")
    with pytest.raises(ValueError, match="PEM"):
        crl_serials(path)
