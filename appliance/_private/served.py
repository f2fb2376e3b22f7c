"""A model as the appliance serves it: config, engine, live performance and metrics."""

from __future__ import annotations

import statistics
import time
from collections import deque
from pathlib import Path

from appliance._private.engines.base import Engine, EngineContext, Finish, Generation
from appliance._private.engines.registry import ModelConfig, create_engine
from appliance._private.metrics import ApplianceMetrics
from federation import ModelCard, Performance

_WINDOW = 256
# Weight of the newest sample in the moving averages the router selects by.
_EWMA_ALPHA = 0.3


class ServedModel:
    def __init__(
        self, config: ModelConfig, home: Path, path: Path | None, metrics: ApplianceMetrics
    ) -> None:
        self.config = config
        self.created = int(time.time())
        context = EngineContext(
            home=home,
            path=path,
            on_finish=self._finished,
            on_step=lambda step: metrics.observe_step(config.id, step),
        )
        self.engine: Engine = create_engine(config, context)
        self._metrics = metrics
        self._ttft_ms: deque[float] = deque(maxlen=_WINDOW)
        self._tpot_ms: deque[float] = deque(maxlen=_WINDOW)
        self.ttft_ewma_ms: float | None = None
        self.tpot_ewma_ms: float | None = None
        metrics.watch_load(config.id, self.engine.load_now)

    @property
    def id(self) -> str:
        return self.config.id

    def _finished(self, generation: Generation, finish: Finish) -> None:
        """Called once per generation, from whichever thread finished it."""
        model, metrics = self.config.id, self._metrics
        metrics.generations.labels(model, finish.reason).inc()
        metrics.prompt_tokens.labels(model).inc(finish.prompt_tokens)
        metrics.completion_tokens.labels(model).inc(finish.completion_tokens)
        first = generation.first_token_at
        if first is None:
            return
        ttft = first - generation.submitted_at
        metrics.ttft.labels(model).observe(ttft)
        self._ttft_ms.append(ttft * 1000)
        self.ttft_ewma_ms = _ewma(self.ttft_ewma_ms, ttft * 1000)
        if finish.completion_tokens > 1:
            tpot = (time.perf_counter() - first) / (finish.completion_tokens - 1)
            metrics.tpot.labels(model).observe(tpot)
            self._tpot_ms.append(tpot * 1000)
            self.tpot_ewma_ms = _ewma(self.tpot_ewma_ms, tpot * 1000)

    def performance(self) -> Performance:
        return Performance(ttft_p50_ms=_median(self._ttft_ms), tpot_p50_ms=_median(self._tpot_ms))

    def card(self, region: str) -> ModelCard:
        return ModelCard(
            id=self.config.id,
            created=self.created,
            owned_by="palisade",
            pricing=self.config.pricing,
            performance=self.performance(),
            region=region,
            device_class=self.config.device_class,
            context_length=self.config.context_length,
        )


def _ewma(average: float | None, sample: float) -> float:
    if average is None:
        return round(sample, 3)
    return round(average + _EWMA_ALPHA * (sample - average), 3)


def _median(samples: deque[float]) -> float | None:
    return round(statistics.median(samples), 3) if samples else None
