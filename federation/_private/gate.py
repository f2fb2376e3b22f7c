"""Admission control for tenants: per-key rate limits, per-org monthly token budgets, metering.

`admit` and `settle` never await, so on one event loop every check-and-take is atomic:
under any concurrency the admitted worst cases never add up past a budget.

Both also append a line to the admission journal (`admissions.journal`, see `journal.py`):
a process that is killed leaves behind what it admitted and settled, and the next start
settles it (`recover`) before serving, so the books survive a SIGKILL.

On a store shared by several routers (PostgreSQL), budgets are admitted against this
router's slices of them (`BudgetSlices`): `admit_async` first tops up a slice that lacks
room, then admits as `admit` does. Usage is written in batches, each with the journal mark
it covers; a batch whose transaction may or may not have committed (the database went away
at the commit) is retried alone, and skipped if its mark shows it landed: nothing is
counted twice.

Per-key rate limits on a shared store: each router enforces its share of a key's limits,
the configured rates and burst divided by `rate_share()`, the number of live routers
sharing the store (the router refreshes it from the `routers` table about twice a second,
never on the admission path), while the load balancer spreads a key's requests evenly:
n routers each admitting 1/n of the rate admit the key's rate together. When the count
changes, a key's buckets are rebuilt at its next admission keeping how full they were,
not refilled: a router dying or joining must not hand out a fresh burst (a count that
flaps would otherwise hand out one per flap). A request whose tokens exceed this router's
share of `tokens_per_minute` but fit the key's whole limit is admitted once the share's
bucket is full, leaving it in debt: the average rate still holds. The `x-ratelimit-*`
headers show this router's share. With one router (`rate_share() == 1`) nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import msgspec

from federation._private.admin_wire import KeyLimits, UsageRecord
from federation._private.budget_slices import LEASE_S, BudgetSlices, budget_exceeded
from federation._private.database import StoreError
from federation._private.errors import RateLimitError, ServiceUnavailableError
from federation._private.journal import Journal, LeaseBook, boot_id, journal_epoch
from federation._private.principal import Principal
from federation._private.store import Recovered, TenancyStore, iso, month_of

log = logging.getLogger("palisade.federation.gate")
Monotonic = Callable[[], float]
Held = Callable[[str, str], int]  # (org, month) -> tokens held by nodes' budget-share leases
_FLUSH_SECONDS = 0.2
_FLUSH_BATCH = 256
_REFRESH_ROUNDS = 10  # flush rounds between two reads of a shared store's used tokens (2 s)
_ROTATE_BYTES = 4 * 1024 * 1024  # the journal is rewritten with only what is open past this
REQUEST_ID_HEADER = "x-request-id"
INTERRUPTED = "interrupted"


class TokenBucket:
    """`capacity` units, refilled continuously at `per_minute` units a minute.

    `most` is the largest amount one take may ask for (default `capacity`): a larger one
    waits for a full bucket and leaves it in debt (a router's share of a key's tokens).
    """

    __slots__ = ("capacity", "level", "most", "per_second", "updated")

    def __init__(
        self, capacity: float, per_minute: float, now: float, most: float | None = None
    ) -> None:
        self.capacity = capacity
        self.per_second = per_minute / 60.0
        self.level = float(capacity)
        self.updated = now
        self.most = capacity if most is None else most

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def needs(self, amount: int) -> float:
        """The level a take of `amount` waits for."""
        return min(amount, self.capacity)

    def wait_for(self, amount: int) -> float:
        """Seconds until `amount` units may be taken (inf if it never fits)."""
        if amount > self.most:
            return math.inf
        return max(0.0, (self.needs(amount) - self.level) / self.per_second)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.per_second


@dataclass(slots=True)
class KeyBuckets:
    """One key's request and token buckets (None: that limit is not set)."""

    limits: KeyLimits
    requests: TokenBucket | None
    tokens: TokenBucket | None
    share: int = 1  # routers enforcing the key's limits together (see the module's doc)

    @classmethod
    def of(cls, limits: KeyLimits, now: float, share: int = 1) -> KeyBuckets:
        """Buckets for this router's share of the key's limits, full."""
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        requests = tokens = None
        if rpm:  # a burst split n ways is still at least one request
            requests = TokenBucket(max(1.0, (limits.burst or rpm) / share), rpm / share, now)
        if tpm:
            tokens = TokenBucket(tpm / share, tpm / share, now, most=tpm)
        return cls(limits, requests, tokens, share)

    def reshared(self, share: int, now: float) -> KeyBuckets:
        """The same limits split `share` ways, each bucket as full as it is now."""
        fresh = KeyBuckets.of(self.limits, now, share)
        for old, new in ((self.requests, fresh.requests), (self.tokens, fresh.tokens)):
            if old is not None and new is not None:
                old.refill(now)
                new.level = old.level / old.capacity * new.capacity
        return fresh

    def check(self, now: float, estimate: int) -> None:
        """Refill, then raise 429 unless one request and `estimate` tokens fit."""
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)
        check_rate(self, estimate)

    def take(self, estimate: int) -> dict[str, str]:
        """Take what `check` found room for; the rate-limit headers."""
        if self.requests is not None:
            self.requests.level -= 1
        if self.tokens is not None:
            self.tokens.level -= estimate
        return rate_headers(self)

    def refund(self, tokens: int) -> None:
        if self.tokens is not None:
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + tokens)


@dataclass(slots=True)
class Admission:
    """What one admitted request took; handed back to `settle`."""

    principal: Principal
    month: str
    reserved: int
    started: float
    headers: dict[str, str]
    id: str = ""
    settled: bool = False


# --- the admission journal's lines ---------------------------------------------------------


class _Header(msgspec.Struct, tag="h", tag_field="t"):
    epoch: str
    boot: str
    clean: bool = False  # written at shutdown once everything was settled and written


class _Admitted(msgspec.Struct, tag="a", tag_field="t"):
    id: str
    org: str
    user: str
    key_id: str | None
    model: str
    month: str
    reserved: int
    zero: bool  # a `zero`-logging org: budget counters only, no usage row


class _Settled(msgspec.Struct, tag="s", tag_field="t"):
    seq: int
    id: str
    org: str
    month: str
    tokens: int
    record: UsageRecord | None  # None for `zero`-logging orgs


_LINE = msgspec.json.Decoder(_Header | _Admitted | _Settled)
_ENCODE = msgspec.json.encode


def _reset(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


@dataclass(slots=True)
class _Batch:
    """Usage to write in one transaction, with the journal mark it covers."""

    records: list[UsageRecord]
    totals: dict[tuple[str, str], int]
    last_used: dict[str, str]
    mark: tuple[str, int]


class Gate:
    def __init__(
        self,
        store: TenancyStore,
        *,
        region: str,
        node: str,
        monotonic: Monotonic = time.monotonic,
        budget_lease_s: float = LEASE_S,
    ) -> None:
        self._store = store
        self._region = region
        self._node = node
        self._monotonic = monotonic
        self._buckets: dict[str, KeyBuckets] = {}
        self._used: dict[tuple[str, str], int] = {}
        self._reserved: dict[tuple[str, str], int] = {}
        self._loaded_months: set[str] = set()
        self._pending: list[UsageRecord] = []
        self._totals: dict[tuple[str, str], int] = {}
        self._last_used: dict[str, str] = {}
        self._batches: list[_Batch] = []  # made, not yet written: oldest first
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        home = store.path.parent
        # Each router sharing a store keeps its own journal and mark in it.
        self._mark_name = f"admissions/{node}" if store.shared else "admissions"
        self.slices = (
            BudgetSlices(store.database, node, lease_s=budget_lease_s) if store.shared else None
        )
        self._journal = Journal(home / "admissions.journal")
        self._leases = LeaseBook(home / "budget.leases")
        self._epoch = ""
        self._seq = 0  # the last settle line's number in this epoch
        self._open: dict[str, _Admitted] = {}  # admitted, not settled: carried on rotation
        self._unflushed: list[_Settled] = []  # settled, not yet in policy.db
        # The router's seam for the offline edge: tokens its nodes hold in leased shares
        # count as reserved here, so this gate and every node together stay in budget.
        self.held_by_leases: Held = lambda _org, _month: 0
        # The router's seam for a shared store: how many routers enforce each key's rate
        # limits together (each enforces its share). Read at every admission: keep it cheap.
        self.rate_share: Callable[[], int] = lambda: 1

    async def start(self) -> None:
        """Settle what a killed predecessor left in the journal, then start a new one."""
        await self.recover()
        await self._load_month(month_of(self._store.clock()))
        if self.slices is not None:
            await self.slices.start(self._in_flight)
        self._flusher = asyncio.create_task(self._flush_forever())

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        try:
            await self.flush()
        finally:
            if self.slices is not None:
                await self.slices.stop()
        if self._epoch and not self._open:  # nothing left to recover, whatever happens next
            clean = _Header(self._epoch, boot_id(), clean=True)
            self._journal.start([_ENCODE(clean)], durable=True)
        self._journal.close()

    async def _load_month(self, month: str) -> None:
        for org, used in (await self._store.month_usage(month)).items():
            self._used[(org, month)] = used
        self._loaded_months.add(month)

    # --- admission ------------------------------------------------------------------------

    def admit(
        self,
        principal: Principal,
        estimate: int,
        *,
        request_id: str | None = None,
        model: str = "-",
    ) -> Admission:
        """Take one request and `estimate` tokens from the key's limits and org's budget.

        The admission is journaled under `request_id` (made up when not given), which its
        usage record, its audit row and its `x-request-id` header carry.
        """
        now_wall = self._store.clock()
        month = month_of(now_wall)
        if month not in self._loaded_months:
            self._loaded_months.add(month)  # a new month starts from zero
        buckets = self._buckets_for(principal.key_id)
        now = self._monotonic()
        for bucket in (buckets.requests, buckets.tokens):
            if bucket is not None:
                bucket.refill(now)
        check_rate(buckets, estimate)
        request_id = request_id or f"req-{os.urandom(12).hex()}"
        line = _Admitted(
            request_id,
            principal.org,
            principal.user,
            principal.key_id,
            model,
            month,
            estimate,
            principal.logging_mode == "zero",
        )
        try:  # both before anything is taken: a disk that refuses them refuses the request
            self._check_budget(principal.org, month, estimate, now_wall)
            self._journal.append(_ENCODE(line))
        except OSError as exc:
            raise _unrecordable(exc) from exc
        self._open[request_id] = line
        if buckets.requests is not None:
            buckets.requests.level -= 1
        if buckets.tokens is not None:
            buckets.tokens.level -= estimate
        slot = (principal.org, month)
        self._reserved[slot] = self._reserved.get(slot, 0) + estimate
        headers = rate_headers(buckets)
        headers[REQUEST_ID_HEADER] = request_id
        return Admission(principal, month, estimate, now, headers, request_id)

    async def admit_async(
        self,
        principal: Principal,
        estimate: int,
        *,
        request_id: str | None = None,
        model: str = "-",
    ) -> Admission:
        """`admit`; on a shared store, first topping up the org's budget slice if it lacks
        room for `estimate`."""
        if self.slices is not None:
            record = self._store.orgs.get(principal.org)
            if record is not None and record.budget_tokens is not None:
                slot = (principal.org, month_of(self._store.clock()))
                await self.slices.ensure(slot, self._in_flight, estimate, record.budget_tokens)
        return self.admit(principal, estimate, request_id=request_id, model=model)

    def _in_flight(self, slot: tuple[str, str]) -> int:
        return self._reserved.get(slot, 0)

    def _buckets_for(self, key_id: str | None) -> KeyBuckets:
        record = self._store.keys.get(key_id) if key_id else None
        limits = record.limits if record is not None else KeyLimits()
        share = max(1, self.rate_share())
        current = self._buckets.get(key_id or "")
        if current is not None and current.limits == limits and current.share == share:
            return current
        if current is not None and current.limits == limits:
            fresh = current.reshared(share, self._monotonic())
        else:
            fresh = KeyBuckets.of(limits, self._monotonic(), share)
        self._buckets[key_id or ""] = fresh
        return fresh

    def _check_budget(self, org: str, month: str, estimate: int, now: datetime) -> None:
        record = self._store.orgs.get(org)
        limit = record.budget_tokens if record is not None else None
        if limit is None:
            return
        if self.slices is not None:
            self.slices.check((org, month), self._in_flight((org, month)), estimate, limit, now)
            return
        committed = self.committed(org, month)
        if committed + estimate > limit:
            raise budget_exceeded(org, limit, estimate, now)
        self._leases.cover(org, month, committed + estimate, limit)

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
        cached_tokens: int = 0,
    ) -> None:
        """Release the reservation, charge the real count and queue one usage record.

        `region` and `node` name where the request ran when that is not this server (the
        router meters requests its appliances served). `cached_tokens` of the input tokens
        came from a prompt cache: recorded (and priced by `cost`), counted like any other
        token by limits and budgets.
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
        if self.slices is not None:
            self.slices.settled(slot, actual)
        at = iso(self._store.clock())
        if principal.key_id:
            self._last_used[principal.key_id] = at
        record = None
        if principal.logging_mode != "zero":  # zero logging: the counters, no per-request row
            record = UsageRecord(
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
                request_id=admission.id or None,
                cached_tokens=cached_tokens,
            )
            self._pending.append(record)
        self._journal_settlement(admission, actual, record)
        self._wake_if_full()

    def _journal_settlement(
        self, admission: Admission, tokens: int, record: UsageRecord | None
    ) -> None:
        self._seq += 1
        org = admission.principal.org
        line = _Settled(self._seq, admission.id, org, admission.month, tokens, record)
        try:
            self._journal.append(_ENCODE(line))
        except OSError:  # the books in memory are right; only a crash before the flush loses it
            log.exception("the admission journal could not record settling %s", admission.id)
        self._open.pop(admission.id, None)
        self._unflushed.append(line)

    def _wake_if_full(self) -> None:
        if len(self._pending) >= _FLUSH_BATCH or len(self._totals) >= _FLUSH_BATCH:
            self._wakeup.set()

    def committed(self, org: str, month: str) -> int:
        """Tokens used, reserved by requests in flight, or held by nodes' leases."""
        slot = (org, month)
        held = self.held_by_leases(org, month)
        return self._used.get(slot, 0) + self._reserved.get(slot, 0) + held

    def absorb(self, org: str, month: str, tokens: int) -> None:
        """Count tokens a node used and the store has already written (its usage report)."""
        self._used[(org, month)] = self._used.get((org, month), 0) + tokens

    def budget_state(self, org: str) -> tuple[str, int, int]:
        """The month, tokens used, and reserved (in flight or held by nodes' leases)."""
        month = month_of(self._store.clock())
        reserved = self._reserved.get((org, month), 0) + self.held_by_leases(org, month)
        return month, self._used.get((org, month), 0), reserved

    def budget_use(self) -> dict[str, float]:
        """Each org with a monthly budget: the share of it used this month (settled tokens;
        those reserved by requests in flight or held by nodes' leases are not used yet)."""
        month = month_of(self._store.clock())
        use = {}
        for org, record in self._store.orgs.items():
            if record.budget_tokens:
                use[org] = self._used.get((org, month), 0) / record.budget_tokens
        return use

    async def flush(self) -> None:
        async with self._flushing:  # one at a time: each commits the journal mark it covers
            await self._flush()

    async def _flush(self) -> None:
        if self._pending or self._totals:
            if self._journal.size > _ROTATE_BYTES and not self._batches:
                self._rotate(self._unflushed)  # the mark below then covers exactly them
            batch = _Batch(self._pending, self._totals, self._last_used, (self._epoch, self._seq))
            self._pending, self._totals, self._last_used, self._unflushed = [], {}, {}, []
            self._batches.append(batch)
        while self._batches:  # nothing accepted is lost: a batch not written is retried
            batch = self._batches[0]
            slices = self.slices.written_sql(batch.totals) if self.slices is not None else None
            await self._store.write_usage(
                batch.records,
                batch.totals,
                batch.last_used,
                mark=batch.mark,
                journal=self._mark_name,
                slices=slices,
            )
            self._batches.pop(0)
            if self.slices is not None:
                self.slices.written(batch.totals)

    def _rotate(self, unflushed: list[_Settled]) -> list[_Settled]:
        """A new epoch holding only what is still open and the settlements about to be
        written (renumbered, so this flush's mark covers exactly them)."""
        self._epoch = journal_epoch()
        renumbered = [msgspec.structs.replace(line, seq=n + 1) for n, line in enumerate(unflushed)]
        self._seq = len(renumbered)
        header = _Header(self._epoch, boot_id())
        opened = [_ENCODE(line) for line in self._open.values()]
        self._journal.start([_ENCODE(header), *opened, *(_ENCODE(line) for line in renumbered)])
        return renumbered

    # --- recovery -----------------------------------------------------------------------------

    async def recover(self) -> list[Recovered]:
        """Settle what the journal holds and the database does not, then start a new epoch.

        Settled requests whose usage was not yet written are written as settled; admitted
        ones that never settled are charged their reservation with status `interrupted`.
        After a reboot (another boot id: the journal may have lost its tail) each org is
        also charged up to its lease. Everything lands in one transaction with the mark
        that says this journal is done, so recovering twice never counts a request twice.
        """
        lines = self._journal.read()
        recovered: list[Recovered] = []
        header, entries = _parse(lines or [])
        if (lines is not None or self._leases.leases) and not (header and header.clean):
            epoch = header.epoch if header is not None else ""
            flushed = await self._store.journal_mark(epoch, self._mark_name) if epoch else 0
            recovered = self._outstanding(entries, flushed)
            if header is None or header.boot != boot_id():
                recovered += await self._lease_charges(recovered, epoch)
            await self._store.recover_usage(
                recovered, mark=(epoch, 2**62) if epoch else None, journal=self._mark_name
            )
            if recovered:
                log.warning(
                    "recovered %d requests from the admission journal (%d interrupted)",
                    len(recovered),
                    sum(1 for r in recovered if r.status == INTERRUPTED),
                )
        self._epoch, self._seq = journal_epoch(), 0
        self._journal.start([_ENCODE(_Header(self._epoch, boot_id()))], durable=True)
        return recovered

    def _outstanding(self, entries: list[_Admitted | _Settled], flushed: int) -> list[Recovered]:
        admitted: dict[str, _Admitted] = {}
        settled: set[str] = set()
        found: list[Recovered] = []
        for entry in entries:
            if isinstance(entry, _Admitted):
                admitted[entry.id] = entry
                continue
            settled.add(entry.id)
            if entry.seq > flushed:
                status = entry.record.status if entry.record is not None else "ok"
                found.append(Recovered(entry.record, entry.org, entry.month, entry.tokens, status))
        for request_id, entry in admitted.items():
            if request_id not in settled:
                found.append(self._interrupted(entry))
        return found

    def _interrupted(self, entry: _Admitted) -> Recovered:
        """Charged at its reservation (what it streamed is not known here), settled now."""
        record = None
        if not entry.zero:
            record = UsageRecord(
                at=iso(self._store.clock()),
                org=entry.org,
                user_id=entry.user,
                key_id=entry.key_id,
                model=entry.model,
                region=self._region,
                node=self._node,
                input_tokens=entry.reserved,
                output_tokens=0,
                latency_ms=0.0,
                status=INTERRUPTED,
                cost=0.0,
                request_id=entry.id,
            )
        return Recovered(record, entry.org, entry.month, entry.reserved, INTERRUPTED)

    async def _lease_charges(self, recovered: list[Recovered], epoch: str) -> list[Recovered]:
        """After a reboot, charge each org up to its lease (capped by its budget)."""
        found = []
        for (org, month), lease in sorted(self._leases.leases.items()):
            record = self._store.orgs.get(org)
            limit = record.budget_tokens if record is not None else None
            if limit is None:
                continue  # no budget (any more): nothing to keep it under
            target = min(lease, limit)
            used = (await self._store.month_usage(month)).get(org, 0)
            used += sum(r.tokens for r in recovered if (r.org, r.month) == (org, month))
            if used >= target:
                continue
            usage = UsageRecord(
                at=iso(self._store.clock()),
                org=org,
                user_id="-",
                key_id=None,
                model="-",
                region=self._region,
                node=self._node,
                input_tokens=target - used,
                output_tokens=0,
                latency_ms=0.0,
                status=INTERRUPTED,
                cost=0.0,
                request_id=f"lease-{epoch or journal_epoch()}-{org}-{month}",
            )
            found.append(Recovered(usage, org, month, target - used, INTERRUPTED))
        return found

    async def refresh_used(self) -> None:
        """On a shared store, the month's used tokens as the database holds them (every
        router's written usage) plus this router's not yet written: what budget reports and
        the budget-use gauge show. Admission never reads them there (slices do)."""
        month = month_of(self._store.clock())
        # Counted before the read: a batch written meanwhile is then counted twice until
        # the next refresh, never missed.
        pending: dict[tuple[str, str], int] = dict(self._totals)
        for batch in self._batches:
            for slot, tokens in batch.totals.items():
                pending[slot] = pending.get(slot, 0) + tokens
        written = await self._store.month_usage(month)
        for org in set(written) | {org for org, m in pending if m == month}:
            self._used[(org, month)] = written.get(org, 0) + pending.get((org, month), 0)

    async def _flush_forever(self) -> None:
        rounds = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), _FLUSH_SECONDS)
            self._wakeup.clear()
            rounds += 1
            if self.slices is not None and rounds % _REFRESH_ROUNDS == 0:
                try:
                    await self.refresh_used()
                except StoreError as exc:
                    log.warning("could not read the month's usage: %s", exc)
            try:
                await self.flush()
            except Exception:
                log.exception("writing usage records failed; they will be retried")


def check_rate(buckets: KeyBuckets, estimate: int) -> None:
    if buckets.requests is not None and buckets.requests.level < 1:
        wait = buckets.requests.wait_for(1)
        raise RateLimitError(
            f"Rate limit reached: {buckets.limits.requests_per_minute} requests per minute "
            f"for this key. Retry in {math.ceil(wait)} s.",
            retry_after=max(1, math.ceil(wait)),
        )
    if buckets.tokens is not None and buckets.tokens.level < buckets.tokens.needs(estimate):
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


def rate_headers(buckets: KeyBuckets) -> dict[str, str]:
    headers: dict[str, str] = {}
    for kind, bucket, limit in (
        ("requests", buckets.requests, buckets.limits.requests_per_minute),
        ("tokens", buckets.tokens, buckets.limits.tokens_per_minute),
    ):
        if bucket is not None and limit is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(max(1, limit // buckets.share))
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
            headers[f"x-ratelimit-reset-{kind}"] = _reset(bucket.until_full())
    return headers


def _unrecordable(exc: OSError) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        f"This server cannot record admissions right now ({exc.strerror or exc}); retry "
        "shortly. Its operator should check the disk that holds its state directory.",
        code="journal_unavailable",
        retry_after=5,
    )


def _parse(lines: list[bytes]) -> tuple[_Header | None, list[_Admitted | _Settled]]:
    """The header and entries; a line that does not decode (torn by a power cut) is skipped."""
    header: _Header | None = None
    entries: list[_Admitted | _Settled] = []
    for line in lines:
        try:
            entry = _LINE.decode(line)
        except msgspec.DecodeError:
            continue
        if isinstance(entry, _Header):
            header = header or entry
        else:
            entries.append(entry)
    return header, entries
