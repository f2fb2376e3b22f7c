"""The policy database's schema, as numbered migrations, for SQLite and PostgreSQL.

Each migration runs in its own transaction and records itself in `palisade_schema`, so a
database's version is the highest number there (0: none applied). `migrate` applies the
ones a database lacks, in order; `palisade db migrate` runs it, and so does every start
on SQLite (the embedded default upgrades itself). A PostgreSQL store shared by several
routers is migrated once, by the operator: a router refuses to start on one that is behind
(`schema_behind`) or ahead of what it knows (`schema_ahead`: a newer Palisade migrated it;
running older code on it could corrupt it). Migrations on PostgreSQL hold an advisory lock,
so two `migrate` runs at once apply each step once.

Version 1 is the schema as it was before versions were kept: on SQLite it is written with
`IF NOT EXISTS` and upgrades such a database in place (adding the columns later releases
added), so every existing `policy.db` continues.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from federation._private.database import Database, StoreError, Transaction, open_database

# Any fixed number: the key of the advisory lock `migrate` holds on PostgreSQL.
_LOCK = 0x70A115AD


@dataclass(frozen=True)
class Migration:
    version: int
    summary: str
    sqlite: str
    postgresql: str
    # A step in Python after the SQL (SQLite only: columns that older files may lack).
    sqlite_after: Callable[[Transaction], Awaitable[None]] | None = None

    def statements(self, dialect: str) -> list[str]:
        script = self.postgresql if dialect == "postgresql" else self.sqlite
        return [part.strip() for part in script.split(";") if part.strip()]


async def _upgrade_old_sqlite(tx: Transaction) -> None:
    """Columns that `policy.db` files made before they existed lack."""
    columns = {row[1] for row in await tx.fetch("PRAGMA table_info(usage)")}
    if "request_id" not in columns:
        await tx.execute("ALTER TABLE usage ADD COLUMN request_id TEXT")
    if "cached_tokens" not in columns:
        await tx.execute("ALTER TABLE usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0")
    await tx.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS usage_request ON usage (request_id) "
        "WHERE request_id IS NOT NULL"
    )


_V1_SQLITE = """
CREATE TABLE IF NOT EXISTS orgs (
    name TEXT PRIMARY KEY, regions TEXT NOT NULL, budget_tokens INTEGER,
    logging_mode TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, role TEXT NOT NULL, org TEXT,
    created_at TEXT NOT NULL, removed_at TEXT);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, user_id TEXT NOT NULL, org TEXT NOT NULL,
    secret_hash BLOB NOT NULL, created_at TEXT NOT NULL, last_used_at TEXT, expires_at TEXT,
    revoked_at TEXT, regions TEXT, limits TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invites (
    token_hash BLOB PRIMARY KEY, email TEXT NOT NULL, org TEXT NOT NULL, role TEXT NOT NULL,
    invited_by TEXT NOT NULL, created_at TEXT NOT NULL, expires_at TEXT NOT NULL,
    accepted_at TEXT);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY, at TEXT NOT NULL, org TEXT NOT NULL, user_id TEXT NOT NULL,
    key_id TEXT, model TEXT NOT NULL, region TEXT NOT NULL, node TEXT NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, latency_ms REAL NOT NULL,
    status TEXT NOT NULL, cost REAL NOT NULL, request_id TEXT,
    cached_tokens INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS usage_org_at ON usage (org, at);
CREATE TABLE IF NOT EXISTS journal_marks (
    name TEXT PRIMARY KEY, epoch TEXT NOT NULL, settled_through INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS budget_usage (
    org TEXT NOT NULL, month TEXT NOT NULL, used_tokens INTEGER NOT NULL,
    PRIMARY KEY (org, month));
CREATE TABLE IF NOT EXISTS org_key_limits (
    org TEXT PRIMARY KEY, limits TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY, at TEXT NOT NULL, event TEXT NOT NULL, actor TEXT NOT NULL,
    org TEXT, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edge_leases (
    node TEXT NOT NULL, org TEXT NOT NULL, month TEXT NOT NULL, granted INTEGER NOT NULL,
    used INTEGER NOT NULL, PRIMARY KEY (node, org, month));
CREATE TABLE IF NOT EXISTS edge_records (
    id TEXT PRIMARY KEY, node TEXT NOT NULL, month TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS org_region_spans (
    org TEXT NOT NULL, region TEXT NOT NULL, since TEXT NOT NULL, until TEXT)
"""

_V1_POSTGRESQL = """
CREATE TABLE orgs (
    name TEXT PRIMARY KEY, regions TEXT NOT NULL, budget_tokens BIGINT,
    logging_mode TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE users (
    id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, role TEXT NOT NULL, org TEXT,
    created_at TEXT NOT NULL, removed_at TEXT);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, user_id TEXT NOT NULL, org TEXT NOT NULL,
    secret_hash BYTEA NOT NULL, created_at TEXT NOT NULL, last_used_at TEXT, expires_at TEXT,
    revoked_at TEXT, regions TEXT, limits TEXT NOT NULL);
CREATE TABLE invites (
    token_hash BYTEA PRIMARY KEY, email TEXT NOT NULL, org TEXT NOT NULL, role TEXT NOT NULL,
    invited_by TEXT NOT NULL, created_at TEXT NOT NULL, expires_at TEXT NOT NULL,
    accepted_at TEXT);
CREATE TABLE usage (
    id BIGSERIAL PRIMARY KEY, at TEXT NOT NULL, org TEXT NOT NULL, user_id TEXT NOT NULL,
    key_id TEXT, model TEXT NOT NULL, region TEXT NOT NULL, node TEXT NOT NULL,
    input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL, status TEXT NOT NULL, cost DOUBLE PRECISION NOT NULL,
    request_id TEXT, cached_tokens BIGINT NOT NULL DEFAULT 0);
CREATE INDEX usage_org_at ON usage (org, at);
CREATE UNIQUE INDEX usage_request ON usage (request_id) WHERE request_id IS NOT NULL;
CREATE TABLE journal_marks (
    name TEXT PRIMARY KEY, epoch TEXT NOT NULL, settled_through BIGINT NOT NULL);
CREATE TABLE budget_usage (
    org TEXT NOT NULL, month TEXT NOT NULL, used_tokens BIGINT NOT NULL,
    PRIMARY KEY (org, month));
CREATE TABLE org_key_limits (
    org TEXT PRIMARY KEY, limits TEXT NOT NULL);
CREATE TABLE audit_events (
    id BIGSERIAL PRIMARY KEY, at TEXT NOT NULL, event TEXT NOT NULL, actor TEXT NOT NULL,
    org TEXT, payload TEXT NOT NULL);
CREATE TABLE edge_leases (
    node TEXT NOT NULL, org TEXT NOT NULL, month TEXT NOT NULL, granted BIGINT NOT NULL,
    used BIGINT NOT NULL, PRIMARY KEY (node, org, month));
CREATE TABLE edge_records (
    id TEXT PRIMARY KEY, node TEXT NOT NULL, month TEXT NOT NULL);
CREATE TABLE org_region_spans (
    seq BIGSERIAL, org TEXT NOT NULL, region TEXT NOT NULL, since TEXT NOT NULL, until TEXT)
"""

# Budget slices leased to routers sharing a store (budget_slices.py), the fleet's members
# as each router last heard them (every router knows every node), and the routers
# themselves (each one's share of a key's rate; where the fleet's evidence is). `expires_at` and
# `seen_at` are the database's own clock, in seconds since the epoch.
_V2_SQLITE = """
CREATE TABLE IF NOT EXISTS budget_slices (
    org TEXT NOT NULL, month TEXT NOT NULL, holder TEXT NOT NULL, granted INTEGER NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (org, month, holder));
CREATE TABLE IF NOT EXISTS fleet_members (
    node TEXT PRIMARY KEY, heartbeat BLOB NOT NULL, heard_by TEXT NOT NULL,
    seen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS routers (
    id TEXT PRIMARY KEY, public_url TEXT NOT NULL, seen_at REAL NOT NULL)
"""

_V2_POSTGRESQL = """
CREATE TABLE budget_slices (
    org TEXT NOT NULL, month TEXT NOT NULL, holder TEXT NOT NULL, granted BIGINT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (org, month, holder));
CREATE TABLE fleet_members (
    node TEXT PRIMARY KEY, heartbeat BYTEA NOT NULL, heard_by TEXT NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL);
CREATE TABLE routers (
    id TEXT PRIMARY KEY, public_url TEXT NOT NULL, seen_at DOUBLE PRECISION NOT NULL)
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "orgs, users, keys, invites, usage, budgets, audit events, edge leases",
        _V1_SQLITE,
        _V1_POSTGRESQL,
        sqlite_after=_upgrade_old_sqlite,
    ),
    Migration(
        2,
        "budget slices of routers sharing a store; fleet members; routers",
        _V2_SQLITE,
        _V2_POSTGRESQL,
    ),
)
LATEST = MIGRATIONS[-1].version

_VERSIONS = """
CREATE TABLE IF NOT EXISTS palisade_schema (
    version INTEGER PRIMARY KEY, summary TEXT NOT NULL, applied_at TEXT NOT NULL)
"""


async def schema_version(db: Database) -> int:
    """The highest migration applied (0: none, or a database made before versions)."""
    async with db.transaction() as tx:
        await _lock(db, tx)  # CREATE TABLE IF NOT EXISTS races with itself on PostgreSQL
        await tx.execute(_VERSIONS)
        row = await tx.fetchone("SELECT max(version) FROM palisade_schema")
    return int(row[0]) if row is not None and row[0] is not None else 0


async def migrate(db: Database, *, now: str) -> list[Migration]:
    """Apply the migrations `db` lacks, in order; the ones applied. A database a newer
    release migrated is refused, not touched."""
    version = await schema_version(db)
    if version > LATEST:
        raise _ahead(db, version)
    applied: list[Migration] = []
    for migration in MIGRATIONS:
        async with db.transaction() as tx:
            await _lock(db, tx)
            await tx.execute(_VERSIONS)
            row = await tx.fetchone(
                "SELECT 1 FROM palisade_schema WHERE version = ?", (migration.version,)
            )
            if row is not None:
                continue
            for statement in migration.statements(db.dialect):
                await tx.execute(statement)
            if db.dialect == "sqlite" and migration.sqlite_after is not None:
                await migration.sqlite_after(tx)
            await tx.execute(
                "INSERT INTO palisade_schema VALUES (?, ?, ?)",
                (migration.version, migration.summary, now),
            )
        applied.append(migration)
    return applied


async def check_target(target: str | None, home: Path) -> None:
    """Before a server starts: refuse the store `target` names if its schema is ahead of
    this code, or (shared) behind it; a SQLite store behind is migrated when it opens."""
    db = await open_database(target, home)
    try:
        if db.shared:
            await check_schema(db)
        else:
            version = await schema_version(db)
            if version > LATEST:
                raise _ahead(db, version)
    finally:
        await db.close()


async def check_schema(db: Database) -> None:
    """Refuse a database this code cannot safely use: ahead of it, or (shared) behind it."""
    version = await schema_version(db)
    if version > LATEST:
        raise _ahead(db, version)
    if version < LATEST:
        raise StoreError(
            f"The policy database {db.location} is at schema version {version}, behind "
            f"this Palisade's {LATEST}. Run `palisade db migrate --database …` first.",
            code="schema_behind",
        )


def _ahead(db: Database, version: int) -> StoreError:
    return StoreError(
        f"The policy database {db.location} is at schema version {version}; this "
        f"Palisade knows versions up to {LATEST}. Upgrade Palisade to use it.",
        code="schema_ahead",
    )


async def _lock(db: Database, tx: Transaction) -> None:
    """On PostgreSQL, one schema change at a time (until this transaction ends)."""
    if db.dialect == "postgresql":
        await tx.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK,))
