"""Prometheus metrics of the router, in a registry of its own (docs/metrics.md lists them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from federation import (
    LATENCY_BUCKETS,
    AuditLag,
    CertificateExpiry,
    DocumentedCollector,
    FleetStatus,
    MetricRow,
)
from router._private.canary import CanaryMetrics

# The error codes that are residency refusals: no node in the allowed regions, or a header
# asking for a region outside them.
RESIDENCY_CODES = frozenset({"no_backend_in_region", "residency_violation"})


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
        self.durations = Histogram(
            "palisade_router_request_duration_seconds",
            "Inference requests from arrival to their last byte sent (streams: whole stream)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "palisade_router_errors",
            "Errors the router answered itself, by their stable error code",
            ["code"],
            registry=r,
        )
        self.residency_refusals = Counter(
            "palisade_router_residency_refusals",
            "Requests refused to keep them in their allowed regions, by error code",
            ["code"],
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
        self.failovers = Counter(
            "palisade_router_failovers",
            "Requests sent on to another node, by why the last one did not answer "
            "(unreached, silent, overloaded)",
            ["reason"],
            registry=r,
        )
        self.device_failovers = Counter(
            "palisade_router_device_failovers",
            "Requests served on a device class below the most preferred one declared for the "
            "model in their regions (rdu -> gpu: the RDU pool had no healthy node)",
            ["preferred", "served"],
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
        # The canary's probes, wherever it runs (the router's own, `palisade canary`).
        self.canary = CanaryMetrics(r)
        self._status: Callable[[], FleetStatus] | None = None
        self._budget_use: Callable[[], dict[str, float]] = dict
        self._images: dict[str, str] = {}
        self._certificates: dict[str, Path] = {}
        self._audit: Callable[[], tuple[int, float] | None] = lambda: None
        r.register(_FleetCollector(self.fleet_status, lambda: self._images))
        # Series that name orgs: served only to a key that may read metrics (`render`).
        self.org_registry = CollectorRegistry()
        self.org_registry.register(_BudgetCollector(self._budgets_now))
        r.register(CertificateExpiry(lambda: self._certificates))
        r.register(AuditLag(self._audit_now))

    def watch_fleet(self, status: Callable[[], FleetStatus]) -> None:
        self._status = status

    def watch_budgets(self, use: Callable[[], dict[str, float]]) -> None:
        self._budget_use = use

    def watch_certificates(self, paths: dict[str, Path]) -> None:
        self._certificates = dict(paths)

    def watch_audit(self, lag: Callable[[], tuple[int, float] | None]) -> None:
        self._audit = lag

    def _budgets_now(self) -> dict[str, float]:
        return self._budget_use()

    def _audit_now(self) -> tuple[int, float] | None:
        return self._audit()

    def fleet_status(self) -> FleetStatus | None:
        return self._status() if self._status is not None else None

    def refused(self, code: str) -> None:
        """An error the router answered itself (the exception handlers' hook)."""
        self.errors.labels(code).inc()
        if code in RESIDENCY_CODES:
            self.residency_refusals.labels(code).inc()

    def render(self, images: dict[str, str] | None = None, *, with_orgs: bool = False) -> bytes:
        """The exposition; `images` (node id -> image version) as the rollout book has them.
        The series that name orgs only `with_orgs` (a caller that may read metrics)."""
        if images is not None:
            self._images = images
        if self._status is not None:
            self._nodes.clear()
            for node in self._status().nodes:
                for device in node.device_classes or ["none"]:
                    self._nodes.labels(node.region, device, node.state).inc()
        public = generate_latest(self.registry)
        return public + generate_latest(self.org_registry) if with_orgs else public


class _FleetCollector(DocumentedCollector):
    """Per-node series read from the fleet view at scrape time (node ids are bounded by the
    fleet's size): restarts counted from heartbeats, crash-looping, up, and the image."""

    def __init__(
        self, status: Callable[[], FleetStatus | None], images: Callable[[], dict[str, str]]
    ) -> None:
        self._status = status
        self._images = images

    def contract(self) -> list[MetricRow]:
        return [
            MetricRow(
                "palisade_router_node_restarts_total",
                "counter",
                ("node",),
                "Restarts of each node (a new boot id in its heartbeat) since the router started",
            ),
            MetricRow(
                "palisade_router_node_crash_looping",
                "gauge",
                ("node",),
                "1 while a node restarts so often that it counts as crash-looping",
            ),
            MetricRow(
                "palisade_router_node_up",
                "gauge",
                ("node", "region"),
                "1 while the node heartbeats, its circuit is closed and its models are ready",
            ),
            MetricRow(
                "palisade_router_node_image_info",
                "gauge",
                ("node", "version"),
                "1 for the appliance image version each node last reported",
            ),
        ]

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        restarts, crash_loop, up, image = self._families()
        status = self._status()
        images = self._images()
        if status is not None:
            for node in status.nodes:
                restarts.add_metric([node.node_id], node.restarts)
                crash_loop.add_metric([node.node_id], 1.0 if node.crash_loop else 0.0)
                healthy = node.state == "up" and node.ready
                up.add_metric([node.node_id, node.region], 1.0 if healthy else 0.0)
                if (version := images.get(node.node_id)) is not None:
                    image.add_metric([node.node_id, version], 1.0)
        return [restarts, crash_loop, up, image]

    def _families(
        self,
    ) -> tuple[CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        restarts, crash_loop, up, image = self.contract()
        return (
            CounterMetricFamily(
                restarts.name.removesuffix("_total"), restarts.help, labels=restarts.labels
            ),
            GaugeMetricFamily(crash_loop.name, crash_loop.help, labels=crash_loop.labels),
            GaugeMetricFamily(up.name, up.help, labels=up.labels),
            GaugeMetricFamily(image.name, image.help, labels=image.labels),
        )


class _BudgetCollector(DocumentedCollector):
    """Budget use per org: the one family with an org label (orgs are few and named by
    their operators; keys and users never label a series)."""

    ROW = MetricRow(
        "palisade_org_budget_used_ratio",
        "gauge",
        ("org",),
        "Share of the org's monthly token budget used this month (orgs with a budget)",
    )

    def __init__(self, use: Callable[[], dict[str, float]]) -> None:
        self._use = use

    def contract(self) -> list[MetricRow]:
        return [self.ROW]

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.ROW.name, self.ROW.help, labels=self.ROW.labels)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.ROW.name, self.ROW.help, labels=self.ROW.labels)
        for org, ratio in sorted(self._use().items()):
            family.add_metric([org], round(ratio, 6))
        return [family]
