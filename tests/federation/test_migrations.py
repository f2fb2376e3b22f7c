"""Schema migrations of the policy store, on SQLite and a real PostgreSQL.

A `policy.db` made before versions were kept is upgraded in place, its rows kept; a shared
PostgreSQL store is migrated once by `palisade db migrate` (twice at once applies each step
once) and a server refuses one that is behind or ahead of the code.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from federation import StoreError, TenancyStore
from federation._private.database import open_database
from federation._private.migrations import LATEST, MIGRATIONS, migrate, schema_version
from router._private.postgres import PostgresCluster
from tests.support import run_palisade

_names = (f"migrations_{n}" for n in itertools.count())
NOW = "2026-12-02T00:00:00.000+00:00"

# The schema of the releases before migrations were numbered, as they left policy.db: usage
# rows without request ids or cached tokens, no palisade_schema table.
_OLD_SCHEMA = """
CREATE TABLE orgs (name TEXT PRIMARY KEY, regions TEXT NOT NULL, budget_tokens INTEGER,
    logging_mode TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, role TEXT NOT NULL,
    org TEXT, created_at TEXT NOT NULL, removed_at TEXT);
CREATE TABLE usage (id INTEGER PRIMARY KEY, at TEXT NOT NULL, org TEXT NOT NULL,
    user_id TEXT NOT NULL, key_id TEXT, model TEXT NOT NULL, region TEXT NOT NULL,
    node TEXT NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    latency_ms REAL NOT NULL, status TEXT NOT NULL, cost REAL NOT NULL);
INSERT INTO orgs VALUES ('acme', '["eu-west"]', 500, 'full', '2025-01-01T00:00:00.000+00:00');
INSERT INTO usage (at, org, user_id, key_id, model, region, node, input_tokens,
    output_tokens, latency_ms, status, cost)
    VALUES ('2025-01-02T00:00:00.000+00:00', 'acme', 'usr_1', NULL, 'm', 'eu-west', 'n1',
    3, 4, 1.5, 'ok', 0.0);
"""


def _fresh_database(cluster: PostgresCluster) -> str:
    return cluster.create_database(next(_names))


async def _version(target: str) -> int:
    db = await open_database(target, Path())
    try:
        return await schema_version(db)
    finally:
        await db.close()


async def _set_version(target: str, version: int) -> None:
    db = await open_database(target, Path())
    try:
        async with db.transaction() as tx:
            await tx.execute(
                "INSERT INTO palisade_schema VALUES (?, ?, ?)", (version, "from the future", NOW)
            )
    finally:
        await db.close()


async def migrate_file(path: Path) -> None:
    db = await open_database(str(path), path.parent)
    try:
        await migrate(db, now=NOW)
    finally:
        await db.close()


def test_an_old_policy_db_is_upgraded_in_place_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "policy.db"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(_OLD_SCHEMA)

    async def body() -> None:
        store = await TenancyStore.open(path)
        try:
            assert store.orgs["acme"].budget_tokens == 500
            (record,) = await store.usage_records("acme")
            assert (record.input_tokens, record.output_tokens, record.cached_tokens) == (3, 4, 0)
            assert record.request_id is None
        finally:
            await store.close()

    asyncio.run(body())
    with closing(sqlite3.connect(path)) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
        versions = [row[0] for row in db.execute("SELECT version FROM palisade_schema")]
    assert {"request_id", "cached_tokens"} <= columns
    assert versions == [m.version for m in MIGRATIONS]
    assert asyncio.run(_version(str(path))) == LATEST


def test_a_server_refuses_a_sqlite_store_from_a_newer_release(tmp_path: Path) -> None:
    path = tmp_path / "policy.db"
    asyncio.run(migrate_file(path))
    asyncio.run(_set_version(str(path), LATEST + 1))
    with pytest.raises(StoreError) as refused:
        asyncio.run(TenancyStore.open(path))
    assert refused.value.code == "schema_ahead"
    assert f"version {LATEST + 1}" in refused.value.message


def test_postgresql_is_migrated_by_the_operator_not_by_a_router(
    postgres: PostgresCluster,
    tmp_path: Path,
) -> None:
    url = _fresh_database(postgres)
    with pytest.raises(StoreError) as behind:
        asyncio.run(TenancyStore.open(tmp_path / "policy.db", database=url))
    assert behind.value.code == "schema_behind"
    assert "palisade db migrate" in behind.value.message
    password = url.split(":")[2].split("@")[0]
    assert password not in behind.value.message  # the URL is shown without its password

    env = {"PALISADE_DATABASE": url, "PALISADE_HOME": str(tmp_path)}
    status = run_palisade("db", "status", env=env)
    assert status.returncode == 1, status.stdout + status.stderr
    assert "schema version 0" in status.stdout

    first = run_palisade("db", "migrate", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert [f"applied {m.version}:" in first.stdout for m in MIGRATIONS] == [True] * len(MIGRATIONS)
    again = run_palisade("db", "migrate", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "applied" not in again.stdout
    assert password not in first.stdout + first.stderr + again.stdout + again.stderr

    status = run_palisade("db", "status", env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"schema version {LATEST}" in status.stdout

    async def opened() -> None:
        store = await TenancyStore.open(tmp_path / "policy.db", database=url)
        await store.close()

    asyncio.run(opened())


def test_two_migrations_at_once_apply_each_step_once(
    postgres: PostgresCluster,
) -> None:
    url = _fresh_database(postgres)

    async def both() -> list[list[int]]:
        first, second = await open_database(url, Path()), await open_database(url, Path())
        try:
            applied = await asyncio.gather(migrate(first, now=NOW), migrate(second, now=NOW))
            return [[m.version for m in run] for run in applied]
        finally:
            await first.close()
            await second.close()

    runs = asyncio.run(both())
    assert sorted(runs[0] + runs[1]) == [m.version for m in MIGRATIONS]
    assert asyncio.run(_version(url)) == LATEST


def test_a_router_refuses_a_postgresql_store_from_a_newer_release(
    postgres: PostgresCluster,
    tmp_path: Path,
) -> None:
    url = _fresh_database(postgres)
    env = {"PALISADE_DATABASE": url, "PALISADE_HOME": str(tmp_path)}
    assert run_palisade("db", "migrate", env=env).returncode == 0
    asyncio.run(_set_version(url, LATEST + 1))
    served = run_palisade(
        "router", "serve", "--port", "0", "--fleet-port", "0", "--database", url,
        env={"PALISADE_HOME": str(tmp_path / "router")},
    )  # fmt: skip
    assert served.returncode == 1, served.stdout + served.stderr
    assert f"schema version {LATEST + 1}" in served.stdout + served.stderr
    assert url not in served.stdout + served.stderr
