"""The canary: one small synthetic request per region and device class, through the router.

Every round asks each (region, device class) the fleet has for one token of a fixed prompt,
pinned there with `X-Palisade-Regions` and `X-Palisade-Device-Class` (which only the canary
role may send), with a canary key: an ordinary key of the canary org, tight limits. A probe
is **ok** when the router answers 200 from that region and device class within the timeout;
anything else (no answer, an error status, an answer from elsewhere) is an **error**. Down
nodes stay in the fleet view, so a region whose nodes have all stopped keeps being probed and
keeps failing: that is what the canary alert is for.

`CanaryPolicy` (which targets, when, what counts as failure) is plain and clock-injected;
`Canary` runs it over HTTP, for the router (`[canary] enabled`) and for `palisade canary`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal, get_args

import aiohttp
import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from federation import (
    DEVICE_CLASS_HEADER,
    DEVICE_HEADER,
    FLEET_DECODER,
    LATENCY_BUCKETS,
    REGION_HEADER,
    FleetStatus,
)

log = logging.getLogger("palisade.canary")

CanaryOutcome = Literal["ok", "error"]
OUTCOMES: Final[tuple[CanaryOutcome, ...]] = get_args(CanaryOutcome)
# A fixed prompt that carries nothing of anyone's, and the fewest tokens that prove an answer.
CANARY_PROMPT: Final = "Canary check: reply with one word."
MAX_TOKENS: Final = 1
_REGIONS_HEADER: Final = "X-Palisade-Regions"


@dataclass(frozen=True, order=True, slots=True)
class CanaryTarget:
    """One place to probe: a region, a device class there, and a model it serves."""

    region: str
    device_class: str
    model: str


@dataclass(frozen=True, slots=True)
class ProbeReply:
    """What a probe got back. `status` None: no HTTP answer (`problem` says why)."""

    status: int | None
    region: str | None = None
    device: str | None = None
    problem: str | None = None  # the error code of an error answer, or the transport failure
    elapsed_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    target: CanaryTarget
    outcome: CanaryOutcome
    elapsed_s: float
    reason: str  # "ok", or what failed (never the key or a reply's text)


class CanaryPolicy:
    """Which targets a round probes, when rounds start, and what counts as failure."""

    def __init__(self, every_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._next = clock()  # the first round at once
        self._last: dict[CanaryTarget, CanaryOutcome] = {}

    def targets(self, status: FleetStatus) -> list[CanaryTarget]:
        """Every (region, device class) a node declares, whatever its state (a region whose
        nodes are down is exactly what must fail), each with the first model served there."""
        models: dict[tuple[str, str], set[str]] = {}
        for node in status.nodes:
            for device in node.device_classes:
                models.setdefault((node.region, device), set()).update(node.models)
        return sorted(
            CanaryTarget(region, device, min(served))
            for (region, device), served in models.items()
            if served
        )

    def wait_s(self) -> float:
        """Seconds until the next round is due (0: now)."""
        return max(0.0, self._next - self._clock())

    def begin_round(self) -> None:
        """A round starts: the next is due one period after this one was, or one period from
        now if this one is a period late or more (rounds never overlap; missed ones are not
        made up)."""
        now = self._clock()
        self._next += self.every_s
        if self._next <= now:
            self._next = now + self.every_s

    def judge(self, target: CanaryTarget, reply: ProbeReply) -> ProbeResult:
        """ok only for a 200 served in the target's region on its device class."""
        reason = _failure(target, reply)
        outcome: CanaryOutcome = "ok" if reason is None else "error"
        return ProbeResult(target, outcome, reply.elapsed_s, reason or "ok")

    def changed(self, result: ProbeResult) -> bool:
        """Whether `result` turns its target's outcome (a first result counts as a change
        only when it is an error): what is worth a log line."""
        before = self._last.get(result.target, "ok")
        self._last[result.target] = result.outcome
        return before != result.outcome


def _failure(target: CanaryTarget, reply: ProbeReply) -> str | None:
    if reply.status is None:
        return f"no answer ({reply.problem or 'failed'})"
    if reply.status != 200:
        return f"HTTP {reply.status}" + (f" {reply.problem}" if reply.problem else "")
    if reply.region != target.region:
        return f"answered from region {reply.region or '?'}"
    device = (reply.device or "").partition("/")[0]
    if device != target.device_class:
        return f"answered on device class {device or '?'}"
    return None


class CanaryMetrics:
    """`palisade_canary_requests_total{region,device_class,outcome}` and
    `palisade_canary_latency_seconds{region,device_class}` (answers judged ok)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "palisade_canary_requests",
            "Canary probes, by region, device class and outcome (ok, error)",
            ["region", "device_class", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "palisade_canary_latency_seconds",
            "Time for a canary probe judged ok to be answered (one token through the router)",
            ["region", "device_class"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def watch(self, targets: Iterable[CanaryTarget]) -> None:
        """Export each target's counters from zero before its first result: an alert on
        `increase(...{outcome="error"})` then sees the first error too."""
        for target in targets:
            for outcome in OUTCOMES:
                self.requests.labels(target.region, target.device_class, outcome)

    def record(self, result: ProbeResult) -> None:
        target = result.target
        self.requests.labels(target.region, target.device_class, result.outcome).inc()
        if result.outcome == "ok":
            self.latency.labels(target.region, target.device_class).observe(result.elapsed_s)


class Canary:
    """Probes targets over HTTP through the router at `url`, with the canary `key`."""

    def __init__(
        self,
        policy: CanaryPolicy,
        metrics: CanaryMetrics,
        *,
        url: str,
        key: str,
        timeout_s: float,
        tls: ssl.SSLContext | None = None,
        report: Callable[[ProbeResult], None] | None = None,
    ) -> None:
        self.policy = policy
        self.metrics = metrics
        self._url = url.rstrip("/")
        self._key = key
        self._timeout_s = timeout_s
        self._tls = tls
        self._report = report or _log_change(policy)
        self._session: aiohttp.ClientSession | None = None
        self._known: list[CanaryTarget] = []

    async def __aenter__(self) -> Canary:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else True),
            skip_auto_headers=("User-Agent",),
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use `async with Canary(...)`")
        return self._session

    async def fleet_targets(self) -> list[CanaryTarget]:
        """The targets, from the router's fleet view (the canary role may read it). When the
        view cannot be read, the last targets known: a router that stopped answering must
        fail every probe, not silence them."""
        try:
            self._known = self.policy.targets(await self._fleet_view())
        except CanaryError as exc:
            if not self._known:
                raise
            log.warning("canary: probing the last targets known: %s", exc)
        return self._known

    async def _fleet_view(self) -> FleetStatus:
        try:
            async with self.session.get(
                self._url + "/federation/v1/fleet",
                headers=self._auth(),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            ) as reply:
                body = await reply.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CanaryError(f"cannot read the fleet view: {type(exc).__name__}") from None
        if reply.status != 200:
            raise CanaryError(f"the fleet view answered HTTP {reply.status}{_code(body)}")
        try:
            return FLEET_DECODER.decode(body)
        except msgspec.MsgspecError as exc:
            raise CanaryError(f"the fleet view is not one this canary reads: {exc}") from None

    async def run(
        self,
        targets: Callable[[], Awaitable[list[CanaryTarget]]],
        *,
        rounds: int | None = None,
    ) -> list[ProbeResult]:
        """Round after round on the policy's schedule (`rounds` of them, or forever);
        returns the last round's results."""
        results: list[ProbeResult] = []
        done = 0
        while rounds is None or done < rounds:
            await asyncio.sleep(self.policy.wait_s())
            self.policy.begin_round()
            done += 1
            try:
                found = await targets()
            except CanaryError as exc:
                log.warning("canary: nothing probed this round: %s", exc)
                continue
            results = await self.round(found)
        return results

    async def round(self, targets: list[CanaryTarget]) -> list[ProbeResult]:
        self.metrics.watch(targets)
        results = await asyncio.gather(*(self.probe(target) for target in targets))
        for result in results:
            self.metrics.record(result)
            self._report(result)
        return list(results)

    async def probe(self, target: CanaryTarget) -> ProbeResult:
        body = {
            "model": target.model,
            "messages": [{"role": "user", "content": CANARY_PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        headers = self._auth() | {
            _REGIONS_HEADER: target.region,
            DEVICE_CLASS_HEADER: target.device_class,
        }
        started = time.perf_counter()
        try:
            async with self.session.post(
                self._url + "/v1/chat/completions",
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            ) as answer:
                data = await answer.read()
            reply = ProbeReply(
                status=answer.status,
                region=answer.headers.get(REGION_HEADER),
                device=answer.headers.get(DEVICE_HEADER),
                problem=None if answer.status == 200 else _code(data).strip() or None,
                elapsed_s=time.perf_counter() - started,
            )
        except TimeoutError:
            reply = ProbeReply(None, problem=f"timed out after {self._timeout_s:g} s")
        except aiohttp.ClientError as exc:
            reply = ProbeReply(None, problem=type(exc).__name__)
        return self.policy.judge(target, reply)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}


_DURATION = re.compile(r"^\s*(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in `60s`, `1.5m`, `500ms`, `1h` or a bare number of seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"`{text}` is not a duration such as 60s, 5m or 1h")
    return float(match["amount"]) * _UNIT_S[match["unit"] or "s"]


class CanaryError(Exception):
    """The canary could not learn what to probe (the fleet view refused or failed)."""


class _Error(msgspec.Struct):
    code: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _Error | None = None


_ERROR = msgspec.json.Decoder(_ErrorBody)


def _code(body: bytes) -> str:
    """` <code>` of an OpenAI-shaped error body, or nothing."""
    with contextlib.suppress(msgspec.MsgspecError):
        error = _ERROR.decode(body).error
        if error is not None and error.code:
            return f" {error.code}"
    return ""


def _log_change(policy: CanaryPolicy) -> Callable[[ProbeResult], None]:
    def report(result: ProbeResult) -> None:
        if policy.changed(result):
            target = result.target
            level = logging.INFO if result.outcome == "ok" else logging.WARNING
            log.log(
                level,
                "canary %s/%s (%s): %s",
                target.region,
                target.device_class,
                target.model,
                result.reason,
            )

    return report
