"""Slow clients cost a socket, never a node's health: 500 connections that stall in their
headers (or body) against the router and an appliance, which still answer at once and close
the stalled connections when their read deadline passes."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from federation import ConfigError
from router import load_router_config
from tests.conftest import MODEL
from tests.e2e.fleet import Fleet, llama_toml, running_fleet
from tests.support import Server, start_server, wait_for, write_config

SLOW_CONNECTIONS = 500
# Long enough to measure while the slow connections are held, on a machine other test runs
# keep busy; the body deadline is short to keep the test short.
HEADER_TIMEOUT_S = 8.0
BODY_TIMEOUT_S = 3.0
ATTEMPTS = 3
SERVER_TOML = (
    f"[server]\nheader_timeout_s = {HEADER_TIMEOUT_S}\nbody_timeout_s = {BODY_TIMEOUT_S}\n"
)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@dataclass
class Target:
    name: str
    url: str
    key: str


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("slow-clients")
    router_config = write_config(root / "router", SERVER_TOML, "router.toml")
    with running_fleet(root, *router_config) as fleet:
        fleet.start_member("eu-1", "eu-west", llama_toml() + SERVER_TOML)
        fleet.wait_joined("eu-1")
        yield fleet


@pytest.fixture(scope="module", params=["router", "appliance"])
def target(request: pytest.FixtureRequest, fleet: Fleet) -> Target:
    if request.param == "router":
        found = Target("router", fleet.router.url, fleet.org_key("slowpoke", ["eu-west"]))
    else:
        member: Server = fleet.members["eu-1"]
        local_admin = (member.home / "admin.key").read_text().strip()
        found = Target("appliance", member.url, _local_key(member.url, local_admin))
    warm = _chat(found)  # the model's first decode pages it in: not what is measured here
    assert warm.status_code == 200, warm.text
    return found


def _chat(target: Target) -> httpx.Response:
    return httpx.post(
        f"{target.url}/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {target.key}"},
        timeout=60,
    )


def _local_key(url: str, admin_key: str) -> str:
    """An org_user key of the appliance's own tenancy (requests that skip the router)."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    orgs = httpx.get(f"{url}/admin/v1/orgs", headers=headers, timeout=30).json()["data"]
    if not any(org["name"] == "local-slow" for org in orgs):
        created = httpx.post(
            f"{url}/admin/v1/orgs",
            json={"name": "local-slow", "regions": ["eu-west"]},
            headers=headers,
            timeout=30,
        )
        assert created.status_code == 201, created.text
    invite = httpx.post(
        f"{url}/admin/v1/invites",
        json={"email": "slow@local.test", "org": "local-slow", "role": "org_user"},
        headers=headers,
        timeout=30,
    ).json()
    accepted = httpx.post(
        f"{url}/admin/v1/invites/accept", json={"token": invite["token"]}, timeout=30
    )
    assert accepted.status_code == 201, accepted.text
    key: str = accepted.json()["key"]["key"]
    return key


@contextmanager
def stalled(url: str, prefix: bytes, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that each send `prefix` and then nothing more."""
    parts = urlsplit(url)
    # An enrolled appliance serves HTTPS: these clients stall after the handshake.
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=parts.hostname)
            sock.sendall(prefix)
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = call()
    return response, time.perf_counter() - started


def _closed_by_server(sock: socket.socket, seen: dict[int, bytes]) -> bool:
    """Whether the server has closed `sock` (collecting what it sent before closing)."""
    sock.setblocking(False)
    try:
        while data := sock.recv(4096):
            seen[sock.fileno()] = seen.get(sock.fileno(), b"") + data
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except ConnectionResetError:
        return True
    return True


def _all_closed(sockets: list[socket.socket], seen: dict[int, bytes]) -> bool:
    return all([_closed_by_server(sock, seen) for sock in sockets])  # noqa: C419 - poll every one


def _fastest(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    """The quickest of up to ATTEMPTS calls: what the node can do, not a load spike of the
    machine it shares (a call under a second ends the attempts)."""
    best: tuple[httpx.Response, float] | None = None
    for _ in range(ATTEMPTS):
        response, seconds = _timed(call)
        if best is None or seconds < best[1]:
            best = (response, seconds)
        if seconds < 1.0:
            break
    assert best is not None
    return best


def test_slow_headers_cost_a_socket_not_the_nodes_health(target: Target) -> None:
    prefix = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"
    _, idle_chat_s = _fastest(lambda: _chat(target))
    with stalled(target.url, prefix, SLOW_CONNECTIONS) as sockets:
        opened = time.monotonic()
        health, health_s = _fastest(lambda: httpx.get(f"{target.url}/healthz", timeout=60))
        chat, chat_s = _fastest(lambda: _chat(target))
        measured_within = time.monotonic() - opened
        # The figures the acceptance asks for (shown with -s).
        print(  # noqa: T201
            f"{target.name}, {SLOW_CONNECTIONS} slow connections held: /healthz "
            f"{health_s * 1000:.0f} ms, chat {chat_s * 1000:.0f} ms (without them: "
            f"{idle_chat_s * 1000:.0f} ms)"
        )
        assert measured_within < HEADER_TIMEOUT_S  # measured while they were all held
        assert health.status_code == 200
        assert health_s < 1.0
        assert chat.status_code == 200, chat.text
        assert chat_s < 1.0
        seen: dict[int, bytes] = {}
        wait_for(lambda: _all_closed(sockets, seen), timeout=HEADER_TIMEOUT_S + 10)
        closed_after = time.monotonic() - opened
    assert closed_after >= HEADER_TIMEOUT_S - 1.0
    assert len(seen) == SLOW_CONNECTIONS  # each was told why before it was closed
    assert all(reply.startswith(b"HTTP/1.1 408 ") for reply in seen.values())
    assert b'"code":"request_timeout"' in next(iter(seen.values()))
    assert httpx.get(f"{target.url}/health", timeout=5).json()["status"] == "ok"


def test_a_stalled_body_is_answered_408_and_closed(target: Target) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {target.key}\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    with stalled(target.url, head + b'{"model": ', 20) as sockets:
        health, health_s = _timed(lambda: httpx.get(f"{target.url}/healthz", timeout=5))
        assert health.status_code == 200
        assert health_s < 1.0
        seen: dict[int, bytes] = {}
        wait_for(lambda: _all_closed(sockets, seen), timeout=BODY_TIMEOUT_S + 10)
    assert len(seen) == 20
    for reply in seen.values():
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert b"The request body did not arrive within 3 s." in reply


def test_deeply_nested_json_is_a_400(target: Target) -> None:
    body = b'{"model": "m", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    response = httpx.post(
        f"{target.url}/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"
    assert "128 levels deep" in response.json()["error"]["message"]


def test_connections_beyond_the_limit_are_refused_until_slots_free(tmp_path: Path) -> None:
    limit = 50
    settings = "[server]\nheader_timeout_s = 2\nkeep_alive_s = 5\nmax_header_bytes = 2048\n"
    config = write_config(tmp_path, settings + f"max_connections = {limit}\n", "r.toml")
    router = start_server("router", tmp_path, *config)
    try:
        router.wait_ready(30)
        with stalled(router.url, b"GET /healthz HTTP/1.1\r\n", limit) as sockets:
            refused = httpx.get(f"{router.url}/healthz", timeout=5)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "too_many_connections"
            wait_for(lambda: _all_closed(sockets, {}), timeout=10)
        with httpx.Client(base_url=router.url, timeout=5) as client:
            # The header deadline runs per request: idle time between requests on a
            # kept-alive connection (here 3 s in all) is the keep-alive's business.
            for _ in range(3):
                assert client.get("/healthz").status_code == 200
                time.sleep(1.5)  # idle on purpose, not waiting for anything
            assert client.get("/healthz").status_code == 200
        huge = httpx.get(f"{router.url}/healthz", headers={"X-Big": "a" * 4096}, timeout=5)
        assert huge.status_code == 431
        assert huge.json()["error"]["code"] == "headers_too_large"
    finally:
        router.stop()


def test_a_config_with_an_unknown_server_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text("[server]\nheader_timeout = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key `server.header_timeout`"):
        load_router_config(path)
