"""Prometheus metrics of the router, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from federation import FleetStatus


class RouterMetrics:
    def __init__(self, *, router_id: str, version: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge(
            "palisade_router_info", "This router's identity", ["router", "version"], registry=r
        ).labels(router_id, version).set(1)
        self.requests = Counter(
            "palisade_router_requests",
            "Requests answered by the router, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.attempts = Counter(
            "palisade_router_attempts",
            "Requests sent to nodes, by node and outcome (ok, failed, overloaded)",
            ["node", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "palisade_router_retries",
            "Requests retried on another node before their first byte",
            registry=r,
        )
        self.midstream_failures = Counter(
            "palisade_router_midstream_failures",
            "Streams ended with an error frame because their node failed",
            registry=r,
        )
        self.no_backend = Counter(
            "palisade_router_no_backend",
            "Requests refused because no healthy node was in the allowed regions",
            ["model"],
            registry=r,
        )
        self._nodes = Gauge(
            "palisade_router_nodes",
            "Registered nodes by region, device class and state",
            ["region", "device", "state"],
            registry=r,
        )
        self._status: Callable[[], FleetStatus] | None = None
        r.register(_RestartCollector(self.fleet_status))

    def watch_fleet(self, status: Callable[[], FleetStatus]) -> None:
        self._status = status

    def fleet_status(self) -> FleetStatus | None:
        return self._status() if self._status is not None else None

    def render(self) -> bytes:
        if self._status is not None:
            self._nodes.clear()
            for node in self._status().nodes:
                for device in node.device_classes or ["none"]:
                    self._nodes.labels(node.region, device, node.state).inc()
        return generate_latest(self.registry)


class _RestartCollector(Collector):
    """Restarts per node, read from the fleet view at scrape time (the fleet counts them
    from heartbeats; node ids are bounded by the fleet's size)."""

    def __init__(self, status: Callable[[], FleetStatus | None]) -> None:
        self._status = status

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        restarts, crash_loop = self._families()
        status = self._status()
        if status is not None:
            for node in status.nodes:
                restarts.add_metric([node.node_id], node.restarts)
                crash_loop.add_metric([node.node_id], 1.0 if node.crash_loop else 0.0)
        return [restarts, crash_loop]

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily(
                "palisade_router_node_restarts",
                "Restarts of each node (a new boot id in its heartbeat) since the router started",
                labels=["node"],
            ),
            GaugeMetricFamily(
                "palisade_router_node_crash_looping",
                "1 while a node restarts so often that it counts as crash-looping",
                labels=["node"],
            ),
        )
