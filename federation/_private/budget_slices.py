"""Budget slices: how routers sharing one PostgreSQL store keep every org inside its budget.

A router never admits against the org's budget directly (another router may be spending
it at the same moment). It reserves a **slice** of what is left, in one transaction that
holds the org's advisory lock, and admits against that slice locally, without awaiting,
as the single-router gate does. Two invariants hold:

- in the database: tokens used + every live slice ≤ the budget;
- in each router: tokens in flight + tokens settled but not yet written ≤ its slice.

When a router writes its usage, the same transaction moves those tokens from its slice into
the org's used tokens, so the sum never moves. Together the fleet can never admit beyond the
budget, whatever the concurrency and however many routers there are.

Slices adapt to the router's rate: a top-up asks for what the requests waiting lack plus
half a second of the org's recent token rate (at most half of what is free), so the
database is touched a few times a second per org, not once per request; a slice idle for
a second shrinks back to what is still in flight, freeing the rest for other routers.

A slice lives `lease_s` seconds after its holder last renewed it (by the database's clock:
routers' clocks may differ). The slices of a router that died are dropped by the next
top-up of that org or the next renewal of any live router (every fifth of the lease) after
they expire, so their tokens return within the lease time and a renewal interval. A
router that cannot reach the database keeps admitting within its slices until its own
deadline (80 % of the lease after its last renewal) and then refuses budgeted requests
(503 `store_unavailable`) rather than risk an overshoot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from federation._private.database import Database, StoreError, Transaction
from federation._private.errors import RateLimitError

log = logging.getLogger("palisade.federation.budget_slices")
Monotonic = Callable[[], float]
Slot = tuple[str, str]  # (org, month)
LEASE_S = 15.0
SHARE = 0.5  # of what is free, at most, for a slice's headroom
_HEADROOM_S = 0.5  # a slice holds this long of the org's recent rate
_IDLE_S = 1.0  # a slice unused this long shrinks to what is in flight
_RATE_HALF_LIFE_S = 2.0
_DEADLINE = 0.8  # of the lease: after this long without a renewal, the slice is not used
_NOW = "extract(epoch from clock_timestamp())"  # the database's clock, in seconds
# Statements with the clock above in them (a constant: nothing here comes from a caller).
_GRANT = (
    f"INSERT INTO budget_slices VALUES (?, ?, ?, ?, {_NOW} + ?) "  # noqa: S608
    "ON CONFLICT (org, month, holder) DO UPDATE SET "
    "granted = budget_slices.granted + excluded.granted, expires_at = excluded.expires_at "
    "RETURNING granted"
)
_EXPIRE = f"DELETE FROM budget_slices WHERE org = ? AND month = ? AND expires_at < {_NOW}"  # noqa: S608
_BOOKS = (
    "SELECT coalesce((SELECT used_tokens FROM budget_usage WHERE org = ? AND month = ?), 0), "
    "coalesce(sum(granted) FILTER (WHERE holder = ?), 0), "
    "coalesce(sum(granted) FILTER (WHERE holder <> ?), 0) "
    "FROM budget_slices WHERE org = ? AND month = ?"
)
_EXPIRE_ALL = f"DELETE FROM budget_slices WHERE expires_at < {_NOW}"  # noqa: S608
_RENEW = f"UPDATE budget_slices SET expires_at = {_NOW} + ? WHERE holder = ?"  # noqa: S608


@dataclass(slots=True)
class _Slice:
    granted: int = 0  # this router's slice, as the database holds it
    pending: int = 0  # settled here and not yet written: still inside `granted`
    wanted: int = 0  # tokens the requests waiting for a top-up need
    recent: float = 0.0  # tokens admitted here, each fading by half every half-life
    last_take: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def note(self, tokens: int, now: float) -> None:
        self.recent = self.recent * 0.5 ** ((now - self.last_take) / _RATE_HALF_LIFE_S) + tokens
        self.last_take = now

    def rate(self, now: float) -> float:
        """Tokens a second lately: a fading sum over its mean age (half-life / ln 2)."""
        faded: float = self.recent * 0.5 ** ((now - self.last_take) / _RATE_HALF_LIFE_S)
        return faded * math.log(2) / _RATE_HALF_LIFE_S


class BudgetSlices:
    """This router's slices of the orgs' budgets in a shared store."""

    def __init__(
        self,
        db: Database,
        holder: str,
        *,
        lease_s: float = LEASE_S,
        monotonic: Monotonic = time.monotonic,
    ) -> None:
        self._db = db
        self.holder = holder
        self.lease_s = lease_s
        self._monotonic = monotonic
        self._slices: dict[Slot, _Slice] = {}
        self._deadline = 0.0  # monotonic: slices are usable until then
        self._renewer: asyncio.Task[None] | None = None
        self.top_ups = 0  # database transactions that reserved tokens (for the tests)

    async def start(self, in_flight: Callable[[Slot], int]) -> None:
        """Drop whatever a predecessor under this holder's name left, then renew forever."""
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM budget_slices WHERE holder = ?", (self.holder,))
        self._deadline = self._monotonic() + self.lease_s * _DEADLINE
        self._renewer = asyncio.create_task(self._renew_forever(in_flight))

    async def stop(self) -> None:
        """Give every slice back (after the last usage was written)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        try:
            async with self._db.transaction() as tx:
                await tx.execute("DELETE FROM budget_slices WHERE holder = ?", (self.holder,))
        except StoreError as exc:
            log.warning("could not give back the budget slices (they expire): %s", exc)
        self._slices.clear()

    # --- admission, on the event loop, never awaiting ------------------------------------

    def room(self, slot: Slot, in_flight: int) -> int:
        """Tokens this router may still admit for `slot` (0 past its deadline)."""
        if self._monotonic() > self._deadline:
            return 0
        held = self._slices.get(slot)
        if held is None:
            return 0
        return held.granted - held.pending - in_flight

    def check(self, slot: Slot, in_flight: int, estimate: int, limit: int, now: datetime) -> None:
        """Raise unless `estimate` more tokens fit in this router's slice of `slot`."""
        if self.room(slot, in_flight) >= estimate:
            held = self._slices[slot]
            held.note(estimate, self._monotonic())
            return
        if self._monotonic() > self._deadline:
            raise StoreError(
                "This router cannot reach its policy database to reserve budget; retry "
                "shortly (another router may serve it).",
                code="store_unavailable",
            )
        raise budget_exceeded(slot[0], limit, estimate, now)

    def settled(self, slot: Slot, tokens: int) -> None:
        held = self._slices.get(slot)
        if held is not None:
            held.pending += tokens

    # --- top-ups, renewals and usage written ------------------------------------------

    async def ensure(
        self, slot: Slot, in_flight: Callable[[Slot], int], estimate: int, limit: int
    ) -> None:
        """Top up `slot`'s slice when `estimate` more tokens do not fit (one transaction
        for every request waiting at the time)."""
        if self.room(slot, in_flight(slot)) >= estimate:
            return
        held = self._slices.setdefault(slot, _Slice())
        held.wanted += estimate
        try:
            async with held.lock:
                lacking = held.wanted + held.pending + in_flight(slot) - held.granted
                if lacking > 0 or self._monotonic() > self._deadline:
                    headroom = math.ceil(held.rate(self._monotonic()) * _HEADROOM_S)
                    await self._top_up(slot, max(lacking, 0), headroom, limit)
        finally:
            held.wanted -= estimate

    async def _top_up(self, slot: Slot, lacking: int, headroom: int, limit: int) -> None:
        org, month = slot
        started = self._monotonic()
        async with self._db.transaction() as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"{org}/{month}",))
            await tx.execute(_EXPIRE, (org, month))
            # One statement, so one snapshot: a usage flush moves tokens from a slice into
            # used_tokens, and two reads could see the slice after it and used before it.
            row = await tx.fetchone(_BOOKS, (org, month, self.holder, self.holder, org, month))
            used, mine, others = (int(value) for value in row) if row is not None else (0, 0, 0)
            free = max(0, limit - used - others - mine)
            grant = min(free, lacking + min(headroom, math.floor(free * SHARE)))
            granted = await tx.fetchone(_GRANT, (org, month, self.holder, grant, self.lease_s))
        # Added to what this router holds now, not set to what the database returned: a
        # flush of this router that committed after this transaction took its tokens out
        # of the slice, and has already taken them out here too. Never above the database's
        # figure (it is lower if the slice had expired and was dropped meanwhile).
        held = self._slices[slot]
        held.granted = min(held.granted + grant, int(granted[0]) if granted else grant)
        self._deadline = max(self._deadline, started + self.lease_s * _DEADLINE)
        self.top_ups += 1

    def written_sql(self, totals: dict[Slot, int]) -> Callable[[Transaction], Awaitable[None]]:
        """What the usage flush's transaction does: move written tokens out of the slices
        (into the orgs' used tokens, which the same transaction adds)."""
        moved = [
            (tokens, tokens, org, month, self.holder)
            for (org, month), tokens in totals.items()
            if (org, month) in self._slices
        ]

        async def move(tx: Transaction) -> None:
            await tx.executemany(
                "UPDATE budget_slices SET granted = CASE WHEN granted > ? THEN granted - ? "
                "ELSE 0 END WHERE org = ? AND month = ? AND holder = ?",
                moved,
            )

        return move

    def written(self, totals: dict[Slot, int]) -> None:
        for slot, tokens in totals.items():
            held = self._slices.get(slot)
            if held is not None:
                held.granted = max(0, held.granted - tokens)
                held.pending = max(0, held.pending - tokens)

    async def _renew_forever(self, in_flight: Callable[[Slot], int]) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 5)
            try:
                await self.renew(in_flight)
            except StoreError as exc:
                log.warning("renewing the budget slices failed: %s", exc)

    async def renew(self, in_flight: Callable[[Slot], int]) -> None:
        """Extend every slice's lease; shrink the idle ones to what they still hold."""
        started = self._monotonic()
        shrink = [
            (slot, held.granted, held.pending + in_flight(slot))
            for slot, held in self._slices.items()
            if started - held.last_take > _IDLE_S
            and held.granted > held.pending + in_flight(slot)
            and not held.lock.locked()
        ]
        for slot, _, keep in shrink:  # at once: what is admitted meanwhile must fit in `keep`
            self._slices[slot].granted = keep
        async with self._db.transaction() as tx:
            for (org, month), was, keep in shrink:
                # Only if nothing changed it since (a top-up or a flush): never below what
                # another transaction has just counted on.
                await tx.execute(
                    "UPDATE budget_slices SET granted = ? WHERE org = ? AND month = ? "
                    "AND holder = ? AND granted = ?",
                    (keep, org, month, self.holder, was),
                )
            await tx.execute(_RENEW, (self.lease_s, self.holder))
            # Any router's expired slices, whatever the load: a dead router's tokens return
            # within the lease (and a renewal interval), not only at the next top-up.
            await tx.execute(_EXPIRE_ALL)
        self._deadline = started + self.lease_s * _DEADLINE


def seconds_to_next_month(now: datetime) -> int:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return max(1, math.ceil((datetime(year, month, 1, tzinfo=UTC) - now).total_seconds()))


def budget_exceeded(org: str, limit: int, estimate: int, now: datetime) -> RateLimitError:
    return RateLimitError(
        f"Organization `{org}` has used its monthly budget of {limit} tokens (what is left "
        f"is reserved or in use; this request may need {estimate}). An org admin can raise "
        "it with `palisade budget set`.",
        code="budget_exceeded",
        retry_after=seconds_to_next_month(now),
    )
