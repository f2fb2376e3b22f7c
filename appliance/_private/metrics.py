"""Prometheus metrics of one appliance, in a registry of its own."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from appliance._private.engines.base import EngineLoad, StepStats
from federation import LATENCY_BUCKETS, TOKEN_BUCKETS, AuditLag, CertificateExpiry

_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 256)
# Prefill and decode throughput gauges average the steps of this many recent seconds.
_RATE_WINDOW_S = 5.0


@dataclass(frozen=True, slots=True)
class _StepSeries:
    """One model's series that every batching step updates."""

    sequences: Histogram
    prefill: Counter
    decode: Counter
    reused: Counter
    in_use: Gauge
    cached: Gauge
    lookups: Counter
    hit_tokens: Counter
    query_tokens: Counter
    evicted: Counter
    pool_bytes: Gauge
    pool_capacity: Gauge


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
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "palisade_time_per_output_token_seconds",
            "Mean time between output tokens",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.durations = Histogram(
            "palisade_request_duration_seconds",
            "Admission to the last token of a generation (end-to-end latency on the node)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "palisade_errors",
            "Errors the appliance answered, by their stable error code",
            ["code"],
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

        self.batch_sequences = Histogram(
            "palisade_batch_sequences",
            "Sequences in each continuous-batching decode step",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.step_tokens = Counter(
            "palisade_step_tokens",
            "Tokens decoded by batching steps, by phase (prefill, decode)",
            ["model", "phase"],
            registry=r,
        )
        self.prefix_reused = Counter(
            "palisade_prefix_reused_tokens",
            "Prompt tokens not recomputed because a slot or a running sequence held them",
            ["model"],
            registry=r,
        )
        self._kv_cells = Gauge(
            "palisade_kv_cells",
            "KV cache cells held by running sequences (in_use) or kept for prefix reuse (cached)",
            ["model", "state"],
            registry=r,
        )
        self._cache_lookups = Counter(
            "palisade_prefix_cache_lookups",
            "Prompts looked up in the prompt cache (slots and host pool), one per prompt read",
            ["model"],
            registry=r,
        )
        self._cache_hit_tokens = Counter(
            "palisade_prefix_cache_hit_tokens",
            "Prompt tokens served from the prompt cache (hit rate: over query tokens)",
            ["model"],
            registry=r,
        )
        self._cache_query_tokens = Counter(
            "palisade_prefix_cache_query_tokens",
            "Prompt tokens looked up in the prompt cache",
            ["model"],
            registry=r,
        )
        self._cache_evicted = Counter(
            "palisade_prefix_cache_evicted_blocks",
            "Host-pool blocks dropped (least recently used) to stay within its budget",
            ["model"],
            registry=r,
        )
        self._cache_bytes = Gauge(
            "palisade_prefix_cache_bytes",
            "Bytes of KV held by the prompt cache's host pool",
            ["model"],
            registry=r,
        )
        self._cache_capacity = Gauge(
            "palisade_prefix_cache_capacity_bytes",
            "The prompt cache host pool's budget (prefix_cache_mib)",
            ["model"],
            registry=r,
        )
        self._rates = Gauge(
            "palisade_tokens_per_second",
            f"Prefill and decode throughput over the last {_RATE_WINDOW_S:.0f} s of steps",
            ["model", "phase"],
            registry=r,
        )
        self._certificates: dict[str, Path] = {}
        self._audit: Callable[[], tuple[int, float] | None] = lambda: None
        r.register(CertificateExpiry(lambda: self._certificates))
        r.register(AuditLag(self._audit_now))
        self._steps: dict[str, deque[tuple[float, int, int]]] = {}
        self._step_series: dict[str, _StepSeries] = {}
        self._steps_lock = threading.Lock()

    def watch_certificate(self, path: Path) -> None:
        """The node certificate it serves with (an enrolled node): its expiry is exported."""
        self._certificates = {"node": path}

    def watch_audit(self, lag: Callable[[], tuple[int, float] | None]) -> None:
        self._audit = lag

    def _audit_now(self) -> tuple[int, float] | None:
        return self._audit()

    def refused(self, code: str) -> None:
        """An error the appliance answered (the exception handlers' hook)."""
        self.errors.labels(code).inc()

    def observe_step(self, model: str, step: StepStats) -> None:
        """One batching step (called from the engine's thread)."""
        series = self._step_series.get(model) or self._first_step(model)
        series.sequences.observe(step.sequences)
        series.prefill.inc(step.prefill_tokens)
        series.decode.inc(step.decode_tokens)
        if step.reused_tokens:
            series.reused.inc(step.reused_tokens)
        series.in_use.set(step.kv_cells_in_use)
        series.cached.set(step.kv_cells_cached)
        series.lookups.inc(step.cache_lookups)
        series.hit_tokens.inc(step.cache_hit_tokens)
        series.query_tokens.inc(step.cache_query_tokens)
        series.evicted.inc(step.cache_evicted_blocks)
        series.pool_bytes.set(step.cache_bytes)
        series.pool_capacity.set(step.cache_capacity_bytes)
        now = time.monotonic()
        with self._steps_lock:
            window = self._steps[model]
            window.append((now, step.prefill_tokens, step.decode_tokens))
            while window and window[0][0] < now - _RATE_WINDOW_S:
                window.popleft()

    def _first_step(self, model: str) -> _StepSeries:
        """The model's step series, looked up once (`labels()` costs more than `inc()`, and
        every step counts), and its throughput gauges."""
        series = _StepSeries(
            sequences=self.batch_sequences.labels(model),
            prefill=self.step_tokens.labels(model, "prefill"),
            decode=self.step_tokens.labels(model, "decode"),
            reused=self.prefix_reused.labels(model),
            in_use=self._kv_cells.labels(model, "in_use"),
            cached=self._kv_cells.labels(model, "cached"),
            lookups=self._cache_lookups.labels(model),
            hit_tokens=self._cache_hit_tokens.labels(model),
            query_tokens=self._cache_query_tokens.labels(model),
            evicted=self._cache_evicted.labels(model),
            pool_bytes=self._cache_bytes.labels(model),
            pool_capacity=self._cache_capacity.labels(model),
        )
        with self._steps_lock:  # a reloading model's old and new engines may both step
            known = self._step_series.get(model)
            if known is not None:
                return known
            self._steps[model] = deque()
            self._rates.labels(model, "prefill").set_function(lambda: self._rate(model, 1))
            self._rates.labels(model, "decode").set_function(lambda: self._rate(model, 2))
            self._step_series[model] = series
        return series

    def _rate(self, model: str, column: int) -> float:
        with self._steps_lock:
            window = self._steps.get(model)
            if not window:
                return 0.0
            now = time.monotonic()
            recent = [entry for entry in window if entry[0] >= now - _RATE_WINDOW_S]
            return sum(entry[column] for entry in recent) / _RATE_WINDOW_S

    def watch_load(self, model: str, load: Callable[[], EngineLoad]) -> None:
        """Read queue depth and running count from the engine at scrape time."""
        self._queue_depth.labels(model).set_function(lambda: load().waiting)
        self._running.labels(model).set_function(lambda: load().running)

    def render(self, engine_texts: Iterable[str] = ()) -> bytes:
        """The registry's exposition, then the engines' own series (`merge_expositions`)."""
        extra = merge_expositions(engine_texts)
        return generate_latest(self.registry) + extra.encode()


def merge_expositions(texts: Iterable[str]) -> str:
    """Several engines' Prometheus text as one exposition: each metric family once, with
    its HELP and TYPE lines, holding the samples of every engine (two vLLM models both
    export `vllm:num_requests_running`; repeating its TYPE line would void the scrape).

    A sample belongs to the family of the comment lines before it, as every exporter
    writes them."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(maxsplit=3)[2]
                comments, _ = families.setdefault(family, ([], []))
                if not any(seen.startswith(line[:7]) for seen in comments):
                    comments.append(line)
            elif not line.startswith("#"):
                families.setdefault(family, ([], []))[1].append(line)
    return "".join(
        "\n".join([*comments, *samples]) + "\n" for comments, samples in families.values()
    )
