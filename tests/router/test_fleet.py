"""Selection and health of the router's fleet view, on an injected clock (no sockets)."""

from __future__ import annotations

import asyncio
import random

import pytest

from federation import Heartbeat, NodeModel
from router import Fleet, HealthConfig

PREFERENCE = ["rdu", "gpu", "cpu"]
EU = frozenset({"eu-west"})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beat(
    node: str,
    region: str = "eu-west",
    device: str = "gpu",
    *,
    ttft: float | None = 10.0,
    queue: int = 0,
    model: str = "m",
    ready: bool = True,
) -> Heartbeat:
    served = NodeModel(
        id=model,
        device_class=device,  # type: ignore[arg-type]
        context_length=2048,
        ready=ready,
        ttft_ewma_ms=ttft,
        queue_depth=queue,
    )
    return Heartbeat(
        node_id=node, region=region, url=f"http://{node}.test:1", version="t", models=[served]
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(clock: Clock) -> Fleet:
    return Fleet(HealthConfig(), clock=clock, rng=random.Random(7))


def picks(fleet: Fleet, count: int = 200, regions: frozenset[str] = EU) -> dict[str, int]:
    seen: dict[str, int] = {}
    for _ in range(count):
        node = fleet.pick("m", regions, PREFERENCE)
        key = node.id if node is not None else "none"
        seen[key] = seen.get(key, 0) + 1
    return seen


def test_residency_fails_closed_even_when_only_another_region_is_healthy(fleet: Fleet) -> None:
    fleet.beat(beat("us-1", "us-east"))
    fleet.beat(beat("eu-1", "eu-west", ready=False))
    assert picks(fleet) == {"none": 200}
    assert picks(fleet, regions=frozenset({"us-east"})) == {"us-1": 200}


def test_most_preferred_device_class_wins_and_others_take_over_when_it_is_gone(
    fleet: Fleet,
) -> None:
    fleet.beat(beat("gpu-1", device="gpu", ttft=1.0))
    fleet.beat(beat("rdu-1", device="rdu", ttft=50.0))
    fleet.beat(beat("cpu-1", device="cpu", ttft=0.5))
    assert picks(fleet) == {"rdu-1": 200}  # class before latency
    rdu = fleet.nodes["rdu-1"]
    for _ in range(3):
        fleet.failed(rdu)
    assert fleet.state(rdu) == "ejected"
    assert picks(fleet) == {"gpu-1": 200}
    assert fleet.pick("m", EU, ["cpu"]).id == "cpu-1"  # type: ignore[union-attr]
    assert fleet.pick("m", EU, ["rdu"]) is None  # a class left out of the policy is never used


def test_power_of_two_choices_prefers_low_expected_latency_but_spreads_load(fleet: Fleet) -> None:
    fleet.beat(beat("fast", ttft=5.0))
    fleet.beat(beat("slow", ttft=100.0))
    assert picks(fleet) == {"fast": 200}
    fleet.nodes["fast"].in_flight = 30  # 5 x 31 > 100 x 1
    assert picks(fleet) == {"slow": 200}
    fleet.nodes["fast"].in_flight = 0
    fleet.beat(beat("slow", ttft=5.0, queue=0))
    fleet.beat(beat("fast", ttft=5.0, queue=3))  # queue counts like in-flight
    assert picks(fleet) == {"slow": 200}


def test_a_node_not_chosen_for_a_while_is_scored_with_the_fleet_prior(
    fleet: Fleet, clock: Clock
) -> None:
    fleet.beat(beat("a", ttft=5.0))
    fleet.beat(beat("b", ttft=100.0))
    fleet.beat(beat("c", ttft=6.0))
    assert "b" not in picks(fleet)
    clock.now += 11  # b has not been chosen for longer than the staleness window
    for name, ttft in (("a", 5.0), ("b", 100.0), ("c", 6.0)):
        fleet.beat(beat(name, ttft=ttft))
    fleet.nodes["a"].in_flight = fleet.nodes["c"].in_flight = 1
    assert fleet.pick("m", EU, PREFERENCE, exclude=["c"]).id == "b"  # type: ignore[union-attr]


def test_missed_heartbeats_mark_a_node_down_and_it_returns_through_a_half_open_probe(
    fleet: Fleet, clock: Clock
) -> None:
    node = fleet.beat(beat("n1"))
    clock.now += 2.9
    assert fleet.sweep() == []
    clock.now += 0.2  # 3.1 s > 3 missed one-second beats
    assert fleet.sweep() == [node]
    assert fleet.state(node) == "down"
    assert not fleet.probe_due(node)  # nothing to probe without heartbeats
    assert picks(fleet, 5) == {"none": 5}
    fleet.beat(beat("n1"))
    assert fleet.state(node) == "ejected"  # back, but unproven
    assert picks(fleet, 5) == {"none": 5}
    assert fleet.probe_due(node)
    assert node.circuit == "half_open"
    fleet.probed(node, ok=True)
    assert fleet.state(node) == "up"
    assert picks(fleet, 5) == {"n1": 5}


def test_consecutive_failures_open_the_circuit_and_failed_probes_back_off(
    fleet: Fleet, clock: Clock
) -> None:
    node = fleet.beat(beat("n1"))
    fleet.failed(node)
    fleet.failed(node)
    fleet.succeeded(node)  # a success in between resets the count
    fleet.failed(node)
    fleet.failed(node)
    assert fleet.state(node) == "up"
    fleet.failed(node)
    assert fleet.state(node) == "ejected"
    assert not fleet.probe_due(node)  # cooldown (1 s) not over
    clock.now += 1.0
    assert fleet.probe_due(node)
    fleet.probed(node, ok=False)  # half-open probe failed: open for twice as long
    assert node.cooldown == 2.0
    clock.now += 1.5
    assert not fleet.probe_due(node)
    clock.now += 0.6
    assert fleet.probe_due(node)
    fleet.probed(node, ok=True)
    assert fleet.state(node) == "up"
    assert node.consecutive_failures == 0


def test_ejection_cancels_requests_still_waiting_for_the_first_byte(fleet: Fleet) -> None:
    async def scenario() -> tuple[bool, bool]:
        node = fleet.beat(beat("n1"))
        loop = asyncio.get_running_loop()
        waiting: asyncio.Future[object] = loop.create_future()
        streaming: asyncio.Future[object] = loop.create_future()
        node.waiting.add(waiting)
        node.streams.add(streaming)
        for _ in range(3):
            fleet.failed(node)
        return waiting.cancelled(), streaming.cancelled()

    # Ejection gives up on answers not yet started; streams already flowing keep going.
    assert asyncio.run(scenario()) == (True, False)


def test_going_down_cuts_streams_too(fleet: Fleet, clock: Clock) -> None:
    async def scenario() -> bool:
        node = fleet.beat(beat("n1"))
        streaming: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        node.streams.add(streaming)
        clock.now += 10
        fleet.sweep()
        return streaming.cancelled()

    assert asyncio.run(scenario())


def test_fleet_status_reports_state_age_and_load(fleet: Fleet, clock: Clock) -> None:
    fleet.beat(beat("b-node", "us-east", "rdu"))
    fleet.beat(beat("a-node", "eu-west", "cpu"))
    clock.now += 0.5
    fleet.nodes["a-node"].in_flight = 2
    status = fleet.status("r1")
    assert status.router_id == "r1"
    rows = {row.node_id: row for row in status.nodes}
    assert [row.node_id for row in status.nodes] == ["a-node", "b-node"]  # by region
    assert rows["a-node"].in_flight == 2
    assert rows["a-node"].heartbeat_age_s == pytest.approx(0.5)
    assert rows["b-node"].device_classes == ["rdu"]
    assert {row.state for row in status.nodes} == {"up"}
