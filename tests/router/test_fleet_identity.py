"""The fleet view's use of certified identities and advertised URLs (injected clock, no
sockets): region from the certificate, URLs compared normalised, revocation at once."""

from __future__ import annotations

import asyncio
import random

import pytest

from federation import Heartbeat, NodeModel, PeerIdentity
from router import Fleet, HealthConfig
from router._private.fleet import normalised_url

PREFERENCE = ["rdu", "gpu", "cpu"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def heartbeat(node: str, region: str, url: str) -> Heartbeat:
    served = NodeModel(id="m", device_class="gpu", context_length=2048, ready=True)
    return Heartbeat(
        node_id=node, region=region, url=url, version="t", models=[served], boot_id="boot-1"
    )


def certified(node: str, region: str) -> PeerIdentity:
    return PeerIdentity(
        node_id=node,
        role="node",
        fleet_id="fleet-0123abcd",
        region=region,
        device_class=None,
        serial=7,
        fingerprint="sha256:00",
        not_after=2e9,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(clock: Clock) -> Fleet:
    return Fleet(HealthConfig(), clock=clock, rng=random.Random(7))


@pytest.mark.parametrize(
    "advertised",
    ["https://node-1.test:8400/", "https://node-1.test:8400//", "HTTPS://Node-1.TEST:8400"],
)
def test_an_advertised_url_with_a_trailing_slash_does_not_re_register_the_node(
    fleet: Fleet, clock: Clock, advertised: str
) -> None:
    identity = certified("node-1", "eu-west")
    first = fleet.beat(heartbeat("node-1", "eu-west", advertised), identity)
    for _ in range(3):  # it fails twice and is ejected: each heartbeat must keep that
        fleet.failed(first)
    first.in_flight = 2
    for _ in range(5):
        clock.now += 1.0
        again = fleet.beat(heartbeat("node-1", "eu-west", advertised), identity)
        assert again is first
    assert first.url == "https://node-1.test:8400"
    assert first.circuit == "open"
    assert first.in_flight == 2
    assert first.restarts == 0


def test_normalised_urls_keep_paths_and_ports() -> None:
    assert normalised_url("https://N.test:8400/base/") == "https://n.test:8400/base"
    assert normalised_url("http://10.0.0.5:8400") == "http://10.0.0.5:8400"


def test_the_region_is_the_certificates_not_the_heartbeats(fleet: Fleet) -> None:
    node = fleet.beat(
        heartbeat("node-1", "eu-west", "https://node-1.test:1"), certified("node-1", "us-east")
    )
    assert node.region == "us-east"
    assert fleet.pick("m", frozenset({"eu-west"}), PREFERENCE) is None
    assert fleet.pick("m", frozenset({"us-east"}), PREFERENCE) is node


def test_a_revoked_node_is_dropped_at_once_and_its_waiting_requests_abandoned(
    fleet: Fleet,
) -> None:
    async def scenario() -> None:
        node = fleet.beat(
            heartbeat("node-1", "eu-west", "https://node-1.test:1"), certified("node-1", "eu-west")
        )
        waiting = asyncio.get_running_loop().create_future()
        node.waiting.add(waiting)
        assert fleet.revoke("node-1") is node
        assert waiting.cancelled()
        assert fleet.pick("m", frozenset({"eu-west"}), PREFERENCE) is None
        assert [row.node_id for row in fleet.status("r").nodes] == []
        assert fleet.revoke("node-1") is None  # twice is harmless

    asyncio.run(scenario())
