"""The metrics contract: what the router and the appliance export, read from their registries.

`metric_contract(registry)` lists every metric family a registry holds (name, type, labels, unit,
meaning) without any sample having been recorded, so the reference table
(`palisade metrics reference`, docs/metrics.md) is generated from the code and cannot drift.
Collectors that build their families at scrape time say what they export through
`DocumentedCollector.contract`.

Also here, because both processes export them: the latency buckets, certificate expiry and
the audit log's checkpoint lag.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from federation._private.pki import load_pem_certificate

MetricType = Literal["counter", "gauge", "histogram", "info"]
# Time to first token and end-to-end latency: from a GPU's tens of milliseconds to a CPU's
# long prompts (a minute and more).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Time per output token: a GPU's ~1-10 ms to a CPU's ~20-500 ms.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# What a label may never be named like: ids of keys, users and requests are unbounded and
# identify people (org appears only where the contract allows it: budget use per org).
FORBIDDEN_LABEL_PARTS = ("key", "user", "request", "trace", "prompt")


@dataclass(frozen=True, slots=True)
class MetricRow:
    """One metric family of the contract, as exposed (counters with their `_total`)."""

    name: str
    type: MetricType
    labels: tuple[str, ...]
    help: str

    @property
    def unit(self) -> str:
        for suffix, unit in _UNITS:
            if self.name.removesuffix("_total").endswith(suffix):
                return unit
        return ""


_UNITS = (
    ("_seconds", "seconds"),
    ("_bytes", "bytes"),
    ("_ratio", "ratio (0-1)"),
    ("_tokens", "tokens"),
    ("_per_second", "tokens/s"),
    ("_blocks", "blocks"),
    ("_cells", "KV cells"),
    ("_entries", "entries"),
)


class DocumentedCollector(Collector):
    """A collector that builds its families at scrape time and lists them for the contract."""

    @abstractmethod
    def contract(self) -> list[MetricRow]:
        """The rows this collector's families take in the metrics contract."""


def metric_contract(registry: CollectorRegistry, *extra: MetricRow) -> list[MetricRow]:
    """Every family of `registry` (and `extra`, such as series engines export), by name."""
    rows = list(extra)
    # The registry's own index of collectors: the public API only yields families with
    # samples, and a labelled metric nobody has used yet has none.
    for collector in list(registry._collector_to_names):
        if isinstance(collector, MetricWrapperBase):
            rows.append(_wrapped(collector))
        elif isinstance(collector, DocumentedCollector):
            rows.extend(collector.contract())
        else:
            raise TypeError(f"{collector!r} does not document the metrics it exports")
    return sorted(rows, key=lambda row: row.name)


def _wrapped(metric: MetricWrapperBase) -> MetricRow:
    kind = metric._type
    name = metric._name
    if kind == "counter":
        name += "_total"
    labels = tuple(metric._labelnames)
    return MetricRow(name, _KINDS.get(kind or "", "gauge"), labels, metric._documentation)


_KINDS: dict[str, MetricType] = {
    "counter": "counter",
    "gauge": "gauge",
    "histogram": "histogram",
    "info": "info",
}


class CertificateExpiry(DocumentedCollector):
    """`palisade_certificate_expiry_seconds{certificate}`: seconds until each certificate
    this process serves with expires (negative once expired), read at scrape time: a renewal
    replaces the file."""

    NAME = "palisade_certificate_expiry_seconds"
    HELP = "Seconds until the certificate expires (negative once it has), by certificate"

    def __init__(
        self,
        paths: Callable[[], dict[str, Path]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._paths = paths
        self._clock = clock
        self._read: dict[Path, tuple[float, float]] = {}  # path -> (mtime, not after)

    def contract(self) -> list[MetricRow]:
        return [MetricRow(self.NAME, "gauge", ("certificate",), self.HELP)]

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["certificate"])]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["certificate"])
        now = self._clock()
        for name, path in sorted(self._paths().items()):
            not_after = self._not_after(path)
            if not_after is not None:
                family.add_metric([name], round(not_after - now, 3))
        return [family]

    def _not_after(self, path: Path) -> float | None:
        try:
            mtime = path.stat().st_mtime
            known = self._read.get(path)
            if known is not None and known[0] == mtime:
                return known[1]
            cert = load_pem_certificate(path.read_bytes())
        except (OSError, ValueError):
            return None
        not_after = cert.not_valid_after_utc.timestamp()
        self._read[path] = (mtime, not_after)
        return not_after


class AuditLag(DocumentedCollector):
    """How far the audit log's signed checkpoints trail its entries: a writer that stopped
    signing leaves entries no checkpoint covers (the "audit checkpoint stale" alert)."""

    UNSIGNED = "palisade_audit_unsigned_entries"
    AGE = "palisade_audit_checkpoint_age_seconds"

    def __init__(self, lag: Callable[[], tuple[int, float] | None]) -> None:
        self._lag = lag

    def contract(self) -> list[MetricRow]:
        return [
            MetricRow(self.UNSIGNED, "gauge", (), "Audit entries written but not yet signed"),
            MetricRow(self.AGE, "gauge", (), "Seconds since the audit log last signed"),
        ]

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._lag())

    def _families(self, lag: tuple[int, float] | None) -> Sequence[Metric]:
        rows = self.contract()
        unsigned = GaugeMetricFamily(rows[0].name, rows[0].help)
        age = GaugeMetricFamily(rows[1].name, rows[1].help)
        if lag is not None:
            unsigned.add_metric([], lag[0])
            age.add_metric([], round(lag[1], 3))
        return [unsigned, age]
