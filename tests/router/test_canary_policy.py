"""The canary's policy without sockets: targets, schedule, judgement, metrics, the pin."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from federation import (
    InvalidRequestError,
    PermissionDeniedError,
    Principal,
)
from federation._private.fleet_wire import FleetNode, FleetStatus
from router._private.app import pinned_device_class
from router._private.canary import (
    CanaryMetrics,
    CanaryPolicy,
    CanaryTarget,
    ProbeReply,
    parse_duration,
)

EU_CPU = CanaryTarget("eu-west", "cpu", "alpha")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node(node_id: str, region: str, devices: list[str], models: list[str], state: str = "up"):  # type: ignore[no-untyped-def]
    return FleetNode(
        node_id=node_id,
        region=region,
        url=f"https://{node_id}:8400",
        device_classes=devices,
        models=models,
        state=state,  # type: ignore[arg-type]
        in_flight=0,
        queue_depth=0,
        ttft_p50_ms=None,
        heartbeat_age_s=0.0,
        version="0.1.0",
    )


def test_one_target_per_region_and_device_class_down_nodes_included() -> None:
    status = FleetStatus(
        router_id="r",
        nodes=[
            node("eu-1", "eu-west", ["cpu"], ["beta", "alpha"]),
            node("eu-2", "eu-west", ["cpu"], ["alpha"], state="down"),
            node("eu-3", "eu-west", ["gpu"], ["gamma"], state="ejected"),
            node("us-1", "us-east", ["cpu"], ["alpha"], state="down"),
            node("new", "ap-south", [], []),  # declares nothing yet: nothing to probe
        ],
    )
    assert CanaryPolicy(60).targets(status) == [
        CanaryTarget("eu-west", "cpu", "alpha"),
        CanaryTarget("eu-west", "gpu", "gamma"),
        CanaryTarget("us-east", "cpu", "alpha"),
    ]


def test_rounds_come_every_period_never_overlap_and_are_not_made_up() -> None:
    clock = Clock()
    policy = CanaryPolicy(60, clock=clock)
    assert policy.wait_s() == 0  # the first round at once
    policy.begin_round()
    assert policy.wait_s() == 60
    clock.now += 45  # a round took 45 s
    assert policy.wait_s() == 15
    clock.now += 15
    policy.begin_round()
    clock.now += 200  # a round overran by more than three periods
    assert policy.wait_s() == 0
    policy.begin_round()  # one round now, not the three missed
    assert policy.wait_s() == 60


@pytest.mark.parametrize(
    ("reply", "outcome", "reason"),
    [
        (ProbeReply(200, "eu-west", "cpu", elapsed_s=0.02), "ok", "ok"),
        (ProbeReply(200, "eu-west", "cpu/CPUExecutionProvider"), "ok", "ok"),
        (ProbeReply(None, problem="ClientConnectorError"), "error", "no answer"),
        (ProbeReply(503, problem="no_backend_in_region"), "error", "HTTP 503 no_backend"),
        (ProbeReply(429), "error", "HTTP 429"),
        (ProbeReply(200, "us-east", "cpu"), "error", "region us-east"),
        (ProbeReply(200, "eu-west", "gpu/cuda:0"), "error", "device class gpu"),
        (ProbeReply(200, None, None), "error", "region ?"),
    ],
)
def test_only_an_answer_from_the_target_counts_as_ok(
    reply: ProbeReply, outcome: str, reason: str
) -> None:
    result = CanaryPolicy(60).judge(EU_CPU, reply)
    assert result.outcome == outcome
    assert reason in result.reason
    assert result.elapsed_s == reply.elapsed_s


def test_a_change_of_outcome_is_noted_once() -> None:
    policy = CanaryPolicy(60)
    ok = policy.judge(EU_CPU, ProbeReply(200, "eu-west", "cpu"))
    error = policy.judge(EU_CPU, ProbeReply(None, problem="timed out"))
    assert [policy.changed(r) for r in (ok, ok, error, error, ok)] == [
        False,
        False,
        True,
        False,
        True,
    ]
    assert policy.changed(policy.judge(CanaryTarget("us-east", "cpu", "a"), ProbeReply(502)))


def test_counts_start_at_zero_per_target_and_only_ok_probes_time_latency() -> None:
    registry = CollectorRegistry()
    metrics = CanaryMetrics(registry)
    labels = {"region": "eu-west", "device_class": "cpu"}

    def count(outcome: str) -> float | None:
        return registry.get_sample_value(
            "palisade_canary_requests_total", labels | {"outcome": outcome}
        )

    assert count("ok") is None
    metrics.watch([EU_CPU])
    assert (count("ok"), count("error")) == (0, 0)
    policy = CanaryPolicy(60)
    metrics.record(policy.judge(EU_CPU, ProbeReply(200, "eu-west", "cpu", elapsed_s=0.2)))
    metrics.record(policy.judge(EU_CPU, ProbeReply(None, problem="x", elapsed_s=9.0)))
    assert (count("ok"), count("error")) == (1, 1)
    assert registry.get_sample_value("palisade_canary_latency_seconds_count", labels) == 1
    assert registry.get_sample_value("palisade_canary_latency_seconds_sum", labels) == 0.2


@pytest.mark.parametrize(
    ("text", "seconds"), [("60s", 60), ("60", 60), ("1.5m", 90), ("500ms", 0.5), ("1h", 3600)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "-5s", "5 days", "1e3"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_only_the_canary_role_may_pin_a_device_class() -> None:
    canary = Principal(org="palisade-canary", user="u", role="canary")
    assert pinned_device_class(canary, " gpu ") == ("gpu",)
    with pytest.raises(InvalidRequestError) as unknown:
        pinned_device_class(canary, "tpu")
    assert unknown.value.code == "invalid_value"
    for role in ("org_user", "org_admin", "system_admin"):
        tenant = Principal(org="acme", user="u", role=role)
        with pytest.raises(PermissionDeniedError) as refused:
            pinned_device_class(tenant, "cpu")
        assert refused.value.code == "permission_denied"
