"""The router's small SQLite files (the fleet registry, rollouts): a connection per call,
autocommit, and write transactions taken before the first read so checks and writes agree."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path


@contextmanager
def connection(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(path, isolation_level=None, timeout=10)) as db:
        yield db


@contextmanager
def write_transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """One `BEGIN IMMEDIATE` transaction, committed if the block ends normally."""
    with connection(path) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
