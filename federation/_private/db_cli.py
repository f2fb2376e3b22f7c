"""`palisade db`: the policy database's schema (`migrate`, `status`).

A SQLite store migrates itself when its server starts; a PostgreSQL store shared by several
routers is migrated once, by the operator, before they start (a router refuses a store that
is behind or ahead of it).
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from federation._private.client import fail
from federation._private.database import StoreError, open_database
from federation._private.migrations import (
    LATEST,
    MIGRATIONS,
    Migration,
    migrate,
    schema_version,
)

db_cli = typer.Typer(help="The policy database: schema migrations.", no_args_is_help=True)

DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database",
        envvar="PALISADE_DATABASE",
        help="postgresql://user@host:port/db (password from PGPASSFILE or ~/.pgpass) or a "
        "SQLite path; default policy.db in $PALISADE_HOME.",
    ),
]


def _home() -> Path:
    return Path(os.environ.get("PALISADE_HOME", "var")).resolve()


@db_cli.command("migrate")
def migrate_command(database: DatabaseOpt = None) -> None:
    """Apply the schema migrations the database lacks, in order (each once)."""
    try:
        applied, location = asyncio.run(_migrate(database))
    except StoreError as exc:
        raise fail(exc.message) from None
    for migration in applied:
        typer.echo(f"applied {migration.version}: {migration.summary}")
    typer.echo(f"{location} is at schema version {LATEST}.")


@db_cli.command("status")
def status_command(database: DatabaseOpt = None) -> None:
    """The database's schema version, and the versions this Palisade knows."""
    try:
        version, location = asyncio.run(_version(database))
    except StoreError as exc:
        raise fail(exc.message) from None
    typer.echo(f"{location}: schema version {version}; this Palisade knows up to {LATEST}.")
    for migration in MIGRATIONS:
        state = "applied" if migration.version <= version else "pending"
        typer.echo(f"  {migration.version} {state}: {migration.summary}")
    if version != LATEST:
        raise typer.Exit(1)


async def _migrate(target: str | None) -> tuple[list[Migration], str]:
    db = await open_database(target, _home())
    try:
        applied = await migrate(db, now=datetime.now(UTC).isoformat(timespec="milliseconds"))
        return list(applied), db.location
    finally:
        await db.close()


async def _version(target: str | None) -> tuple[int, str]:
    db = await open_database(target, _home())
    try:
        return await schema_version(db), db.location
    finally:
        await db.close()
