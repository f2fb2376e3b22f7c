"""Budget-share leases: the router's gate and every node's share never add up past a budget,
and a node's usage report counts each row once (real TenancyStore and Gate, injected clock,
no sockets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from federation import (
    EdgeRow,
    Gate,
    Heartbeat,
    InvalidRequestError,
    NodeModel,
    PeerIdentity,
    PermissionDeniedError,
    Principal,
    RateLimitError,
    TenancyStore,
    UsageRecord,
)
from federation._private.admin_wire import OrgCreate
from router import Fleet, HealthConfig
from router._private.cli import _state
from router._private.leases import EdgeLeases, fair_share

ORG = "acme"
BUDGET = 1000
MONTH = "2026-11"
PRINCIPAL = Principal(org=ORG, user="usr_1")


def node(name: str, region: str = "eu-west") -> PeerIdentity:
    return PeerIdentity(
        node_id=name,
        role="node",
        fleet_id="fleet-00000000",
        region=region,
        device_class=None,
        serial=1,
        fingerprint="sha256:00",
        not_after=0.0,
    )


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 30, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


Books = tuple[TenancyStore, Gate, EdgeLeases]


async def open_books(home: Path, clock: Clock, *, budget: int | None = BUDGET) -> Books:
    store = await TenancyStore.open(home / "policy.db", clock=clock)
    if ORG not in store.orgs:
        await store.create_org(
            OrgCreate(name=ORG, regions=["eu-west"], budget_tokens=budget), "system"
        )
    gate = Gate(store, region="eu-west", node="router")
    await gate.start()
    leases = EdgeLeases(store, gate)
    await leases.start()
    return store, gate, leases


async def close_books(books: Books) -> None:
    store, gate, _ = books
    await gate.stop()
    await store.close()


def run(body: Callable[[], Coroutine[None, None, None]]) -> None:
    asyncio.run(body())


def row(record_id: str, tokens: int, *, month: str = MONTH, claimed_node: str = "x") -> EdgeRow:
    return EdgeRow(
        id=record_id,
        org=ORG,
        month=month,
        tokens=tokens,
        status="ok",
        record=UsageRecord(
            at="2026-11-30T12:00:00.000+00:00",
            org=ORG,
            user_id="usr_1",
            key_id="key_1",
            model="m",
            region="us-east",  # what a node claims is never what is recorded
            node=claimed_node,
            input_tokens=tokens,
            output_tokens=0,
            latency_ms=1.0,
            status="ok",
            cost=0.0,
            request_id=record_id,
        ),
        audit=None,
    )


def test_a_grant_is_at_most_half_of_what_is_left_and_never_more_than_asked() -> None:
    assert fair_share(1000, 0, 800) == 500
    assert fair_share(1000, 500, 800) == 250
    assert fair_share(1000, 0, 100) == 100
    assert fair_share(1000, 999, 50) == 1  # the last token is not stranded
    assert fair_share(1000, 1000, 50) == 0
    assert fair_share(1000, 1200, 50) == 0


def test_router_traffic_and_every_share_never_exceed_the_budget(tmp_path: Path) -> None:
    async def body() -> None:
        books = await open_books(tmp_path, Clock())
        _, gate, leases = books
        first = await leases.grant(node("n1"), ORG, 800)
        second = await leases.grant(node("n2"), ORG, 800)
        assert (first.granted, first.total, first.month) == (500, 500, MONTH)
        assert (second.granted, second.total) == (250, 250)
        assert leases.held(ORG, MONTH) == 750
        assert gate.budget_state(ORG) == (MONTH, 0, 750)
        with pytest.raises(RateLimitError) as refused:
            gate.admit(PRINCIPAL, 251, model="m")
        assert refused.value.code == "budget_exceeded"
        admitted = gate.admit(PRINCIPAL, 200, model="m")
        more = await leases.grant(node("n1"), ORG, 800)
        assert (more.granted, more.total) == (25, 525)  # half of the 50 left
        assert gate.committed(ORG, MONTH) == 200 + 775 <= BUDGET
        gate.settle(admitted, model="m", input_tokens=10, output_tokens=0, status="ok", cost=0.0)
        assert gate.committed(ORG, MONTH) == 10 + 775
        await close_books(books)

    run(body)


def test_concurrent_grants_never_hand_out_the_same_tokens(tmp_path: Path) -> None:
    async def body() -> None:
        books = await open_books(tmp_path, Clock())
        _, gate, leases = books
        grants = await asyncio.gather(
            *(leases.grant(node(f"n{i}"), ORG, 10_000) for i in range(12))
        )
        assert sum(grant.granted for grant in grants) <= BUDGET
        assert gate.committed(ORG, MONTH) == sum(grant.granted for grant in grants)
        await close_books(books)

    run(body)


def test_shares_are_durable_across_a_router_restart(tmp_path: Path) -> None:
    async def body() -> None:
        clock = Clock()
        books = await open_books(tmp_path, clock)
        await books[2].grant(node("n1"), ORG, 400)
        await books[2].report(node("n1"), [row("r1", 150)])
        await close_books(books)

        books = await open_books(tmp_path, clock)
        _, gate, leases = books
        assert leases.held(ORG, MONTH) == 250
        assert gate.budget_state(ORG) == (MONTH, 150, 250)
        [share] = leases.shares()
        assert (share.node, share.granted, share.used) == ("n1", 400, 150)
        await close_books(books)

    run(body)


def test_a_report_counts_each_row_once_and_converts_the_share_into_use(tmp_path: Path) -> None:
    async def body() -> None:
        books = await open_books(tmp_path, Clock())
        store, gate, leases = books
        await leases.grant(node("n1"), ORG, 400)
        batch = [row("r1", 100), row("r2", 30)]
        assert (await leases.report(node("n1"), batch)).ids == ["r1", "r2"]
        # Sent again (a lost answer, a node killed before it forgot them) with one new row,
        # and the same row twice in one report.
        again = [*batch, row("r3", 20), row("r3", 20)]
        assert (await leases.report(node("n1"), again)).ids == ["r1", "r2", "r3"]
        assert gate.budget_state(ORG) == (MONTH, 150, 250)
        assert (await store.month_usage(MONTH))[ORG] == 150
        records = await store.usage_records(ORG)
        assert sorted(r.request_id or "" for r in records) == ["r1", "r2", "r3"]
        # Attributed to the node and region its certificate names, whatever the row said.
        assert {(r.node, r.region) for r in records} == {("n1", "eu-west")}
        await close_books(books)

    run(body)


def test_a_node_gets_no_share_of_an_org_outside_its_certified_region(tmp_path: Path) -> None:
    async def body() -> None:
        books = await open_books(tmp_path, Clock())
        with pytest.raises(PermissionDeniedError) as refused:
            await books[2].grant(node("n9", region="us-east"), ORG, 100)
        assert refused.value.code == "residency_violation"
        assert books[2].held(ORG, MONTH) == 0
        await close_books(books)

    run(body)


def test_an_org_without_a_budget_needs_no_share(tmp_path: Path) -> None:
    async def body() -> None:
        books = await open_books(tmp_path, Clock(), budget=None)
        grant = await books[2].grant(node("n1"), ORG, 100)
        assert (grant.granted, grant.total) == (0, None)
        await close_books(books)

    run(body)


def test_a_new_month_starts_without_last_months_shares(tmp_path: Path) -> None:
    async def body() -> None:
        clock = Clock()
        books = await open_books(tmp_path, clock)
        await books[2].grant(node("n1"), ORG, 800)
        clock.now = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
        _, gate, leases = books
        assert gate.budget_state(ORG) == ("2026-12", 0, 0)
        grant = await leases.grant(node("n1"), ORG, 800)
        assert (grant.month, grant.granted) == ("2026-12", 500)
        await close_books(books)

    run(body)


def test_a_rows_cached_tokens_are_recorded_at_most_its_input(tmp_path: Path) -> None:
    """A node's prompt-cache hits reach the router's books; a count larger than the row's
    input (a faulty node) is recorded as all of its input, never more."""

    async def body() -> None:
        books = await open_books(tmp_path, Clock())
        store, _, leases = books
        await leases.grant(node("n1"), ORG, 400)
        cached, inflated = row("c1", 100), row("c2", 10)
        assert cached.record is not None
        assert inflated.record is not None
        cached.record = msgspec.structs.replace(cached.record, cached_tokens=60)
        inflated.record = msgspec.structs.replace(inflated.record, cached_tokens=500)
        await leases.report(node("n1"), [cached, inflated, row("c3", 5)])
        records = {r.request_id: r.cached_tokens for r in await store.usage_records(ORG)}
        assert records == {"c1": 60, "c2": 10, "c3": 0}
        await close_books(books)

    run(body)


def test_a_row_whose_record_does_not_add_up_is_refused_and_nothing_counts(tmp_path: Path) -> None:
    async def body() -> None:
        books = await open_books(tmp_path, Clock())
        store, gate, leases = books
        await leases.grant(node("n1"), ORG, 400)
        inflated = msgspec.structs.replace(row("bad", 10), tokens=5)
        with pytest.raises(InvalidRequestError) as refused:
            await leases.report(node("n1"), [row("good", 20), inflated])
        assert refused.value.code == "invalid_usage_row"
        assert await store.usage_records(ORG) == []
        assert gate.budget_state(ORG) == (MONTH, 0, 400)
        await close_books(books)

    run(body)


def test_fleet_status_shows_when_a_node_went_offline() -> None:
    """Up and reconciling: the outage its heartbeat reports. Down: since its last beat."""
    now = [1000.0]
    fleet = Fleet(HealthConfig(), clock=lambda: now[0])
    model = NodeModel(id="m", device_class="cpu", context_length=2048, ready=True)
    outage = time.time() - 3600
    fleet.beat(
        Heartbeat(
            node_id="n1",
            region="eu-west",
            url="https://n1.test:1",
            version="t",
            models=[model],
            offline_since=outage,
        )
    )
    [row] = fleet.status("router").nodes
    assert (row.state, row.offline_since) == ("up", outage)
    assert _state(msgspec.to_builtins(row)).startswith("up (offline since 20")
    now[0] += 60
    fleet.sweep()
    [row] = fleet.status("router").nodes
    assert row.state == "down"
    assert row.offline_since is not None
    assert abs(row.offline_since - (time.time() - 60)) < 5  # its last heartbeat, wall clock
