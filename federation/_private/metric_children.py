"""Prometheus metrics counted on request paths: each labelled child looked up once.

`metric.labels(...)` validates and hashes its values on every call and costs several times
the `inc()` or `observe()` after it; a path that counts every request keeps the children it
has used instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """`children(*labels)` is `metric.labels(*labels)`, looked up once per set of labels."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


def request_counter(
    requests: Counter, durations: Histogram | None = None
) -> Callable[[str, int, float], None]:
    """`count(endpoint, status, seconds)` for `count_exits`: requests by endpoint and final
    status (499: the client left first), and their duration when `durations` is given."""
    children = Children(requests)
    timers = Children(durations) if durations is not None else None

    def count(endpoint: str, status: int, seconds: float) -> None:
        children(endpoint, str(status)).inc()
        if timers is not None:
            timers(endpoint).observe(seconds)

    return count
