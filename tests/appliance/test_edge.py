"""The offline edge on the appliance: admission for fleet keys from a leased budget share,
the durable edge ledger, and exactly-once reconciliation with the router.

No sockets: the appliance's `EdgeGate` talks to the router's real `EdgeLeases` (real
TenancyStore, real Gate) through an in-process link that can be cut like a network. A
"crash" drops the gate without `stop()`, as SIGKILL does: only the files remain.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from appliance._private.edge import EdgeGate, RouterUnreachableError
from appliance._private.edge_ledger import EdgeLedger
from federation import (
    FLEET_POLICY_VIA,
    INTERRUPTED,
    REQUEST_ID_HEADER,
    Admission,
    EdgeRow,
    EdgeUsageAck,
    Gate,
    KeyLimits,
    KeyPolicy,
    LeaseGrant,
    OrgPolicy,
    PeerIdentity,
    PolicySnapshot,
    Principal,
    RateLimitError,
    ServiceUnavailableError,
    TenancyStore,
)
from federation._private.admin_wire import OrgCreate
from router._private.leases import EdgeLeases

ORG = "acme"
BUDGET = (
    8000  # the node asks for an eighth (1000) at a time; the router grants half of what is left
)
MONTH = "2026-11"
START = datetime(2026, 11, 30, 12, tzinfo=UTC)
NODE = PeerIdentity(
    node_id="edge-1",
    role="node",
    fleet_id="fleet-00000000",
    region="eu-west",
    device_class=None,
    serial=7,
    fingerprint="sha256:00",
    not_after=0.0,
)
FLEET_KEY = Principal(org=ORG, user="usr_1", key_id="key_1", via=FLEET_POLICY_VIA)


def snapshot(limits: KeyLimits | None = None) -> PolicySnapshot:
    return PolicySnapshot(
        version=1,
        issued_at=START.timestamp(),
        fleet_id=NODE.fleet_id,
        router_id="router",
        orgs=[
            OrgPolicy(name=ORG, regions=["eu-west"], logging_mode="metadata", budget_tokens=BUDGET)
        ],
        keys=[
            KeyPolicy(
                key_id="key_1",
                secret_hash=hashlib.sha256(b"not used here").hexdigest(),
                org=ORG,
                user="usr_1",
                role="org_user",
                regions=None,
                limits=limits or KeyLimits(),
                expires_at=None,
                revoked=False,
            )
        ],
        users=[],
        revoked_serials=[],
        crl_pem="",
    )


class Policy:
    def __init__(self, current: PolicySnapshot) -> None:
        self.snapshot: PolicySnapshot | None = current


class Clock:
    def __init__(self) -> None:
        self.now = START.timestamp()

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


class Link:
    """The router's edge routes, in process; `up = False` cuts the network."""

    def __init__(self, leases: EdgeLeases) -> None:
        self.leases = leases
        self.up = True

    def _check(self) -> None:
        if not self.up:
            raise RouterUnreachableError("connection refused")

    async def lease(self, org: str, tokens: int) -> LeaseGrant:
        self._check()
        return await self.leases.grant(NODE, org, tokens)

    async def report(self, rows: list[EdgeRow]) -> EdgeUsageAck:
        self._check()
        return await self.leases.report(NODE, rows)


class Router:
    def __init__(self, store: TenancyStore, gate: Gate, leases: EdgeLeases) -> None:
        self.store, self.gate, self.leases = store, gate, leases

    async def close(self) -> None:
        await self.gate.stop()
        await self.store.close()


async def open_router(home: Path, clock: Clock) -> Router:
    store = await TenancyStore.open(home / "policy.db", clock=clock.wall)
    if ORG not in store.orgs:
        await store.create_org(
            OrgCreate(name=ORG, regions=["eu-west"], budget_tokens=BUDGET), "system"
        )
    gate = Gate(store, region="eu-west", node="router")
    await gate.start()
    leases = EdgeLeases(store, gate)
    await leases.start()
    return Router(store, gate, leases)


def open_edge(
    home: Path,
    link: Link,
    clock: Clock,
    *,
    limits: KeyLimits | None = None,
    grace_s: float = 3600,
    policy: Policy | None = None,
) -> EdgeGate:
    home.mkdir(exist_ok=True)
    edge = EdgeGate(
        EdgeLedger(home, node=NODE.node_id, region="eu-west"),
        link,
        policy or Policy(snapshot(limits)),
        region="eu-west",
        node=NODE.node_id,
        grace_s=grace_s,
        clock=clock,
        monotonic=clock,
    )
    edge.ledger.start()  # as `start()` does, without the background sync task
    return edge


async def lose_router(edge: EdgeGate, link: Link) -> None:
    link.up = False
    with pytest.raises(RouterUnreachableError):
        await edge.probe()


def crash(edge: EdgeGate) -> None:
    """What SIGKILL leaves: the journal file, nothing held in memory."""
    edge.ledger._journal.close()


def run(body: Callable[[], Coroutine[None, None, None]]) -> None:
    asyncio.run(body())


def admit(edge: EdgeGate, estimate: int, request_id: str) -> Admission:
    return edge.admit(FLEET_KEY, estimate, request_id=request_id, model="m", audit=None)


def settle(edge: EdgeGate, admission: Admission, tokens: int) -> None:
    edge.settle(
        admission,
        model="m",
        input_tokens=tokens,
        output_tokens=0,
        status="ok",
        cost=0.0,
        audit={"id": admission.id, "org": ORG, "status": "ok"},
    )


async def router_totals(router: Router) -> dict[str, int]:
    return {
        record.request_id or "": record.input_tokens + record.output_tokens
        for record in await router.store.usage_records(ORG)
    }


def test_online_a_fleet_key_leases_a_share_first_and_its_usage_is_counted_once(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        link = Link(router.leases)
        edge = open_edge(tmp_path / "edge", link, clock)
        await edge.prepare(FLEET_KEY, 300)
        assert edge.ledger.books.shares == {(ORG, MONTH): 1000}
        assert router.gate.budget_state(ORG) == (MONTH, 0, 1000)
        admission = admit(edge, 300, "req-1")
        assert admission.headers[REQUEST_ID_HEADER] == "req-1"
        settle(edge, admission, 120)
        assert await edge.sync() == 1
        assert await edge.sync() == 0  # nothing left to send
        assert await router_totals(router) == {"req-1": 120}
        assert router.gate.budget_state(ORG) == (MONTH, 120, 880)
        assert edge.ledger.books.left((ORG, MONTH)) == 880
        edge.ledger.stop()
        await router.close()

    run(body)


def test_offline_the_share_is_all_there_is_and_a_burst_never_exceeds_it(tmp_path: Path) -> None:
    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        link = Link(router.leases)
        edge = open_edge(tmp_path / "edge", link, clock)
        await edge.prepare(FLEET_KEY, 1)
        await lose_router(edge, link)
        assert edge.offline_since == clock.now
        admitted: list[Admission] = []
        refused: list[str] = []
        for n in range(40):  # one event-loop turn: as concurrent as requests can be
            try:
                admitted.append(admit(edge, 64, f"burst-{n}"))
            except RateLimitError as exc:
                refused.append(exc.code)
        assert len(admitted) == 1000 // 64
        assert refused == ["budget_share_exhausted"] * (40 - len(admitted))
        assert sum(a.reserved for a in admitted) <= 1000
        await edge.prepare(FLEET_KEY, 64)  # offline: no lease is even tried
        assert edge.ledger.books.shares[(ORG, MONTH)] == 1000
        edge.ledger.stop()
        await router.close()

    run(body)


def test_a_crash_offline_loses_nothing_admitted_and_counts_nothing_twice(tmp_path: Path) -> None:
    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        link = Link(router.leases)
        edge = open_edge(tmp_path / "edge", link, clock)
        await edge.prepare(FLEET_KEY, 1)
        settle(edge, admit(edge, 100, "sent"), 40)
        await edge.sync()
        await lose_router(edge, link)
        settle(edge, admit(edge, 100, "settled"), 70)
        admit(edge, 250, "in-flight")  # never settles: the process dies
        crash(edge)

        edge = open_edge(tmp_path / "edge", link, clock)
        assert edge.ledger.recovered == 1
        assert edge.offline_since == clock.now  # the outage is remembered across the restart
        own = {row.id: (row.status, row.tokens) for row in edge.ledger.unacked.values()}
        assert own == {"settled": ("ok", 70), "in-flight": (INTERRUPTED, 250)}
        assert edge.ledger.books.left((ORG, MONTH)) == 1000 - 40 - 70 - 250
        crash(edge)  # killed again before the router came back: nothing changes

        edge = open_edge(tmp_path / "edge", link, clock)
        assert edge.ledger.recovered == 0
        assert {row.id for row in edge.ledger.unacked.values()} == {"settled", "in-flight"}
        link.up = True
        await edge.sync()
        assert edge.offline_since is None
        assert await router_totals(router) == {"sent": 40, "settled": 70, "in-flight": 250}
        assert router.gate.budget_state(ORG) == (MONTH, 360, 640)
        edge.ledger.stop()
        await router.close()

    run(body)


def test_cached_tokens_of_a_fleet_key_reach_the_router_across_a_crash(tmp_path: Path) -> None:
    """A fleet key's prompt-cache hits are in the row the node journals (so a crash keeps
    them) and in the router's usage record once it reports."""

    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        link = Link(router.leases)
        edge = open_edge(tmp_path / "edge", link, clock)
        await edge.prepare(FLEET_KEY, 100)
        await lose_router(edge, link)
        edge.settle(
            admit(edge, 100, "hit"),
            model="m",
            input_tokens=80,
            output_tokens=5,
            cached_tokens=64,
            status="ok",
            cost=0.0,
            audit={"id": "hit", "org": ORG, "status": "ok"},
        )
        crash(edge)
        edge = open_edge(tmp_path / "edge", link, clock)
        link.up = True
        await edge.sync()
        [record] = await router.store.usage_records(ORG)
        assert (record.request_id, record.input_tokens, record.cached_tokens) == ("hit", 80, 64)
        edge.ledger.stop()
        await router.close()

    run(body)


def test_rows_the_router_counted_before_the_node_heard_back_are_not_counted_again(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        link = Link(router.leases)
        edge = open_edge(tmp_path / "edge", link, clock)
        await edge.prepare(FLEET_KEY, 1)
        settle(edge, admit(edge, 100, "r1"), 90)
        # The router counts the report, and the node dies before it reads the answer.
        await link.report(list(edge.ledger.unacked.values()))
        crash(edge)

        edge = open_edge(tmp_path / "edge", link, clock)
        assert await edge.sync() == 1
        assert await router_totals(router) == {"r1": 90}
        assert router.gate.budget_state(ORG) == (MONTH, 90, 910)
        edge.ledger.stop()
        await router.close()

    run(body)


def test_after_a_power_cut_the_rest_of_the_share_is_charged(tmp_path: Path) -> None:
    """A journal written under another boot may have lost its tail: what the node served
    and forgot must still count, so the rest of its share does (never above the share)."""

    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        link = Link(router.leases)
        edge = open_edge(tmp_path / "edge", link, clock)
        await edge.prepare(FLEET_KEY, 1)
        settle(edge, admit(edge, 100, "r1"), 100)
        crash(edge)
        journal = tmp_path / "edge" / "edge.journal"
        lines = journal.read_bytes().split(b"\n")
        lines[0] = lines[0].replace(b'"boot":"', b'"boot":"another-boot-')
        journal.write_bytes(b"\n".join(lines))

        edge = open_edge(tmp_path / "edge", link, clock)
        await edge.sync()
        totals = await router_totals(router)
        assert totals.pop("r1") == 100
        assert list(totals.values()) == [900]
        assert router.gate.budget_state(ORG) == (MONTH, 1000, 0)
        edge.ledger.stop()
        await router.close()

    run(body)


def test_beyond_the_grace_period_fleet_keys_get_policy_expired(tmp_path: Path) -> None:
    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        link = Link(router.leases)
        edge = open_edge(tmp_path / "edge", link, clock, grace_s=600)
        await edge.prepare(FLEET_KEY, 1)
        await lose_router(edge, link)
        lost_at = clock.now
        clock.now += 600
        admit(edge, 10, "within")
        clock.now += 1
        with pytest.raises(ServiceUnavailableError) as expired:
            admit(edge, 10, "beyond")
        assert expired.value.code == "policy_expired"
        crash(edge)
        edge = open_edge(tmp_path / "edge", link, clock, grace_s=600)
        with pytest.raises(ServiceUnavailableError):  # a restart does not reset the clock
            admit(edge, 10, "after-restart")
        link.up = True
        assert edge.reported_offline_since() == lost_at  # what the heartbeats say
        await edge.sync()  # the outage's rows are in: it is over
        assert edge.reported_offline_since() is None
        admit(edge, 10, "back")
        edge.ledger.stop()
        await router.close()

    run(body)


def test_a_fleet_keys_rate_limits_come_from_the_snapshot(tmp_path: Path) -> None:
    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        limits = KeyLimits(requests_per_minute=2)
        edge = open_edge(tmp_path / "edge", Link(router.leases), clock, limits=limits)
        await edge.prepare(FLEET_KEY, 1)
        first = admit(edge, 10, "a")
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        admit(edge, 10, "b")
        with pytest.raises(RateLimitError) as limited:
            admit(edge, 10, "c")
        assert limited.value.code == "rate_limit_exceeded"
        assert "c" not in edge.ledger.open  # refused: nothing journaled, nothing reserved
        clock.now += 30
        admit(edge, 10, "d")
        edge.ledger.stop()
        await router.close()

    run(body)


def test_a_zero_logging_org_sends_counts_only_and_they_count_once(tmp_path: Path) -> None:
    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        link = Link(router.leases)
        edge = open_edge(tmp_path / "edge", link, clock)
        zero = Principal(
            org=ORG, user="usr_1", key_id="key_1", logging_mode="zero", via=FLEET_POLICY_VIA
        )
        await edge.prepare(zero, 1)
        settle(edge, edge.admit(zero, 50, request_id="z1", model="m", audit=None), 30)
        [row] = edge.ledger.unacked.values()
        assert (row.record, row.audit, row.tokens) == (None, None, 30)
        await link.report([row])  # counted, and the node dies before it hears so
        crash(edge)
        edge = open_edge(tmp_path / "edge", link, clock)
        assert await edge.sync() == 1
        assert await router.store.usage_records(ORG) == []
        assert (await router.store.month_usage(MONTH))[ORG] == 30
        assert router.gate.budget_state(ORG) == (MONTH, 30, 970)
        edge.ledger.stop()
        await router.close()

    run(body)


def test_the_snapshot_may_shorten_the_grace_period_never_lengthen_it(tmp_path: Path) -> None:
    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        link = Link(router.leases)
        policy = Policy(snapshot())
        edge = open_edge(tmp_path / "edge", link, clock, grace_s=600, policy=policy)
        await edge.prepare(FLEET_KEY, 1)
        policy.snapshot = msgspec.structs.replace(snapshot(), grace_s=120.0)
        assert edge.grace() == 120
        policy.snapshot = msgspec.structs.replace(snapshot(), grace_s=86_400.0)
        assert edge.grace() == 600
        policy.snapshot = msgspec.structs.replace(snapshot(), grace_s=120.0)
        await lose_router(edge, link)
        clock.now += 121
        with pytest.raises(ServiceUnavailableError) as expired:
            admit(edge, 10, "late")
        assert expired.value.code == "policy_expired"
        assert "(120 s)" in expired.value.message
        edge.ledger.stop()
        await router.close()

    run(body)
