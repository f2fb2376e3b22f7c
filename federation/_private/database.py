"""The policy database seam: one interface over SQLite and PostgreSQL.

SQLite (aiosqlite, one connection, `policy.db` under the server's home) is the embedded
default. PostgreSQL (asyncpg, a connection pool) is for several routers sharing one store:
`--database postgresql://…`. The tenancy store speaks only to `Database` and `Transaction`.

SQL is written once, in the subset both dialects speak: `?` placeholders (turned into
PostgreSQL's `$1, $2, …` here, once per statement), `ON CONFLICT … DO NOTHING | DO UPDATE`
(never `INSERT OR IGNORE`), `CAST(sum(…) AS BIGINT)` where a sum must stay an integer.
The few words that differ (a table's insertion order) are attributes of the database.

A transaction is a block: `async with db.transaction() as tx:` commits when the block ends
normally and rolls back when it raises. `tx.notify(topic)` announces a change to the other
processes sharing the database (PostgreSQL `NOTIFY`, delivered only if the transaction
commits); `db.listen(callback)` receives them. SQLite has no other process to tell.

This module is also the one place that maps the drivers' errors: every failure leaves it
as a `StoreError` naming the operation, never as a driver's own exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiosqlite

from federation._private.errors import ServiceUnavailableError
from federation._private.private_files import private_database

log = logging.getLogger("palisade.federation.database")
Row = tuple[Any, ...]
Dialect = Literal["sqlite", "postgresql"]
# The channel every process sharing a PostgreSQL store listens on for policy changes.
CHANNEL = "palisade_policy"
_POOL_MIN, _POOL_MAX = 2, 10
_CONNECT_TIMEOUT_S = 10.0


class StoreError(ServiceUnavailableError):
    """The policy database failed; the message says which operation. Over HTTP, a 503
    `store_unavailable` (a management change the database refused is not made)."""

    default_code = "store_unavailable"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, retry_after=5)


class Transaction(Protocol):
    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...

    def notify(self, topic: str) -> None:
        """Tell the other processes sharing the database, once this transaction commits."""
        ...


class Database(Protocol):
    dialect: Dialect
    # Whether other processes may change the store behind this one's back (and so whether
    # budgets must be leased rather than counted in memory).
    shared: bool
    # Where the database is, with any password removed: safe to log and to show.
    location: str
    # A table's order of insertion (SQLite's `rowid`; an identity column in PostgreSQL).
    rowid: str

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Transaction]: ...

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...

    async def listen(self, callback: Callable[[str], None]) -> None:
        """Call `callback(topic)` for each change another process announces, and with
        `RELOAD` whenever some may have been missed (the listening connection was lost)."""
        ...

    async def settled(self) -> None:
        """Return once every transaction already begun has ended."""
        ...

    async def heard_up_to_now(self) -> None:
        """Return once the listener has been handed every announcement committed before
        this call (nothing to wait for where there is no other process)."""
        ...

    async def close(self) -> None: ...


# The listening connection's application_name (pg_stat_activity shows it).
LISTENER_NAME = "palisade-policy-listener"
# A payload starting so is a process's own marker (`heard_up_to_now`), never a change.
_MARKER = "marker:"
# Passed to a listener when announcements may have been lost: reload everything.
RELOAD = "*"


def open_target(target: str | None, home: Path) -> tuple[Dialect, str]:
    """The dialect and location of `--database`: a PostgreSQL URL, a SQLite path or
    `sqlite:///path`, or nothing (policy.db under `home`)."""
    if not target:
        return "sqlite", str(home / "policy.db")
    scheme = urlsplit(target).scheme
    if scheme in ("postgresql", "postgres"):
        return "postgresql", target
    if scheme == "sqlite":
        return "sqlite", target.removeprefix("sqlite://")
    if scheme:
        raise StoreError(
            f"Unsupported database `{redacted(target)}`: give a postgresql:// URL, a SQLite "
            "file path or sqlite:///path."
        )
    return "sqlite", target


async def open_database(target: str | None, home: Path) -> Database:
    dialect, location = open_target(target, home)
    if dialect == "postgresql":
        return await PostgresDatabase.connect(location)
    return await SqliteDatabase.open(Path(location))


def redacted(url: str) -> str:
    """`url` without its password (a database URL is shown in logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    user = parts.username or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# --- SQLite ---------------------------------------------------------------------------------


class _SqliteTransaction:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cursor = await self._db.execute(sql, tuple(args))
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._db.executemany(sql, [tuple(row) for row in rows])

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        async with self._db.execute(sql, tuple(args)) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        async with self._db.execute(sql, tuple(args)) as cursor:
            row = await cursor.fetchone()
        return tuple(row) if row is not None else None

    def notify(self, topic: str) -> None:
        """Nobody else shares this file."""


class SqliteDatabase:
    """`policy.db`: one connection, transactions taken in turn (WAL, synchronous=FULL)."""

    dialect: Dialect = "sqlite"
    shared = False
    rowid = "rowid"

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._turn = asyncio.Lock()
        self.path = path
        self.location = str(path)

    @classmethod
    async def open(cls, path: Path) -> SqliteDatabase:
        private_database(path)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise StoreError(f"Cannot open the policy database {path}: {exc}.") from exc
        return cls(db, path)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self._turn:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield _SqliteTransaction(self._db)
            except sqlite3.Error as exc:
                await self._rollback()
                raise StoreError(f"The policy database refused a change: {exc}.") from exc
            except BaseException:
                await self._rollback()
                raise
            try:
                await self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                raise StoreError(f"The policy database refused a commit: {exc}.") from exc

    async def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            await self._db.execute("ROLLBACK")

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        try:
            return await _SqliteTransaction(self._db).fetch(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"Reading the policy database failed: {exc}.") from exc

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        try:
            return await _SqliteTransaction(self._db).fetchone(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"Reading the policy database failed: {exc}.") from exc

    async def listen(self, callback: Callable[[str], None]) -> None:
        """Only this process writes a SQLite store: there is nothing to hear."""

    async def settled(self) -> None:
        async with self._turn:
            pass

    async def heard_up_to_now(self) -> None:
        """Only this process writes a SQLite store."""

    async def close(self) -> None:
        await self._db.close()


# --- PostgreSQL -----------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\?")


def postgres_sql(sql: str) -> str:
    """`?` placeholders as `$1, $2, …` (our statements hold no `?` in literals)."""
    count = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(count)}", sql)


def _rows_changed(status: str) -> int:
    """asyncpg's command tag (`INSERT 0 1`, `UPDATE 3`): its last number."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


@dataclass
class _Statements:
    cache: dict[str, str]

    def __call__(self, sql: str) -> str:
        converted = self.cache.get(sql)
        if converted is None:
            converted = self.cache[sql] = postgres_sql(sql)
        return converted


class _PostgresTransaction:
    def __init__(self, connection: Any, statements: _Statements) -> None:
        self._connection = connection
        self._sql = statements
        self.topics: list[str] = []

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        status: str = await self._connection.execute(self._sql(sql), *args)
        return _rows_changed(status)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = [tuple(row) for row in rows]
        if batch:
            await self._connection.executemany(self._sql(sql), batch)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        records = await self._connection.fetch(self._sql(sql), *args)
        return [tuple(record) for record in records]

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        record = await self._connection.fetchrow(self._sql(sql), *args)
        return tuple(record) if record is not None else None

    def notify(self, topic: str) -> None:
        if topic not in self.topics:
            self.topics.append(topic)


class PostgresDatabase:
    """A shared store: a pool of connections, and one more that listens for changes."""

    dialect: Dialect = "postgresql"
    shared = True
    rowid = "seq"

    def __init__(self, pool: Any, url: str) -> None:
        self._pool = pool
        self._url = url
        self.location = redacted(url)
        self._statements = _Statements({})
        self._open: set[asyncio.Future[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._markers: dict[str, asyncio.Future[None]] = {}

    @classmethod
    async def connect(cls, url: str) -> PostgresDatabase:
        asyncpg = _driver()
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=_POOL_MIN,
                max_size=_POOL_MAX,
                timeout=_CONNECT_TIMEOUT_S,
                command_timeout=_CONNECT_TIMEOUT_S,
            )
        except _failures() as exc:
            raise StoreError(
                f"Cannot connect to the policy database {redacted(url)}: {_reason(exc)}."
            ) from exc
        return cls(pool, url)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._open.add(done)
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                tx = _PostgresTransaction(connection, self._statements)
                yield tx
                for topic in tx.topics:
                    await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, topic)
        except _failures() as exc:
            raise StoreError(f"The policy database refused a change: {_reason(exc)}.") from exc
        finally:
            self._open.discard(done)
            done.set_result(None)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        try:
            records = await self._pool.fetch(self._statements(sql), *args)
        except _failures() as exc:
            raise StoreError(f"Reading the policy database failed: {_reason(exc)}.") from exc
        return [tuple(record) for record in records]

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        rows = await self.fetch(sql, args)
        return rows[0] if rows else None

    async def listen(self, callback: Callable[[str], None]) -> None:
        ready = asyncio.get_running_loop().create_future()
        self._listener = asyncio.create_task(self._listen_forever(callback, ready))
        await ready

    async def _listen_forever(
        self, callback: Callable[[str], None], ready: asyncio.Future[None]
    ) -> None:
        """A dedicated connection LISTENs; when it is lost, a new one is made (with a
        back-off) and the listener told to reload, since announcements may have passed."""
        delay = 0.1
        first = True
        while True:
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            try:
                connection = await _driver().connect(
                    self._url,
                    timeout=_CONNECT_TIMEOUT_S,
                    server_settings={"application_name": LISTENER_NAME},
                )
            except _failures() as exc:
                log.warning("cannot listen for policy changes yet: %s", _reason(exc))
                if first:
                    ready.set_result(None)
                    first = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                connection.add_termination_listener(functools.partial(_lost, lost))
                await connection.add_listener(
                    CHANNEL,
                    lambda _c, _pid, _channel, payload: self._hear(payload, callback),
                )
                if first:
                    ready.set_result(None)
                    first = False
                else:
                    callback(RELOAD)
                delay = 0.1
                await _watch(connection, lost)
            except _failures() as exc:
                log.warning("lost the policy change listener: %s", _reason(exc))
            finally:
                with contextlib.suppress(Exception):
                    await connection.close(timeout=1)

    async def settled(self) -> None:
        pending = list(self._open)
        if pending:
            await asyncio.gather(*pending)

    async def heard_up_to_now(self) -> None:
        """A marker of our own through the channel: PostgreSQL delivers notifications in
        commit order, so once the listener hears it, it has heard everything before it."""
        marker = f"{_MARKER}{os.urandom(8).hex()}"
        heard: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._markers[marker] = heard
        try:
            await self._pool.execute("SELECT pg_notify($1, $2)", CHANNEL, marker)
            await asyncio.wait_for(heard, _CONNECT_TIMEOUT_S)
        except _failures() as exc:  # TimeoutError is an OSError
            raise StoreError(
                f"The policy database's announcements are not arriving: {_reason(exc)}."
            ) from exc
        finally:
            self._markers.pop(marker, None)

    def _hear(self, payload: str, callback: Callable[[str], None]) -> None:
        if payload.startswith(_MARKER):
            marker = self._markers.get(payload)
            if marker is not None and not marker.done():
                marker.set_result(None)
            return  # another process's marker: not an announcement
        callback(payload)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self._pool.close()


async def _watch(connection: Any, lost: asyncio.Future[None]) -> None:
    """Until the connection is lost: a cheap query every few seconds notices a silently
    dead peer (asyncpg learns of a closed socket only when it next reads)."""
    while not lost.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(lost), 2.0)
        if lost.done() or connection.is_closed():
            return
        await connection.execute("SELECT 1", timeout=2.0)


def _lost(future: asyncio.Future[None], _connection: object) -> None:
    if not future.done():
        future.set_result(None)


def _driver() -> ModuleType:
    import asyncpg  # noqa: PLC0415 - 0.1 s of start-up, for PostgreSQL stores only

    return asyncpg


def _failures() -> tuple[type[BaseException], ...]:
    """What the driver raises when the database or the connection to it fails."""
    asyncpg = _driver()
    return (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.rstrip(".")
