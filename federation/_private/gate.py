"""Admission control for tenants: per-key rate limits, per-org monthly token budgets, metering.

`admit` and `settle` never await, so on one event loop every check-and-take is atomic:
under any concurrency the admitted worst cases never add up past a budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from federation._private.admin_wire import KeyLimits, UsageRecord
from federation._private.errors import RateLimitError
from federation._private.principal import Principal
from federation._private.store import TenancyStore, iso, month_of

log = logging.getLogger("palisade.federation.gate")
Monotonic = Callable[[], float]
_FLUSH_SECONDS = 0.2
_FLUSH_BATCH = 256


class TokenBucket:
    """`capacity` units, refilled continuously at `per_minute` units a minute."""

    __slots__ = ("capacity", "level", "per_second", "updated")

    def __init__(self, capacity: int, per_minute: int, now: float) -> None:
        self.capacity = capacity
        self.per_second = per_minute / 60.0
        self.level = float(capacity)
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def wait_for(self, amount: int) -> float:
        """Seconds until `amount` units are available (inf if it never fits)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.per_second)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.per_second


@dataclass(slots=True)
class _KeyBuckets:
    limits: KeyLimits
    requests: TokenBucket | None
    tokens: TokenBucket | None


@dataclass(slots=True)
class Admission:
    """What one admitted request took; handed back to `settle`."""

    principal: Principal
    month: str
    reserved: int
    started: float
    headers: dict[str, str]
    settled: bool = False


def _reset(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _seconds_to_next_month(now: datetime) -> int:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return max(1, math.ceil((datetime(year, month, 1, tzinfo=UTC) - now).total_seconds()))


class Gate:
    def __init__(
        self, store: TenancyStore, *, region: str, node: str, monotonic: Monotonic = time.monotonic
    ) -> None:
        self._store = store
        self._region = region
        self._node = node
        self._monotonic = monotonic
        self._buckets: dict[str, _KeyBuckets] = {}
        self._used: dict[tuple[str, str], int] = {}
        self._reserved: dict[tuple[str, str], int] = {}
        self._loaded_months: set[str] = set()
        self._pending: list[UsageRecord] = []
        self._totals: dict[tuple[str, str], int] = {}
        self._last_used: dict[str, str] = {}
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._load_month(month_of(self._store.clock()))
        self._flusher = asyncio.create_task(self._flush_forever())

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        await self.flush()

    async def _load_month(self, month: str) -> None:
        for org, used in (await self._store.month_usage(month)).items():
            self._used[(org, month)] = used
        self._loaded_months.add(month)

    # --- admission ------------------------------------------------------------------------

    def admit(self, principal: Principal, estimate: int) -> Admission:
        """Take one request and `estimate` tokens from the key's limits and org's budget."""
        now_wall = self._store.clock()
        month = month_of(now_wall)
        if month not in self._loaded_months:
            self._loaded_months.add(month)  # a new month starts from zero
        buckets = self._buckets_for(principal.key_id)
        now = self._monotonic()
        for bucket in (buckets.requests, buckets.tokens):
            if bucket is not None:
                bucket.refill(now)
        self._check_rate(buckets, estimate)
        self._check_budget(principal.org, month, estimate, now_wall)
        if buckets.requests is not None:
            buckets.requests.level -= 1
        if buckets.tokens is not None:
            buckets.tokens.level -= estimate
        slot = (principal.org, month)
        self._reserved[slot] = self._reserved.get(slot, 0) + estimate
        return Admission(principal, month, estimate, now, self._headers(buckets))

    def _buckets_for(self, key_id: str | None) -> _KeyBuckets:
        record = self._store.keys.get(key_id) if key_id else None
        limits = record.limits if record is not None else KeyLimits()
        current = self._buckets.get(key_id or "")
        if current is not None and current.limits == limits:
            return current
        now = self._monotonic()
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        fresh = _KeyBuckets(
            limits,
            TokenBucket(limits.burst or rpm, rpm, now) if rpm else None,
            TokenBucket(tpm, tpm, now) if tpm else None,
        )
        self._buckets[key_id or ""] = fresh
        return fresh

    def _check_rate(self, buckets: _KeyBuckets, estimate: int) -> None:
        if buckets.requests is not None and buckets.requests.level < 1:
            wait = buckets.requests.wait_for(1)
            raise RateLimitError(
                f"Rate limit reached: {buckets.limits.requests_per_minute} requests per minute "
                f"for this key. Retry in {math.ceil(wait)} s.",
                retry_after=max(1, math.ceil(wait)),
            )
        if buckets.tokens is not None and buckets.tokens.level < estimate:
            wait = buckets.tokens.wait_for(estimate)
            if math.isinf(wait):
                raise RateLimitError(
                    f"This request may use {estimate} tokens (prompt + max_tokens), more than "
                    f"the key's {buckets.limits.tokens_per_minute} tokens per minute. Lower "
                    "max_tokens or ask for a higher limit.",
                    param="max_tokens",
                    retry_after=60,
                )
            raise RateLimitError(
                f"Rate limit reached: {buckets.limits.tokens_per_minute} tokens per minute for "
                f"this key. Retry in {math.ceil(wait)} s.",
                retry_after=max(1, math.ceil(wait)),
            )

    def _check_budget(self, org: str, month: str, estimate: int, now: datetime) -> None:
        record = self._store.orgs.get(org)
        limit = record.budget_tokens if record is not None else None
        if limit is None:
            return
        slot = (org, month)
        committed = self._used.get(slot, 0) + self._reserved.get(slot, 0)
        if committed + estimate > limit:
            raise RateLimitError(
                f"Organization `{org}` has used its monthly budget of {limit} tokens "
                f"({committed} used or reserved; this request may need {estimate}). An org "
                "admin can raise it with `palisade budget set`.",
                code="budget_exceeded",
                retry_after=_seconds_to_next_month(now),
            )

    def _headers(self, buckets: _KeyBuckets) -> dict[str, str]:
        headers: dict[str, str] = {}
        for kind, bucket, limit in (
            ("requests", buckets.requests, buckets.limits.requests_per_minute),
            ("tokens", buckets.tokens, buckets.limits.tokens_per_minute),
        ):
            if bucket is not None and limit is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
                headers[f"x-ratelimit-reset-{kind}"] = _reset(bucket.until_full())
        return headers

    # --- settlement and metering --------------------------------------------------------------

    def settle(
        self,
        admission: Admission,
        *,
        model: str,
        input_tokens: int,
        output_tokens: int,
        status: str,
        cost: float,
        region: str | None = None,
        node: str | None = None,
    ) -> None:
        """Release the reservation, charge the real count and queue one usage record.

        `region` and `node` name where the request ran when that is not this server (the
        router meters requests its appliances served).
        """
        if admission.settled:
            return
        admission.settled = True
        principal = admission.principal
        slot = (principal.org, admission.month)
        self._reserved[slot] = self._reserved.get(slot, 0) - admission.reserved
        actual = input_tokens + output_tokens
        self._used[slot] = self._used.get(slot, 0) + actual
        buckets = self._buckets.get(principal.key_id or "")
        if buckets is not None and buckets.tokens is not None:
            refund = admission.reserved - actual
            buckets.tokens.level = min(buckets.tokens.capacity, buckets.tokens.level + refund)
        self._totals[slot] = self._totals.get(slot, 0) + actual
        at = iso(self._store.clock())
        if principal.key_id:
            self._last_used[principal.key_id] = at
        if principal.logging_mode == "zero":
            self._wake_if_full()
            return  # zero logging: the budget counters above, and no per-request row
        self._pending.append(
            UsageRecord(
                at=at,
                org=principal.org,
                user_id=principal.user,
                key_id=principal.key_id,
                model=model,
                region=region or self._region,
                node=node or self._node,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                latency_ms=round((self._monotonic() - admission.started) * 1000, 3),
                status=status,
                cost=cost,
            )
        )
        self._wake_if_full()

    def _wake_if_full(self) -> None:
        if len(self._pending) >= _FLUSH_BATCH or len(self._totals) >= _FLUSH_BATCH:
            self._wakeup.set()

    def budget_state(self, org: str) -> tuple[str, int, int]:
        month = month_of(self._store.clock())
        return month, self._used.get((org, month), 0), self._reserved.get((org, month), 0)

    async def flush(self) -> None:
        if not self._pending and not self._totals:
            return
        records, totals, last_used = self._pending, self._totals, self._last_used
        self._pending, self._totals, self._last_used = [], {}, {}
        try:
            await self._store.write_usage(records, totals, last_used)
        except Exception:
            self._pending[:0] = records  # nothing accepted is lost: retried on the next flush
            for slot, used in totals.items():
                self._totals[slot] = self._totals.get(slot, 0) + used
            self._last_used = last_used | self._last_used
            raise

    async def _flush_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), _FLUSH_SECONDS)
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("writing usage records failed; they will be retried")
