"""Several real routers sharing one PostgreSQL policy store, for end-to-end tests.

Each router is its own small fleet (`running_fleet`: its own home, CA and enrolled member
fronting a stand-in upstream); what they share is the store: orgs, keys, budgets and
usage. The routers reach the database with a URL that holds no password: it comes from a
0600 passfile named by PGPASSFILE in their environment (never a command line or a log).

The bootstrap admin key is written only by the first router to start on a fresh store,
so the routers start one after the other and `Routers.admin` uses the first one's key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from federation import write_private
from router._private.haproxy import Backend, Haproxy
from router._private.monitoring import free_port
from router._private.postgres import PostgresCluster
from tests.e2e.fleet import Fleet, running_fleet, upstream_toml
from tests.federation.tenants import Admin
from tests.support import Server, run_palisade, start_server, write_config

REGION = "eu-west"
PASSFILE_ENV = "PGPASSFILE"


@dataclass(frozen=True)
class SharedStore:
    """A migrated database: `url` for the routers (no password), `dsn` for this process."""

    url: str
    dsn: str
    passfile: Path

    def query(self, sql: str, *args: object) -> list[Any]:
        """Rows of one statement, on a connection of its own (the test's view of the store)."""
        return asyncio.run(_fetch(self.dsn, sql, args))


async def _fetch(dsn: str, sql: str, args: Sequence[object]) -> list[Any]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()


def shared_store(cluster: PostgresCluster, directory: Path, name: str) -> SharedStore:
    """A fresh database `name`, migrated by `palisade db migrate` as an operator would."""
    dsn = cluster.create_database(name)
    parts = urlsplit(dsn)
    assert parts.password is not None
    assert parts.username is not None
    passfile = directory / "pgpass"
    line = f"{parts.hostname}:{parts.port}:{name}:{parts.username}:{unquote(parts.password)}\n"
    write_private(passfile, line)
    url = f"postgresql://{parts.username}@{parts.hostname}:{parts.port}/{name}"
    migrated = run_palisade("db", "migrate", "--database", url, env={PASSFILE_ENV: str(passfile)})
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    return SharedStore(url, dsn, passfile)


@dataclass
class Router:
    """One router of the set: its fleet (member and stand-in) and the arguments it was
    started with, so it can be started again on the same ports after a kill."""

    fleet: Fleet
    args: tuple[str, ...]
    restarted: Server | None = None

    @property
    def server(self) -> Server:
        return self.restarted or self.fleet.router

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def home(self) -> Path:
        return self.fleet.router.home


@dataclass
class Routers:
    """Routers sharing one store; admin calls go through the first."""

    store: SharedStore
    routers: list[Router]
    stack: contextlib.ExitStack
    proxy: Haproxy | None = field(default=None)

    @property
    def admin(self) -> Admin:
        return self.routers[0].fleet.admin

    def org(self, name: str, budget: int | None = None) -> str:
        """A new org in REGION (with a monthly budget of `budget` tokens); its admin's key."""
        admin = self.admin
        admin.create_org(name, [REGION], budget)
        return admin.member(name, "org_admin", f"owner@{name}.test").key

    def kill(self, index: int) -> None:
        """SIGKILL one router (its member and stand-in keep running)."""
        process = self.routers[index].server.process
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def restart(self, index: int) -> Server:
        """Start a killed router again on its ports and home; wait until it is ready and
        its own member has heartbeated to it again (in this harness no other router can
        reach that member: each router is its own fleet, so until then it has no node)."""
        router = self.routers[index]
        server = start_server("router", router.home, *router.args)
        self.stack.callback(server.stop)
        router.restarted = server
        server.wait_ready(60)
        router.fleet.wait_state("up", *router.fleet.members, timeout=30, ready=True)
        return server

    def haproxy(self, directory: Path) -> Haproxy:
        """HAProxy in front of every router's public listener (TCP checks: plain HTTP)."""
        if self.proxy is None:
            backends = [
                Backend(f"r{n}", "127.0.0.1", int(router.url.rsplit(":", 1)[1]))
                for n, router in enumerate(self.routers, start=1)
            ]
            self.proxy = Haproxy(directory, backends)
            self.proxy.start()
            self.stack.callback(self.proxy.stop)
        return self.proxy


@contextmanager
def running_routers(
    root: Path, store: SharedStore, count: int = 3, *, config: str = "", ttft_ms: float = 0
) -> Iterator[Routers]:
    """`count` routers on `store`, started one after the other, each with one member
    (`node-N` in REGION, fronting a stand-in that answers after `ttft_ms`); all joined.
    `config` is more of every router's router.toml."""
    with contextlib.ExitStack() as stack, passing(store):
        routers = Routers(store, [], stack)
        for n in range(1, count + 1):
            first = routers.routers[0].home if routers.routers else None
            setup = _Setup(store, config, ttft_ms)
            routers.routers.append(_start_router(stack, root / f"r{n}", n, setup, first))
        for n, router in enumerate(routers.routers, start=1):
            router.fleet.wait_joined(f"node-{n}", timeout=120)
        yield routers


@dataclass(frozen=True)
class _Setup:
    store: SharedStore
    config: str
    ttft_ms: float


def _start_router(
    stack: contextlib.ExitStack, root: Path, n: int, setup: _Setup, first: Path | None
) -> Router:
    """Router n; after the first, it gets the first one's admin key (the store's one
    bootstrap key), which its fleet's helpers (`Fleet.admin`: tokens, status) read."""
    text = f'router_id = "router-{n}"\n{setup.config}'
    config = write_config(root / "router", text, "router.toml")
    ports = ["--port", str(free_port("127.0.0.1")), "--fleet-port", str(free_port("127.0.0.1"))]
    args = (*config, "--database", setup.store.url, *ports)
    fleet = stack.enter_context(running_fleet(root, *args))
    if first is not None:
        write_private(fleet.router.home / "admin.key", (first / "admin.key").read_text())
    standin = fleet.standin(f"standin-{n}", tokens=4, ttft_ms=setup.ttft_ms)
    fleet.start_member(f"node-{n}", REGION, upstream_toml(standin, "gpu"))
    return Router(fleet, args)


@contextmanager
def passing(store: SharedStore) -> Iterator[None]:
    """Meanwhile, the servers this process starts find the store's password through
    PGPASSFILE (inherited from this process's environment)."""
    previous = os.environ.get(PASSFILE_ENV)
    os.environ[PASSFILE_ENV] = str(store.passfile)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PASSFILE_ENV, None)
        else:
            os.environ[PASSFILE_ENV] = previous
