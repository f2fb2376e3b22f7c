"""Which orgs a certified node may charge: the rule for usage rows and leases at the edge.

A row for org O from node N counts only if O was allowed in N's certified region at some
moment of the row's month (or within the offline grace period before it), or the router
granted N a share of O's budget for that month. Everything else is refused: not counted,
no usage row, no audit row, one management event per report, and the answer names it.
Real TenancyStore, Gate and EdgeLeases; an injected clock moves through the months.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from federation import (
    EdgeRow,
    EdgeUsageAck,
    NotFoundError,
    PermissionDeniedError,
    TenancyStore,
    UsageRecord,
)
from federation._private.admin_wire import OrgCreate
from tests.router.test_leases import ORG, Books, Clock, close_books, node, open_books, run

FOREIGN = "usco"  # allowed in us-east only
OPEN = "open"  # allowed in eu-west, no budget: its nodes never lease
EU, US = node("eu-1"), node("us-1", region="us-east")


def at(day: str) -> datetime:
    return datetime.fromisoformat(f"{day}T12:00:00+00:00").astimezone(UTC)


def row(record_id: str, org: str, tokens: int = 10, *, month: str = "2026-11") -> EdgeRow:
    return EdgeRow(
        id=record_id,
        org=org,
        month=month,
        tokens=tokens,
        status="ok",
        record=UsageRecord(
            at=f"{month}-15T12:00:00.000+00:00",
            org=org,
            user_id="usr_1",
            key_id="key_1",
            model="m",
            region="eu-west",
            node="eu-1",
            input_tokens=tokens,
            output_tokens=0,
            latency_ms=1.0,
            status="ok",
            cost=0.0,
            request_id=record_id,
        ),
        audit={"id": record_id, "org": org, "status": "ok"},
    )


@asynccontextmanager
async def fleet_books(home: Path, clock: Clock) -> AsyncIterator[Books]:
    """The router's books with three orgs, closed even when the test fails (an open
    database's thread would keep pytest from exiting)."""
    books = await open_books(home, clock)
    try:
        store = books[0]
        for name, regions in ((FOREIGN, ["us-east"]), (OPEN, ["eu-west"])):
            if name not in store.orgs:
                await store.create_org(OrgCreate(name=name, regions=regions), "system")
        yield books
    finally:
        await close_books(books)


def refused(ack: EdgeUsageAck) -> dict[str, str]:
    return {refusal.id: refusal.code for refusal in ack.refused}


async def counted(store: TenancyStore, org: str) -> dict[str, int]:
    """The usage rows the router holds for `org`, by request id."""
    return {
        r.request_id or "": r.input_tokens + r.output_tokens for r in await store.usage_records(org)
    }


async def refusal_events(store: TenancyStore) -> list[dict[str, object]]:
    return [
        {"actor": event.actor, **event.payload}
        for event in await store.audit_events(None)
        if event.event == "edge_usage_refused"
    ]


def test_a_node_cannot_charge_an_org_outside_its_region_nor_an_unknown_one(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with fleet_books(tmp_path, Clock()) as books:
            store, gate, leases = books
            await leases.grant(EU, ORG, 400)
            report = [row("a1", ORG, 30), row("f1", FOREIGN, 50), row("g1", "ghost", 70)]
            ack = await leases.report(EU, report)
            assert ack.ids == ["a1", "f1", "g1"]  # all forgotten by the node, two of them refused
            assert refused(ack) == {"f1": "residency_violation", "g1": "org_not_found"}
            assert await counted(store, ORG) == {"a1": 30}
            assert await counted(store, FOREIGN) == {}
            assert await counted(store, "ghost") == {}
            assert await store.month_usage("2026-11") == {ORG: 30}
            assert gate.budget_state(FOREIGN) == ("2026-11", 0, 0)
            assert [(s.node, s.org, s.used) for s in leases.shares()] == [("eu-1", ORG, 30)]
            [event] = await refusal_events(store)
            assert event == {
                "actor": "node:eu-1",
                "node_id": "eu-1",
                "region": "eu-west",
                "rows": 2,
                "tokens": 120,
                "codes": {"org_not_found": 1, "residency_violation": 1},
                "orgs": ["ghost", FOREIGN],
                "ids": ["f1", "g1"],
            }

            # A node resending them gets the same answer; each report is one event, not one a row.
            again = await leases.report(
                EU, [*report, *(row(f"f{i}", FOREIGN) for i in range(2, 300))]
            )
            assert len(again.refused) == 300
            assert await counted(store, FOREIGN) == {}
            events = await refusal_events(store)
            assert len(events) == 2
            assert events[1]["rows"] == 300
            assert len(events[1]["ids"]) == 10  # type: ignore[arg-type]

    run(body)


def test_a_node_gets_no_share_of_an_org_outside_its_region_nor_of_an_unknown_one(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with fleet_books(tmp_path, Clock()) as books:
            _, gate, leases = books
            with pytest.raises(PermissionDeniedError) as foreign:
                await leases.grant(US, ORG, 100)
            assert foreign.value.code == "residency_violation"
            assert "us-east" in str(foreign.value)
            with pytest.raises(NotFoundError) as unknown:
                await leases.grant(EU, "ghost", 100)
            assert unknown.value.code == "org_not_found"
            assert leases.shares() == []
            assert gate.budget_state(ORG) == ("2026-11", 0, 0)

    run(body)


def test_honest_rows_still_count_once_after_the_org_leaves_the_region(tmp_path: Path) -> None:
    """acme leaves eu-west on 20 November: eu-1's November rows (served before) count once,
    also after a router restart; rows for a month it could not have served are refused."""

    async def body() -> None:
        clock = Clock()
        clock.now = at("2026-11-10")
        async with fleet_books(tmp_path, clock) as books:
            await books[2].grant(EU, ORG, 400)
            clock.now = at("2026-11-20")
            await books[0].set_regions(ORG, ["us-east"], "system")
            await books[0].set_regions(OPEN, ["us-east"], "system")

        clock.now = at("2026-12-05")
        async with fleet_books(tmp_path, clock) as books:  # the history is durable
            store, _, leases = books
            honest = [row("n1", ORG, 40), row("o1", OPEN, 5)]  # OPEN: no lease, the history
            for _ in range(2):  # sent twice (a lost answer): counted once
                ack = await leases.report(EU, honest)
                assert (ack.ids, ack.refused) == (["n1", "o1"], [])
            late = [row("d1", ORG, month="2026-12"), row("d2", OPEN, month="2026-12")]
            early = [row("e1", ORG, month="2026-10"), row("e2", OPEN, month="2026-10")]
            ack = await leases.report(EU, [*late, *early])
            assert refused(ack) == dict.fromkeys(["d1", "d2", "e1", "e2"], "residency_violation")
            # us-1 may charge acme from the day it was allowed there, not before.
            ack = await leases.report(US, [row("u1", ORG, 7), row("u0", ORG, month="2026-10")])
            assert refused(ack) == {"u0": "residency_violation"}
            assert await counted(store, ORG) == {"n1": 40, "u1": 7}
            assert await counted(store, OPEN) == {"o1": 5}
            assert await store.month_usage("2026-11") == {ORG: 47, OPEN: 5}
            assert "2026-10" not in {s.month for s in leases.shares()}
            # Nor may anyone charge a month that has not begun (a day's clock skew aside).
            ahead = [row("a1", ORG, month="2026-12"), row("a2", ORG, month="2027-01")]
            assert refused(await leases.report(US, ahead)) == {"a2": "month_not_started"}

    run(body)


def test_a_node_serving_on_its_last_snapshot_into_the_next_month_is_still_counted(
    tmp_path: Path,
) -> None:
    """Offline, a node serves on its last snapshot for the grace period (24 h): an org that
    left its region late on 30 November may still have been served on 1 December."""

    async def body() -> None:
        clock = Clock()
        async with fleet_books(tmp_path, clock) as books:
            store, _, leases = books
            clock.now = datetime(2026, 11, 30, 20, tzinfo=UTC)
            await store.set_regions(OPEN, ["us-east"], "system")
            clock.now = datetime(2027, 1, 5, tzinfo=UTC)
            ack = await leases.report(
                EU, [row("x1", OPEN, month="2026-12"), row("x2", OPEN, month="2027-01")]
            )
            assert refused(ack) == {"x2": "residency_violation"}
            assert await counted(store, OPEN) == {"x1": 10}

    run(body)


def test_a_share_the_router_granted_proves_a_month_its_history_does_not_cover(
    tmp_path: Path,
) -> None:
    """A policy database from before the region history was kept: the lease still shows
    the router let eu-1 serve acme in November; a node that never leased gets nothing."""

    async def body() -> None:
        clock = Clock()
        async with fleet_books(tmp_path, clock) as books:
            await books[2].grant(EU, ORG, 400)
            await books[0].set_regions(ORG, ["us-east"], "system")
        with sqlite3.connect(tmp_path / "policy.db") as db:
            db.execute("DELETE FROM org_region_spans")  # as an older router left it

        async with fleet_books(tmp_path, clock) as books:
            store, _, leases = books
            assert not store.served_in(ORG, "eu-west", "2026-11")
            assert store.served_in(ORG, "us-east", "2026-11")  # since the org was created
            ack = await leases.report(EU, [row("l1", ORG, 25), row("l2", ORG, month="2026-12")])
            assert refused(ack) == {"l2": "residency_violation"}
            other = node("eu-2")
            assert refused(await leases.report(other, [row("l3", ORG)])) == {
                "l3": "residency_violation"
            }
            assert await counted(store, ORG) == {"l1": 25}

    run(body)


def test_a_row_id_replayed_for_another_org_counts_once_where_it_first_counted(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with fleet_books(tmp_path, Clock()) as books:
            store, _, leases = books
            await leases.grant(EU, ORG, 400)
            assert (await leases.report(EU, [row("r1", ORG, 30)])).refused == []
            # The same id for an org eu-1 may not charge: refused; for one it may: already held.
            assert refused(await leases.report(EU, [row("r1", FOREIGN, 30)])) == {
                "r1": "residency_violation"
            }
            ack = await leases.report(EU, [row("r1", OPEN, 30)])
            assert (ack.ids, ack.refused) == (["r1"], [])
            # Another node replaying it, for the same org: held, not counted again.
            assert (await leases.report(node("eu-2"), [row("r1", ORG, 30)])).refused == []
            assert await counted(store, ORG) == {"r1": 30}
            assert await counted(store, OPEN) == {}
            assert await counted(store, FOREIGN) == {}
            assert await store.month_usage("2026-11") == {ORG: 30}
            [record] = await store.usage_records(ORG)
            assert (record.node, record.region) == ("eu-1", "eu-west")

    run(body)
