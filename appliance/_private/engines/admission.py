"""One bounded admission queue and one `Retry-After` rule, for every engine.

At most `slots` requests run at once and `max_queue` more wait; beyond that `admit()`
raises `QueueFullError` with `Retry-After` = clamp(1..60, round(typical * busy / slots)):
`busy` requests ahead share `slots` places and each takes about `typical` seconds, the
median of the last 64 completed requests' running times (1 s before any has completed).

The queue only counts; the engine decides what "running" means (a llama.cpp sequence in
the batch, a request in flight to an upstream) and calls `start()` and `finish()` at those
moments. It takes no lock of its own: an engine calls it from one thread (the event loop)
or under the lock it already holds, so admission adds no locking to the decode path.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from appliance._private.engines.base import EngineLoad
from appliance._private.errors import QueueFullError

TYPICAL_WINDOW = 64  # completed requests whose running time sets the typical duration
MIN_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 60
_NO_HISTORY_S = 1.0


class AdmissionQueue:
    """`slots` running, `max_queue` waiting, the rest refused with one Retry-After rule."""

    __slots__ = (
        "_activity",
        "_durations",
        "_free",
        "clock",
        "max_queue",
        "name",
        "running",
        "slots",
        "waiting",
    )

    def __init__(
        self,
        name: str,
        slots: int,
        max_queue: int,
        *,
        activity: str = "running",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1 or max_queue < 0:
            raise ValueError(f"an admission queue needs slots >= 1 and max_queue >= 0 ({name})")
        self.name = name
        self.slots = slots
        self.max_queue = max_queue
        self.clock = clock
        self.running = 0
        self.waiting = 0
        self._activity = activity  # how the refusal names running requests ("decoding")
        self._durations: deque[float] = deque(maxlen=TYPICAL_WINDOW)
        self._free: asyncio.Semaphore | None = None  # made at first `slot()`

    def admit(self) -> None:
        """Count one more waiting request, or raise `QueueFullError` when none may wait."""
        busy = self.running + self.waiting
        if busy >= self.slots + self.max_queue:
            raise QueueFullError(
                f"The request queue for `{self.name}` is full ({self.running} "
                f"{self._activity}, {self.waiting} waiting). Retry after the time in the "
                "Retry-After header.",
                retry_after=self.retry_after(),
            )
        self.waiting += 1

    def withdraw(self) -> None:
        """An admitted request left before it started (cancelled, or the engine stopped)."""
        self.waiting -= 1

    def start(self) -> float:
        """An admitted request takes a running place; returns the clock's time, for
        `finish(queue.clock() - started)`."""
        self.waiting -= 1
        self.running += 1
        return self.clock()

    def finish(self, duration: float | None = None) -> None:
        """A running request ended; `duration` (its running time) when it completed, so it
        counts toward the typical duration; None when it failed or was cancelled."""
        self.running -= 1
        if duration is not None:
            self._durations.append(duration)

    def typical_duration(self) -> float:
        return statistics.median(self._durations) if self._durations else _NO_HISTORY_S

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the one rule every engine answers with."""
        busy = self.running + self.waiting
        estimate = round(self.typical_duration() * busy / self.slots)
        return max(MIN_RETRY_AFTER_S, min(MAX_RETRY_AFTER_S, estimate))

    def load(self) -> EngineLoad:
        return EngineLoad(running=self.running, waiting=self.waiting, slots=self.slots)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """For engines whose requests are asyncio tasks: wait (already admitted) for one of
        `slots` places, run the body, finish. The body's running time counts toward the
        typical duration when it ends without an exception; a request cancelled while
        waiting is withdrawn."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.slots)
        waiting = True
        try:
            async with self._free:
                started = self.start()
                waiting = False
                completed = False
                try:
                    yield
                    completed = True
                finally:
                    self.finish(self.clock() - started if completed else None)
        finally:
            if waiting:
                self.withdraw()
