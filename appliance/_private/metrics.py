"""Prometheus metrics of one appliance, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from appliance._private.engine import EngineLoad

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class ApplianceMetrics:
    def __init__(self, *, node_id: str, region: str, version: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge(
            "palisade_node_info",
            "This appliance's identity",
            ["node", "region", "version"],
            registry=r,
        ).labels(node_id, region, version).set(1)
        self.requests = Counter(
            "palisade_requests",
            "Inference requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.generations = Counter(
            "palisade_generations",
            "Finished generations by finish reason (stop, length, cancelled, error)",
            ["model", "reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "palisade_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "palisade_completion_tokens", "Completion tokens generated", ["model"], registry=r
        )
        self.ttft = Histogram(
            "palisade_time_to_first_token_seconds",
            "Admission to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "palisade_time_per_output_token_seconds",
            "Mean time between output tokens",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self._queue_depth = Gauge(
            "palisade_queue_depth", "Requests waiting for the engine", ["model"], registry=r
        )
        self._running = Gauge(
            "palisade_running_generations", "Generations being decoded", ["model"], registry=r
        )
        self.model_ready = Gauge(
            "palisade_model_ready",
            "1 when the model is loaded and accepting",
            ["model"],
            registry=r,
        )

    def watch_load(self, model: str, load: Callable[[], EngineLoad]) -> None:
        """Read queue depth and running count from the engine at scrape time."""
        self._queue_depth.labels(model).set_function(lambda: load().waiting)
        self._running.labels(model).set_function(lambda: load().running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
