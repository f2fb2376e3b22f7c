"""A private PostgreSQL cluster for tests: the context manager `postgres_cluster` and the
session fixture `postgres`, which tests/conftest.py registers for every test. Do not import the
fixture into a test module: pytest would make that module a cluster of its own (a fixture is
instantiated once per module that defines it, whatever its scope).

The cluster is a real one (router/_private/postgres.py: initdb, pg_ctl, 127.0.0.1 on a
free port, SCRAM), made once in the session's temporary directory and stopped at its end.
A test makes its own database with `postgres.create_database(name)`, which returns its URL.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from federation._private.database import open_database
from federation._private.migrations import migrate
from router._private.postgres import PostgresCluster


@contextmanager
def postgres_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """A new cluster, initialised and started; stopped (and its leftovers ended) on exit."""
    cluster = PostgresCluster(tmp_path_factory.mktemp("postgres") / "cluster")
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    with postgres_cluster(tmp_path_factory) as cluster:
        yield cluster


_databases = itertools.count()


async def migrated_database(cluster: PostgresCluster, prefix: str) -> str:
    """A new database in `cluster` (`<prefix>_<n>`), migrated to this code's schema; its URL."""
    url = cluster.create_database(f"{prefix}_{next(_databases)}")
    db = await open_database(url, Path())
    try:
        await migrate(db, now="2026-12-02T00:00:00.000+00:00")
    finally:
        await db.close()
    return url
