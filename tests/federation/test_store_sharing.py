"""Two tenancy stores on one PostgreSQL database, as two routers hold them: a change made
through one reaches the other's memory (NOTIFY), and a listener that lost its connection
reloads everything, so a change it did not hear is not missed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from federation import AuthenticationError, TenancyStore
from federation._private.admin_wire import KeyCreate, OrgCreate
from federation._private.database import LISTENER_NAME
from router._private.postgres import PostgresCluster
from tests.postgres import migrated_database

DEADLINE_S = 5.0


async def _until(condition: Callable[[], bool], what: str) -> float:
    """Seconds until `condition` holds (polled on the event loop), or fail."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < DEADLINE_S, what
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def _refuses(store: TenancyStore, key: str) -> bool:
    try:
        store.authenticate(key)
    except AuthenticationError:
        return True
    return False


@contextlib.asynccontextmanager
async def two_stores(
    cluster: PostgresCluster, home: Path
) -> AsyncIterator[tuple[str, TenancyStore, TenancyStore]]:
    """Two stores on one new PostgreSQL database (its URL first), as two routers hold them."""
    url = await migrated_database(cluster, "sharing")
    stores = [
        await TenancyStore.open(home / name / "policy.db", database=url) for name in ("one", "two")
    ]
    try:
        yield url, stores[0], stores[1]
    finally:
        for store in stores:
            await store.close()


def test_a_change_through_one_store_reaches_the_other(
    postgres: PostgresCluster,
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with two_stores(postgres, tmp_path) as (_, one, two):
            await one.create_org(OrgCreate(name="acme", regions=["eu-west"]), "system")
            user = await one.add_user("ada@acme.eu", "org_admin", "acme", "system")
            created = await one.create_key(user, KeyCreate(name="k"), "system")
            await _until(lambda: not _refuses(two, created.key), "key not heard")
            await one.set_budget("acme", 1234, "system")
            await _until(lambda: two.orgs["acme"].budget_tokens == 1234, "budget not heard")
            await one.revoke_key(created.info.id, "system")
            took = await _until(lambda: _refuses(two, created.key), "revocation not heard")
            assert took < 1.0

    asyncio.run(body())


def test_a_listener_that_lost_its_connection_reloads_what_it_missed(
    postgres: PostgresCluster,
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with two_stores(postgres, tmp_path) as (url, one, two):
            await one.create_org(OrgCreate(name="acme", regions=["eu-west"]), "system")
            await _until(lambda: "acme" in two.orgs, "org not heard")
            connection = await asyncpg.connect(url)
            try:
                # A change nobody announces (as if its NOTIFY were lost), then the listeners
                # lose their connections: on reconnecting they must reload everything.
                await connection.execute("UPDATE orgs SET budget_tokens = 77 WHERE name = 'acme'")
                ended = await connection.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = $1",
                    LISTENER_NAME,
                )
            finally:
                await connection.close()
            assert ended == 2  # one listener per store
            await _until(lambda: two.orgs["acme"].budget_tokens == 77, "not reloaded")
            await _until(lambda: one.orgs["acme"].budget_tokens == 77, "not reloaded")
            # And the reconnected listener hears announcements again.
            await one.set_budget("acme", 99, "system")
            await _until(lambda: two.orgs["acme"].budget_tokens == 99, "not heard again")

    asyncio.run(body())


@pytest.mark.parametrize("kind", ["org", "user", "key"])
def test_a_store_ignores_announcements_about_what_it_does_not_know(
    postgres: PostgresCluster,
    tmp_path: Path,
    kind: str,
) -> None:
    """A hostile or stale announcement (any process may NOTIFY the channel) names nothing
    real: it changes nothing and breaks nothing."""

    async def body() -> None:
        url = await migrated_database(postgres, "sharing")
        store = await TenancyStore.open(tmp_path / "policy.db", database=url)
        try:
            await store.create_org(OrgCreate(name="acme", regions=["eu-west"]), "system")
            before = (dict(store.orgs), dict(store.users), dict(store.keys))
            connection = await asyncpg.connect(url)
            try:
                for payload in (f"someone {kind} nothing-here", "garbage", "", "x y"):
                    await connection.execute("SELECT pg_notify('palisade_policy', $1)", payload)
            finally:
                await connection.close()
            generation = store.generation
            await store.set_budget("acme", 5, "system")  # still works, still announced
            await _until(lambda: store.generation > generation, "no change")
            assert set(store.orgs) == set(before[0])
            assert store.users == before[1]
            assert store.keys == before[2]
        finally:
            await store.close()

    asyncio.run(body())
