"""A model as the appliance serves it: config, engine, live performance and metrics."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Literal

from appliance._private.digest import default_version
from appliance._private.engines.base import Engine, EngineContext, Finish, Generation
from appliance._private.engines.registry import ModelConfig, create_engine
from appliance._private.metrics import ApplianceMetrics
from federation import Children, ModelCard, Performance

# loading: beside the serving version, no traffic yet; serving: takes new requests;
# draining: replaced or removed, finishing its in-flight requests; closed: unloaded.
ModelState = Literal["loading", "serving", "draining", "closed"]

# The capability flags a model card lists when true (`ModelCard.capabilities`).
CAPABILITY_NAMES = (
    "embeddings",
    "logprobs",
    "n",
    "tools",
    "structured_output",
    "logit_bias",
    "echo",
    "several_prompts",
    "predict",
)
_WINDOW = 256
# Weight of the newest sample in the moving averages the router selects by.
_EWMA_ALPHA = 0.3


class ServedModel:
    def __init__(
        self, config: ModelConfig, home: Path, path: Path | None, metrics: ApplianceMetrics
    ) -> None:
        self.config = config
        self.path = path
        self.created = int(time.time())
        self.state: ModelState = "loading"
        # What is served: the configured values until `verified` sets the file's digest
        # (and the version it implies when none is configured).
        self.version: str | None = config.version
        self.sha256: str | None = config.sha256
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        context = EngineContext(
            home=home,
            path=path,
            on_finish=self._finished,
            on_step=lambda step: metrics.observe_step(config.id, step),
        )
        self.engine: Engine = create_engine(config, context)
        self._metrics = metrics
        self._ttft_seconds = Children(metrics.ttft)
        self._tpot_seconds = Children(metrics.tpot)
        self._durations = Children(metrics.durations)
        self._ttft_ms: deque[float] = deque(maxlen=_WINDOW)
        self._tpot_ms: deque[float] = deque(maxlen=_WINDOW)
        self.ttft_ewma_ms: float | None = None
        self.tpot_ewma_ms: float | None = None

    @property
    def id(self) -> str:
        return self.config.id

    def verified(self, sha256: str | None) -> None:
        """Record the digest checked at load; `version` defaults to its first 12 digits."""
        self.sha256 = sha256
        if self.version is None and sha256 is not None:
            self.version = default_version(sha256)

    def serving(self) -> None:
        """Loaded and taking traffic: its queue and readiness are what metrics show."""
        self.state = "serving"
        self._metrics.watch_load(self.config.id, self.engine.load_now)
        self._metrics.model_ready.labels(self.config.id).set(1)

    def withdrawn(self) -> None:
        """Removed: no longer served under its id."""
        self._metrics.model_ready.labels(self.config.id).set(0)

    def acquire(self) -> None:
        """One more request in flight (on the event loop, right after the model lookup)."""
        self.in_flight += 1

    def release(self) -> None:
        """That request is over, however it ended; exactly once per `acquire`."""
        self.in_flight -= 1
        if self.in_flight <= 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no request is in flight."""
        while self.in_flight > 0:
            self._idle = self._idle or asyncio.Event()
            self._idle.clear()
            await self._idle.wait()

    def _finished(self, generation: Generation, finish: Finish) -> None:
        """Called once per generation, from whichever thread finished it: its latency, timed
        here (the counters, settlement and audit row are the ledger's, on the loop)."""
        self._durations(self.config.id).observe(time.perf_counter() - generation.submitted_at)
        first = generation.first_token_at
        if first is None:
            return
        ttft = first - generation.submitted_at
        self._ttft_seconds(self.config.id).observe(ttft)
        self._ttft_ms.append(ttft * 1000)
        self.ttft_ewma_ms = _ewma(self.ttft_ewma_ms, ttft * 1000)
        if finish.completion_tokens > 1:
            tpot = (time.perf_counter() - first) / (finish.completion_tokens - 1)
            self._tpot_seconds(self.config.id).observe(tpot)
            self._tpot_ms.append(tpot * 1000)
            self.tpot_ewma_ms = _ewma(self.tpot_ewma_ms, tpot * 1000)

    def performance(self) -> Performance:
        return Performance(ttft_p50_ms=_median(self._ttft_ms), tpot_p50_ms=_median(self._tpot_ms))

    def card(self, region: str) -> ModelCard:
        capabilities = self.engine.capabilities
        return ModelCard(
            id=self.config.id,
            created=self.created,
            owned_by="palisade",
            pricing=self.config.pricing,
            performance=self.performance(),
            region=region,
            device_class=self.config.device_class,
            context_length=self.config.context_length,
            engine=self.config.engine,
            accelerator=capabilities.accelerator,
            version=self.version,
            sha256=self.sha256,
            capabilities=self.capability_names(),
        )

    def capability_names(self) -> list[str]:
        """The capability flags that are true, as model cards and heartbeats list them."""
        capabilities = self.engine.capabilities
        return [name for name in CAPABILITY_NAMES if getattr(capabilities, name)]


def _ewma(average: float | None, sample: float) -> float:
    if average is None:
        return round(sample, 3)
    return round(average + _EWMA_ALPHA * (sample - average), 3)


def _median(samples: deque[float]) -> float | None:
    return round(statistics.median(samples), 3) if samples else None
