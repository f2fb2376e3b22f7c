"""The policy long poll over a real socket: the router's publisher and route served by
uvicorn, the appliance's PolicySync and PolicyBook on the other end (plain HTTP here; the
mTLS fleet runs the same code in tests/e2e/test_policy_propagation.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from litestar import Litestar, Request

from appliance._private.fleet_policy_book import PolicyBook
from appliance._private.policy_sync import PolicySync
from federation import (
    APIError,
    AuthenticationError,
    HeartbeatReply,
    NodeIdentity,
    Tenancy,
    error_handlers,
)
from federation._private.admin_wire import KeyCreate, OrgCreate
from router._private.policy_publisher import PolicyPublisher
from router._private.policy_routes import policy_routes

NODE_HEADER = "x-test-node"


def run(body: Callable[[], Coroutine[None, None, None]]) -> None:
    asyncio.run(body())


@dataclass
class Link:
    """What PolicySync needs of the node's membership: a client and the router's URL."""

    fleet_url: str
    fleet_client: httpx.AsyncClient
    on_reply: list[Callable[[HeartbeatReply], None]] = field(default_factory=list)


@dataclass
class Pair:
    tenancy: Tenancy
    publisher: PolicyPublisher
    book: PolicyBook
    sync: PolicySync
    url: str


def only_nodes(request: Request[Any, Any, Any]) -> None:
    """Stands in for the router's certificate check (mTLS is not what is tested here)."""
    if request.headers.get(NODE_HEADER) is None:
        raise AuthenticationError("no node certificate", code="client_certificate_required")


@asynccontextmanager
async def router_and_node(tmp_path: Path, *, long_poll_s: float = 25.0) -> AsyncIterator[Pair]:
    tenancy = Tenancy(tmp_path / "router", region="global", node="router-1")
    await tenancy.start()
    identity = NodeIdentity.load_or_create(tmp_path / "router")
    publisher = PolicyPublisher(tenancy, identity, home=tmp_path / "router", router_id="router-1")
    await publisher.start()
    app = Litestar(
        route_handlers=policy_routes(publisher, only_nodes),
        exception_handlers=error_handlers("router", logging.getLogger("test")),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    client = httpx.AsyncClient(headers={NODE_HEADER: "eu-west-1"})
    (tmp_path / "node").mkdir()
    book = PolicyBook(tmp_path / "node", identity.public_key, region="eu-west")
    sync = PolicySync(book, Link(url, client), long_poll_s=long_poll_s)
    await sync.start()
    try:
        yield Pair(tenancy, publisher, book, sync, url)
    finally:
        await sync.stop()
        await client.aclose()
        server.should_exit = True
        await serving
        await publisher.stop()
        await tenancy.close()


async def until(condition: Callable[[], bool], limit_s: float = 5.0) -> float:
    """Seconds until `condition()` holds, polled every millisecond, or TimeoutError."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit_s:
            raise TimeoutError(f"not within {limit_s} s")
        await asyncio.sleep(0.001)
    return time.monotonic() - started


def accepted(book: PolicyBook, key: str) -> bool:
    try:
        book.principal(key)
    except APIError:
        return False
    return True


async def member_key(tenancy: Tenancy) -> tuple[str, str]:
    store = tenancy.store
    if "acme" not in store.orgs:
        await store.create_org(OrgCreate(name="acme", regions=["eu-west"]), "system")
    user = await store.add_user(f"u{len(store.users)}@acme.test", "org_user", "acme", "system")
    created = await store.create_key(user, KeyCreate(name="k"), "system")
    return created.key, created.info.id


def test_a_new_key_and_its_revocation_reach_the_node_in_one_round_trip(tmp_path: Path) -> None:
    async def body() -> None:
        async with router_and_node(tmp_path) as pair:
            delays = []
            for _ in range(20):
                key, key_id = await member_key(pair.tenancy)
                await until(lambda key=key: accepted(pair.book, key))  # type: ignore[misc]
                started = time.monotonic()
                await pair.tenancy.store.revoke_key(key_id, "system")
                await until(lambda key=key: not accepted(pair.book, key))  # type: ignore[misc]
                delays.append(time.monotonic() - started)
            delays.sort()
            median, worst = statistics.median(delays), delays[-1]
            print(  # noqa: T201 - the measured figure, for the report
                f"\nrevocation reached the node: median {median * 1000:.1f} ms, "
                f"max {worst * 1000:.1f} ms over {len(delays)} trials"
            )
            assert worst < 2.0  # the fleet's bound; fsyncs dominate, and disks vary
            assert pair.book.version == pair.publisher.version

    run(body)


def test_a_poll_with_nothing_newer_answers_204_when_its_wait_is_over(tmp_path: Path) -> None:
    async def body() -> None:
        async with router_and_node(tmp_path) as pair:
            await until(lambda: pair.book.version == pair.publisher.version)
            async with httpx.AsyncClient(headers={NODE_HEADER: "n"}) as client:
                path = f"{pair.url}/federation/v1/policy"
                started = time.monotonic()
                waited = await client.get(
                    path, params={"after": pair.publisher.version, "wait_s": 0.3}
                )
                assert waited.status_code == 204
                assert 0.25 < time.monotonic() - started < 2.0
                current = await client.get(path, params={"after": 0})
                assert current.status_code == 200
                assert current.content == pair.publisher.blob
                for params in ({"after": -1}, {"wait_s": 31}, {"after": "x"}):
                    bad = await client.get(path, params=params)
                    assert bad.status_code == 400, params
                    assert bad.json()["error"]["type"] == "invalid_request_error"
            async with httpx.AsyncClient() as stranger:
                anonymous = await stranger.get(path)
                assert anonymous.status_code == 401
                assert anonymous.json()["error"]["code"] == "client_certificate_required"

    run(body)


def test_a_restarted_node_starts_from_the_snapshot_it_accepted(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with router_and_node(tmp_path) as pair:
            key, _ = await member_key(pair.tenancy)
            await until(lambda: accepted(pair.book, key))
        # router and node stopped: a new node process starts from its file
        router_key = NodeIdentity.load_or_create(tmp_path / "router").public_key
        book = PolicyBook(tmp_path / "node", router_key, region="eu-west")
        assert accepted(book, key)

    run(body)
