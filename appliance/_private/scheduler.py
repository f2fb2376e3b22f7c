"""A bounded FIFO in front of one worker thread that runs one generation at a time.

This is the serial scheduler: the engine hands it a `run` function that decodes one
generation to the end. A batching scheduler replaces it behind the same `Engine` seam.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

from appliance._private.engine import EngineLoad, Finish, Generation
from appliance._private.errors import ModelNotReadyError, QueueFullError

log = logging.getLogger("palisade.appliance.scheduler")

RunFn = Callable[[Generation], Finish]
FinishFn = Callable[[Generation, Finish], None]


class SerialScheduler:
    def __init__(self, run: RunFn, on_finish: FinishFn, *, max_queue: int, name: str) -> None:
        self._run = run
        self._on_finish = on_finish
        self._max_queue = max_queue
        self._name = name
        self._waiting: deque[Generation] = deque()
        self._running: Generation | None = None
        self._durations: deque[float] = deque(maxlen=64)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"engine-{name}", daemon=True)
        self._thread.start()

    def submit(self, generation: Generation) -> None:
        with self._cond:
            if self._closed:
                raise ModelNotReadyError(
                    f"The model `{self._name}` is shutting down; retry on another node.",
                    retry_after=1,
                )
            busy = len(self._waiting) + (self._running is not None)
            if busy >= 1 + self._max_queue:
                raise QueueFullError(
                    f"The request queue for `{self._name}` is full ({self._max_queue} waiting). "
                    "Retry after the time in the Retry-After header.",
                    retry_after=self._retry_after(busy),
                )
            generation.on_cancel(self._withdraw)
            self._waiting.append(generation)
            self._cond.notify()

    def load(self) -> EngineLoad:
        with self._cond:
            return EngineLoad(
                running=int(self._running is not None), waiting=len(self._waiting), slots=1
            )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            abandoned = list(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel()
            self._cond.notify_all()
        for generation in abandoned:
            finish = Finish(
                "error", len(generation.prompt), 0, error="the appliance is shutting down"
            )
            generation.close(finish)
            self._on_finish(generation, finish)
        self._thread.join(timeout=30)

    def _retry_after(self, busy: int) -> int:
        typical = statistics.median(self._durations) if self._durations else 1.0
        return max(1, min(60, round(typical * busy)))

    def _withdraw(self, generation: Generation) -> None:
        with self._cond:
            try:
                self._waiting.remove(generation)
            except ValueError:
                return  # already running: the worker sees the flag before its next step
        finish = Finish("cancelled", 0, 0)  # never started: nothing to bill
        generation.close(finish)
        self._on_finish(generation, finish)

    def _next(self) -> Generation | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if not self._waiting:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _work(self) -> None:
        while (generation := self._next()) is not None:
            started = time.perf_counter()
            try:
                finish = self._run(generation)
            except Exception as exc:
                log.exception("generation failed on model %s", self._name)
                finish = Finish("error", len(generation.prompt), 0, error=type(exc).__name__)
            with self._cond:
                self._running = None
            self._durations.append(time.perf_counter() - started)
            generation.close(finish)
            self._on_finish(generation, finish)
