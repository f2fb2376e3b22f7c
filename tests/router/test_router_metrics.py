"""The router's metrics policy without sockets: device failovers, node health per region,
budget use, certificate expiry, error codes, service discovery targets."""

from __future__ import annotations

import random
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from federation import FleetStatus, NodeIdentity
from router import Fleet, HealthConfig, RouterMetrics, scrape_targets
from router._private.ca import FleetCA
from tests.router.test_fleet import EU, PREFERENCE, Clock, beat


def _fleet() -> Fleet:
    return Fleet(HealthConfig(), clock=Clock(), rng=random.Random(7))


def test_a_request_served_below_the_preferred_class_is_a_device_failover() -> None:
    fleet = _fleet()
    rdu = fleet.beat(beat("rdu-1", device="rdu"))
    gpu = fleet.beat(beat("gpu-1", device="gpu"))
    assert fleet.device_fallback("m", EU, PREFERENCE, rdu) is None
    assert fleet.device_fallback("m", EU, PREFERENCE, gpu) == ("rdu", "gpu")
    # An RDU node elsewhere does not make a GPU answer here a failover.
    other = _fleet()
    other.beat(beat("rdu-us", region="us-east", device="rdu"))
    only_gpu = other.beat(beat("gpu-1", device="gpu"))
    assert other.device_fallback("m", EU, PREFERENCE, only_gpu) is None


def test_node_up_reads_health_per_node_and_region() -> None:
    clock = Clock()
    fleet = Fleet(HealthConfig(), clock=clock, rng=random.Random(7))
    fleet.beat(beat("eu-1"))
    fleet.beat(beat("us-1", region="us-east"))
    metrics = RouterMetrics(router_id="r", version="t")
    metrics.watch_fleet(lambda: fleet.status("r"))
    clock.now += 10  # both miss their heartbeats; eu-1 beats again
    fleet.beat(beat("eu-1"))
    fleet.sweep()
    text = metrics.render({"eu-1": "2.0"}).decode()
    assert 'palisade_router_node_up{node="eu-1",region="eu-west"} 1.0' in text
    assert 'palisade_router_node_up{node="us-1",region="us-east"} 0.0' in text
    assert 'palisade_router_node_image_info{node="eu-1",version="2.0"} 1.0' in text


def test_budget_use_errors_and_residency_refusals() -> None:
    metrics = RouterMetrics(router_id="r", version="t")
    metrics.watch_budgets(lambda: {"acme": 0.8125})
    metrics.refused("no_backend_in_region")
    metrics.refused("invalid_json")
    assert "acme" not in metrics.render().decode()  # org names only to a metrics reader
    text = metrics.render(with_orgs=True).decode()
    assert 'palisade_org_budget_used_ratio{org="acme"} 0.8125' in text
    assert 'palisade_router_errors_total{code="no_backend_in_region"} 1.0' in text
    assert 'palisade_router_errors_total{code="invalid_json"} 1.0' in text
    assert 'palisade_router_residency_refusals_total{code="no_backend_in_region"} 1.0' in text
    assert 'residency_refusals_total{code="invalid_json"}' not in text


def test_certificate_expiry_is_read_from_the_file(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    identity = NodeIdentity.load_or_create(tmp_path)
    cert = ca.issue_router(identity, "r", ("127.0.0.1",))
    path = tmp_path / "public.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    metrics = RouterMetrics(router_id="r", version="t")
    metrics.watch_certificates({"public": path})
    line = next(
        line
        for line in metrics.render().decode().splitlines()
        if line.startswith("palisade_certificate_expiry_seconds")
    )
    seconds = float(line.rsplit(" ", 1)[1])
    expected = cert.not_valid_after_utc.timestamp()
    assert line.startswith('palisade_certificate_expiry_seconds{certificate="public"}')
    assert 0 < seconds <= expected


def test_discovery_lists_the_router_then_every_node_through_it() -> None:
    fleet = _fleet()
    fleet.beat(beat("eu-1", port=8443))
    groups = scrape_targets("r", "https://127.0.0.1:8300", fleet.status("r"))
    assert [group.targets for group in groups] == [["127.0.0.1:8300"], ["127.0.0.1:8300"]]
    assert groups[0].labels == {"palisade_role": "router", "router": "r", "__scheme__": "https"}
    assert groups[1].labels == {
        "palisade_role": "node",
        "node": "eu-1",
        "region": "eu-west",
        "device_class": "gpu",
        "instance": "eu-1.test:8443",
        "__scheme__": "https",
        "__metrics_path__": "/federation/v1/prometheus/nodes/eu-1/metrics",
    }
    ipv6 = scrape_targets("r", "http://[::1]:80", FleetStatus(router_id="r", nodes=[]))
    assert ipv6[0].targets == ["[::1]:80"]
