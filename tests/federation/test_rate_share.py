"""A key's rate limits split over the routers sharing a store (`Gate.rate_share`): each
router enforces its share, and a change of share keeps how full the buckets are.

A real SQLite store and gate on an injected monotonic clock; the share is what the router
would read from its `routers` table (tests/e2e/test_rate_limits_across_routers.py measures
three real routers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from federation import Gate, Principal, RateLimitError, TenancyStore
from federation._private.admin_wire import KeyCreate, KeyLimits, OrgCreate

ORG = "acme"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Share:
    """The router count the gate reads at each admission."""

    def __init__(self) -> None:
        self.routers = 1

    def __call__(self) -> int:
        return self.routers


Body = Callable[[Gate, Principal, Clock, Share], Awaitable[None]]


def run(tmp_path: Path, limits: KeyLimits, body: Body) -> None:
    async def main() -> None:
        store = await TenancyStore.open(tmp_path / "policy.db")
        await store.create_org(OrgCreate(name=ORG, regions=["eu-west"]), "system")
        user = await store.add_user("dev@acme.test", "member", ORG, "system")
        created = await store.create_key(user, KeyCreate(name="k", limits=limits), "system")
        clock, share = Clock(), Share()
        gate = Gate(store, region="eu-west", node="router-1", monotonic=clock)
        gate.rate_share = share
        await gate.start()
        try:
            await body(gate, Principal(org=ORG, user=user.id, key_id=created.info.id), clock, share)
        finally:
            await gate.stop()
            await store.close()

    asyncio.run(main())


def admit_all(gate: Gate, principal: Principal, estimate: int = 1) -> int:
    """How many admissions fit right now (the clock stands still)."""
    admitted = 0
    while True:
        try:
            gate.admit(principal, estimate)
        except RateLimitError:
            return admitted
        admitted += 1


def offered(gate: Gate, principal: Principal, clock: Clock, seconds: float) -> int:
    """Admitted while offering far more than the limit: a try every 10 ms for `seconds`."""
    admitted = 0
    for _ in range(round(seconds * 100)):
        clock.now += 0.01
        admitted += admit_all(gate, principal)
    return admitted


def test_one_router_keeps_the_whole_limit(tmp_path: Path) -> None:
    async def body(gate: Gate, principal: Principal, clock: Clock, share: Share) -> None:
        assert admit_all(gate, principal) == 30  # the whole burst
        assert offered(gate, principal, clock, 60) == pytest.approx(600, abs=1)
        clock.now += 1
        admission = gate.admit(principal, 1)
        assert admission.headers["x-ratelimit-limit-requests"] == "600"

    run(tmp_path, KeyLimits(requests_per_minute=600, burst=30), body)


def test_three_routers_each_admit_a_third_of_rate_and_burst(tmp_path: Path) -> None:
    async def body(gate: Gate, principal: Principal, clock: Clock, share: Share) -> None:
        share.routers = 3
        assert admit_all(gate, principal) == 10
        assert offered(gate, principal, clock, 60) == pytest.approx(200, abs=1)
        clock.now += 1
        admission = gate.admit(principal, 1)
        assert admission.headers["x-ratelimit-limit-requests"] == "200"

    run(tmp_path, KeyLimits(requests_per_minute=600, burst=30), body)


def test_a_small_burst_split_is_still_one_request(tmp_path: Path) -> None:
    async def body(gate: Gate, principal: Principal, clock: Clock, share: Share) -> None:
        share.routers = 5
        assert admit_all(gate, principal) == 1
        assert offered(gate, principal, clock, 30) == pytest.approx(60, abs=1)

    run(tmp_path, KeyLimits(requests_per_minute=600, burst=2), body)


def test_a_drained_bucket_stays_drained_when_the_share_grows(tmp_path: Path) -> None:
    """A router dies: the survivors' buckets grow, but no fresh burst is handed out."""

    async def body(gate: Gate, principal: Principal, clock: Clock, share: Share) -> None:
        share.routers = 3
        assert admit_all(gate, principal) == 10
        share.routers = 2
        assert admit_all(gate, principal) == 0
        # From here on, this router's share: 300 a minute.
        assert offered(gate, principal, clock, 60) == pytest.approx(300, abs=1)

    run(tmp_path, KeyLimits(requests_per_minute=600, burst=30), body)


def test_a_rebuilt_bucket_keeps_its_fill_ratio(tmp_path: Path) -> None:
    async def body(gate: Gate, principal: Principal, clock: Clock, share: Share) -> None:
        share.routers = 2
        for _ in range(10):  # 10 of a 20-request share: half full
            gate.admit(principal, 1)
        share.routers = 4  # a router joined: 10 deep, so half is 5
        assert admit_all(gate, principal) == 5
        clock.now += 1.0  # 2.5 refilled at 150 a minute: a quarter full of 10 ...
        share.routers = 1  # ... so a quarter full of 40
        assert admit_all(gate, principal) == 10

    run(tmp_path, KeyLimits(requests_per_minute=600, burst=40), body)


def test_a_request_bigger_than_the_token_share_borrows_from_a_full_bucket(
    tmp_path: Path,
) -> None:
    """1000 tokens a minute on three routers: a 900-token request still fits the key."""

    async def body(gate: Gate, principal: Principal, clock: Clock, share: Share) -> None:
        share.routers = 3
        gate.admit(principal, 900)  # the share (333) is full: admitted, 567 in debt
        with pytest.raises(RateLimitError) as refused:
            gate.admit(principal, 1)
        # Out of debt and one token more, at 1000/3 tokens a minute: 102.2 s.
        assert refused.value.retry_after == 103
        clock.now += 161  # a full share is 162 s from the first admission
        with pytest.raises(RateLimitError):
            gate.admit(principal, 900)
        clock.now += 2
        gate.admit(principal, 900)
        with pytest.raises(RateLimitError) as never:
            gate.admit(principal, 1001)
        assert never.value.param == "max_tokens"

    run(tmp_path, KeyLimits(tokens_per_minute=1000), body)
