"""`SharedMembers.routers_sharing`: the live routers of a shared store, which each router
divides every key's rate limits by (federation/_private/gate.py). A real PostgreSQL
database; a killed router is a row whose beats stopped (aged in place, no waiting)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from federation._private.database import Database, open_database
from federation._private.migrations import migrate
from router import Fleet, HealthConfig
from router._private.fleet import Node
from router._private.postgres import PostgresCluster
from router._private.shared_members import SHARE_LIVE_S, SharedMembers


async def _joined(_node: Node) -> None:
    return None


def members(db: Database, router_id: str) -> SharedMembers:
    return SharedMembers(
        db,
        Fleet(HealthConfig()),
        router_id=router_id,
        public_url=lambda: f"http://{router_id}.test",
        revoked=lambda _serial: False,
        joined=_joined,
    )


async def age(db: Database, router_id: str, seconds: float) -> None:
    async with db.transaction() as tx:
        await tx.execute(
            "UPDATE routers SET seen_at = seen_at - ? WHERE id = ?", (seconds, router_id)
        )


def test_live_routers_are_counted_and_dead_or_stopped_ones_drop_out(
    tmp_path: Path,
    postgres: PostgresCluster,
) -> None:
    async def body() -> None:
        db = await open_database(postgres.create_database("routers_sharing"), tmp_path)
        try:
            await migrate(db, now="2026-01-01T00:00:00Z")
            one, two, three = (members(db, f"router-{n}") for n in (1, 2, 3))
            assert one.routers_sharing() == 1  # before any beat: alone
            await one.announce()
            assert one.routers_sharing() == 1
            await two.announce()
            await three.announce()
            assert three.routers_sharing() == 3
            await one.announce()
            assert one.routers_sharing() == 3
            await age(db, "router-3", SHARE_LIVE_S - 1.0)  # late, not dead
            await one.announce()
            assert one.routers_sharing() == 3
            await age(db, "router-3", 1.5)  # its beats stopped SHARE_LIVE_S + 0.5 s ago
            await one.announce()
            assert one.routers_sharing() == 2
            await two.stop()  # a router stopped removes itself at once
            await one.announce()
            assert one.routers_sharing() == 1
        finally:
            await db.close()

    asyncio.run(body())
