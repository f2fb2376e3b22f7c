"""Selection and health of the router's fleet view, on an injected clock (no sockets)."""

from __future__ import annotations

import asyncio
import random

import pytest

from federation import DEFAULT_DEVICE_PREFERENCE, Heartbeat, NodeModel
from router import Fleet, HealthConfig
from router._private.metrics import RouterMetrics

PREFERENCE = list(DEFAULT_DEVICE_PREFERENCE)
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
    boot: str = "boot-1",
    port: int = 1,
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
        node_id=node,
        region=region,
        url=f"http://{node}.test:{port}",
        version="t",
        models=[served],
        boot_id=boot,
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


def test_ejection_leaves_requests_already_sent_to_finish_on_their_own(fleet: Fleet) -> None:
    async def scenario() -> tuple[bool, bool]:
        node = fleet.beat(beat("n1"))
        loop = asyncio.get_running_loop()
        waiting: asyncio.Future[object] = loop.create_future()
        streaming: asyncio.Future[object] = loop.create_future()
        node.waiting.add(waiting)
        node.streams.add(streaming)
        for _ in range(3):
            fleet.failed(node)
        assert fleet.state(node) == "ejected"
        return waiting.cancelled(), streaming.cancelled()

    # Abandoning would make the router replay requests the failing node holds, and those
    # may be what makes it fail: they get the node's answer, or its failure, instead.
    assert asyncio.run(scenario()) == (False, False)


def test_going_down_abandons_waiting_requests_and_cuts_streams(fleet: Fleet, clock: Clock) -> None:
    async def scenario() -> tuple[bool, bool]:
        node = fleet.beat(beat("n1"))
        loop = asyncio.get_running_loop()
        waiting: asyncio.Future[object] = loop.create_future()
        streaming: asyncio.Future[object] = loop.create_future()
        node.waiting.add(waiting)
        node.streams.add(streaming)
        clock.now += 10
        fleet.sweep()
        return waiting.cancelled(), streaming.cancelled()

    assert asyncio.run(scenario()) == (True, True)


def test_a_new_boot_id_counts_a_restart_and_needs_a_probe_before_traffic(
    fleet: Fleet, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    first = fleet.beat(beat("n1", boot="a", port=1))
    fleet.failed(first)
    clock.now += 0.5
    fleet.beat(beat("n1", boot="a", port=1))  # the same process: nothing changes
    assert fleet.nodes["n1"] is first
    assert first.restarts == 0

    clock.now += 2
    node = fleet.beat(beat("n1", boot="b", port=2))  # back on another port after a crash
    assert node.restarts == 1
    assert "node n1 (eu-west) restarted (restart 1; 1 within 300 s)" in caplog.text
    assert node.url == "http://n1.test:2"
    assert node.consecutive_failures == 0  # the failures were the old process's
    assert fleet.state(node) == "ejected"
    assert picks(fleet, 5) == {"none": 5}
    assert fleet.probe_due(node)  # probed at once: one restart is not a crash loop
    fleet.probed(node, ok=True)
    assert picks(fleet, 5) == {"n1": 5}
    row = fleet.status("r1").nodes[0]
    assert (row.restarts, row.crash_loop, row.state) == (1, False, "up")


def test_an_old_node_without_a_boot_id_is_not_counted_as_restarting(fleet: Fleet) -> None:
    fleet.beat(beat("n1", boot="", port=1))
    node = fleet.beat(beat("n1", boot="", port=2))
    assert (node.restarts, fleet.state(node)) == (0, "up")


def test_restarts_in_quick_succession_are_a_crash_loop_held_out_longer_each_time(
    fleet: Fleet, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for boot in ("b0", "b1", "b2"):
        fleet.beat(beat("n1", boot=boot))
        clock.now += 20
    node = fleet.nodes["n1"]
    assert node.restarts == 2
    assert not fleet.status("r1").nodes[0].crash_loop
    assert fleet.probe_due(node)

    cooldowns = []
    for boot in ("b3", "b4", "b5"):
        node = fleet.beat(beat("n1", boot=boot))
        assert fleet.status("r1").nodes[0].crash_loop
        assert (
            caplog.records[-1]
            .getMessage()
            .endswith(f"crash-looping, held out for {node.cooldown:g} s")
        )
        assert not fleet.probe_due(node)  # not even probed until its back-off is over
        cooldowns.append(node.open_until - clock.now)
        clock.now += 20
    assert cooldowns == [1.0, 2.0, 4.0]
    row = fleet.status("r1").nodes[0]
    assert (row.restarts, row.crash_loop) == (5, True)

    clock.now += 301  # five quiet minutes: no longer a crash loop, the count stays
    row = fleet.status("r1").nodes[0]
    assert (row.restarts, row.crash_loop) == (5, False)


def test_a_restart_abandons_requests_still_waiting_on_the_old_process(fleet: Fleet) -> None:
    async def scenario() -> tuple[bool, bool]:
        old = fleet.beat(beat("n1", boot="a"))
        loop = asyncio.get_running_loop()
        waiting: asyncio.Future[object] = loop.create_future()
        streaming: asyncio.Future[object] = loop.create_future()
        old.waiting.add(waiting)
        old.streams.add(streaming)
        fleet.beat(beat("n1", boot="b"))
        return waiting.cancelled(), streaming.cancelled()

    assert asyncio.run(scenario()) == (True, True)


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


def test_restarts_and_crash_loops_are_metrics_read_from_the_fleet(fleet: Fleet) -> None:
    metrics = RouterMetrics(router_id="r1", version="t")
    metrics.watch_fleet(lambda: fleet.status("r1"))
    for boot in ("b0", "b1", "b2", "b3"):
        fleet.beat(beat("looping", boot=boot))
    fleet.beat(beat("steady", boot="s0"))
    text = metrics.render().decode()
    assert 'palisade_router_node_restarts_total{node="looping"} 3.0' in text
    assert 'palisade_router_node_restarts_total{node="steady"} 0.0' in text
    assert 'palisade_router_node_crash_looping{node="looping"} 1.0' in text
    assert 'palisade_router_node_crash_looping{node="steady"} 0.0' in text


def test_the_device_receipt_names_what_runs_the_model_when_the_node_says(fleet: Fleet) -> None:
    fleet.beat(beat("gpu-1", device="gpu"))
    onnx = beat("cpu-1", device="cpu", model="classifier")
    onnx.models[0].accelerator = "CPUExecutionProvider"
    fleet.beat(onnx)
    assert fleet.nodes["gpu-1"].device("m") == "gpu"  # no accelerator reported
    assert fleet.nodes["cpu-1"].device("classifier") == "cpu/CPUExecutionProvider"
    assert fleet.nodes["cpu-1"].device("not-served") == "cpu"
