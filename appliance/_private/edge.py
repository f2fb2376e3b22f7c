"""The offline edge: admission, budget shares and usage for fleet keys served by this node.

A fleet key (`pal-sk-…` authenticated from the policy snapshot, `Principal.via ==
FLEET_POLICY_VIA`) is admitted here, not by the router: the key's rate limits from the
snapshot (token buckets, as the router's gate keeps them), and the org's budget from the
share this node leased from the router (`POST /federation/v1/lease`). Online, a share that
runs low is topped up (before the request, when it is too small for it); offline, the share
is all there is (429 `budget_share_exhausted`), so the fleet as a whole never overshoots a
budget. Beyond the grace period (`[fleet] offline_grace_s`, default 24 h) since the router
was lost, fleet keys get 503 `policy_expired`: the snapshot may be stale by then.

Every admission and settlement is in the edge ledger first (`edge_ledger.py`); a sync task
sends the settled rows (`POST /federation/v1/usage`) and forgets those the router
acknowledges. The router counts each id once, so rows sent twice (a lost answer, a
SIGKILL) are counted once. Rows the router refuses (an org this node may not charge: see
`router/_private/leases.py`) are forgotten too, and logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
import msgspec

from appliance._private.edge_ledger import EdgeLedger
from federation import (
    ENCODER,
    FLEET_POLICY_VIA,
    INTERRUPTED,
    LEASE_GRANT_DECODER,
    REQUEST_ID_HEADER,
    USAGE_ACK_DECODER,
    Admission,
    EdgeRow,
    EdgeUsageAck,
    EdgeUsageReport,
    KeyBuckets,
    KeyLimits,
    LeaseGrant,
    LeaseRequest,
    PalisadeError,
    PolicySnapshot,
    Principal,
    RateLimitError,
    ServiceUnavailableError,
    UsageRecord,
    cancel_and_wait,
    iso,
    month_of,
)

log = logging.getLogger("palisade.appliance.edge")
DEFAULT_GRACE_S = 24 * 3600.0
SYNC_INTERVAL_S = 1.0
_BATCH = 200  # usage rows per report
_ASK_FRACTION = 8  # a lease asks for an eighth of the org's budget (or the request's need)


class PolicySource(Protocol):
    """Where the snapshot in force comes from (`PolicyBook`)."""

    @property
    def snapshot(self) -> PolicySnapshot | None: ...


class RouterLink(Protocol):
    """The router's edge routes (`HttpRouterLink` over the node's mTLS client)."""

    async def lease(self, org: str, tokens: int) -> LeaseGrant: ...

    async def report(self, rows: list[EdgeRow]) -> EdgeUsageAck: ...


class RouterUnreachableError(PalisadeError):
    """The router did not answer, or could not serve the request (5xx): the node is offline."""


class RouterRefusalError(PalisadeError):
    """The router answered, and refused (4xx): it is there, the request is wrong."""


class FleetChannel(Protocol):
    """The node's mTLS client to the router (`Membership`), None until it is enrolled."""

    @property
    def fleet_client(self) -> httpx.AsyncClient | None: ...

    @property
    def fleet_url(self) -> str | None: ...


class HttpRouterLink:
    def __init__(self, channel: FleetChannel) -> None:
        self._channel = channel

    async def _post(self, path: str, body: bytes) -> bytes:
        client, url = self._channel.fleet_client, self._channel.fleet_url
        if client is None or url is None:
            raise RouterUnreachableError("not enrolled in a fleet")
        try:
            response = await client.post(
                f"{url.rstrip('/')}{path}",
                content=body,
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise RouterUnreachableError(str(exc) or type(exc).__name__) from exc
        if response.status_code >= 500:
            raise RouterUnreachableError(f"HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code != 200:
            raise RouterRefusalError(f"HTTP {response.status_code}: {response.text[:300]}")
        return response.content

    async def lease(self, org: str, tokens: int) -> LeaseGrant:
        body = ENCODER.encode(LeaseRequest(org=org, tokens=tokens))
        return LEASE_GRANT_DECODER.decode(await self._post("/federation/v1/lease", body))

    async def report(self, rows: list[EdgeRow]) -> EdgeUsageAck:
        body = ENCODER.encode(EdgeUsageReport(rows=rows))
        return USAGE_ACK_DECODER.decode(await self._post("/federation/v1/usage", body))


def is_fleet_principal(principal: Principal) -> bool:
    return principal.via == FLEET_POLICY_VIA


class _Terms:
    """The snapshot's budgets and key limits, indexed once per snapshot."""

    def __init__(self, snapshot: PolicySnapshot | None) -> None:
        self.snapshot = snapshot
        orgs = snapshot.orgs if snapshot is not None else []
        keys = snapshot.keys if snapshot is not None else []
        self.budgets = {org.name: org.budget_tokens for org in orgs}
        self.limits = {key.key_id: key.limits for key in keys}


class EdgeGate:
    """Admission, budget shares, the ledger and the sync task for fleet keys."""

    def __init__(
        self,
        ledger: EdgeLedger,
        link: RouterLink,
        policy: PolicySource,
        *,
        region: str,
        node: str,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self._link = link
        self._policy = policy
        self._region = region
        self._node = node
        self.grace_s = grace_s
        self._clock = clock
        self._monotonic = monotonic
        self._terms = _Terms(None)
        self._buckets: dict[str, KeyBuckets] = {}
        self._leasing: dict[str, asyncio.Lock] = {}
        self._top_ups: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False  # no more leases: the router's client is closing
        self._wakeup = asyncio.Event()
        # Sent in heartbeats after a reconnect until the outage's rows are reconciled.
        self.outage_since: float | None = None

    @property
    def offline_since(self) -> float | None:
        return self.ledger.offline_since

    def offline_since_iso(self) -> str | None:
        since = self.ledger.offline_since
        return _iso(since) if since is not None else None

    def reported_offline_since(self) -> float | None:
        """What heartbeats say: the outage in progress, or the last one until its rows are in."""
        return self.ledger.offline_since or self.outage_since

    async def start(self) -> None:
        self.ledger.start()
        self.outage_since = self.ledger.offline_since
        self._task = asyncio.create_task(self._sync_forever())

    async def stop(self) -> None:
        """Stop talking to the router (before its client closes); `close` after the engines."""
        self._stopped = True
        await cancel_and_wait(*self._top_ups, self._task)
        self._task = None

    def close(self) -> None:
        """Compact the ledger once nothing can settle any more; what is not yet reconciled
        is sent after the next start."""
        self.ledger.stop()

    # --- admission ------------------------------------------------------------------------

    def _current_terms(self) -> _Terms:
        snapshot = self._policy.snapshot
        if snapshot is not self._terms.snapshot:
            self._terms = _Terms(snapshot)
        return self._terms

    def _budget(self, org: str) -> int | None:
        return self._current_terms().budgets.get(org)

    def _buckets_for(self, key_id: str | None) -> KeyBuckets:
        limits = self._current_terms().limits.get(key_id or "", KeyLimits())
        current = self._buckets.get(key_id or "")
        if current is not None and current.limits == limits:
            return current
        fresh = KeyBuckets.of(limits, self._monotonic())
        self._buckets[key_id or ""] = fresh
        return fresh

    def grace(self) -> float:
        """The offline grace period: this node's, or the snapshot's if the router set a
        shorter one (either side may only make it stricter)."""
        snapshot = self._policy.snapshot
        return min(self.grace_s, snapshot.grace_s) if snapshot is not None else self.grace_s

    def check_grace(self) -> None:
        since = self.ledger.offline_since
        grace = self.grace()
        if since is None or self._clock() - since <= grace:
            return
        raise ServiceUnavailableError(
            f"This appliance has not reached its router since {_iso(since)}, longer than its "
            f"offline grace period ({_duration(grace)}), so it no longer serves fleet "
            "keys on a policy that old. Local keys still work; fleet keys work again once "
            "the router is back.",
            code="policy_expired",
            retry_after=60,
        )

    async def prepare(self, principal: Principal, estimate: int = 1) -> None:
        """Online, lease more of the org's budget first when the share is running low or
        too small for `estimate` (a request should not fail for a share the router would
        grant). Offline, or when the router refuses, the share stays as it is."""
        budget = self._budget(principal.org)
        if budget is None or self.ledger.offline_since is not None or self._stopped:
            return
        ask = max(estimate, budget // _ASK_FRACTION)
        slot = (principal.org, month_of(datetime.fromtimestamp(self._clock(), UTC)))
        if self.ledger.books.left(slot) >= max(estimate, ask // 4):
            return
        with contextlib.suppress(RouterUnreachableError, RouterRefusalError):
            await self._lease(principal.org, ask)

    def admit(
        self,
        principal: Principal,
        estimate: int,
        *,
        request_id: str,
        model: str,
        audit: dict[str, Any] | None,
    ) -> Admission:
        """Rate limits and budget share for a fleet key; journaled before anything is taken."""
        self.check_grace()
        now = self._monotonic()
        month = month_of(datetime.fromtimestamp(self._clock(), UTC))
        buckets = self._buckets_for(principal.key_id)
        buckets.check(now, estimate)
        self._check_share(principal.org, month, estimate)
        row = self._row(
            principal,
            request_id,
            month,
            model=model,
            input_tokens=estimate,
            output_tokens=0,
            status=INTERRUPTED,
            audit=audit,
        )
        try:
            self.ledger.admit(request_id, estimate, row)
        except OSError as exc:
            raise ServiceUnavailableError(
                f"This appliance cannot record admissions right now ({exc.strerror or exc}); "
                "retry shortly. Its operator should check the disk of its state directory.",
                code="journal_unavailable",
                retry_after=5,
            ) from exc
        headers = buckets.take(estimate)
        headers[REQUEST_ID_HEADER] = request_id
        self._top_up_if_low(principal.org, month)
        return Admission(principal, month, estimate, now, headers, request_id)

    def _check_share(self, org: str, month: str, estimate: int) -> None:
        budget = self._budget(org)
        if budget is None:
            return
        left = self.ledger.books.left((org, month))
        if left >= estimate:
            return
        self._top_up_if_low(org, month)
        where = "offline: " if self.ledger.offline_since is not None else ""
        raise RateLimitError(
            f"This appliance's share of org `{org}`'s monthly budget is spent ({where}"
            f"{max(0, left)} tokens left here; this request may need {estimate}). "
            + (
                "It leases more once its router is reachable again."
                if self.ledger.offline_since is not None
                else "Retry shortly: it is asking its router for more."
            ),
            code="budget_share_exhausted",
            retry_after=60 if self.ledger.offline_since is not None else 1,
        )

    def settle(
        self,
        admission: Admission,
        *,
        model: str,
        input_tokens: int,
        output_tokens: int,
        status: str,
        cost: float,
        audit: dict[str, Any] | None,
        cached_tokens: int = 0,
    ) -> None:
        if admission.settled:
            return
        admission.settled = True
        principal = admission.principal
        used = input_tokens + output_tokens
        row = self._row(
            principal,
            admission.id,
            admission.month,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            status=status,
            audit=audit,
        )
        if row.record is not None:
            latency_ms = round((self._monotonic() - admission.started) * 1000, 3)
            row.record = msgspec.structs.replace(
                row.record, latency_ms=latency_ms, cost=cost, cached_tokens=cached_tokens
            )
        self.ledger.settle(row)
        self._buckets_for(principal.key_id).refund(admission.reserved - used)
        self._wakeup.set()

    def _row(
        self,
        principal: Principal,
        request_id: str,
        month: str,
        *,
        model: str,
        input_tokens: int,
        output_tokens: int,
        status: str,
        audit: dict[str, Any] | None,
    ) -> EdgeRow:
        record = None
        if principal.logging_mode == "zero":  # counters only: no usage row, no audit row
            audit = None
        else:
            record = UsageRecord(
                at=iso(datetime.fromtimestamp(self._clock(), UTC)),
                org=principal.org,
                user_id=principal.user,
                key_id=principal.key_id,
                model=model,
                region=self._region,
                node=self._node,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                latency_ms=0.0,
                status=status,
                cost=0.0,
                request_id=request_id,
            )
        return EdgeRow(
            id=request_id,
            org=principal.org,
            month=month,
            tokens=input_tokens + output_tokens,
            status=status,
            record=record,
            audit=audit,
        )

    # --- leases ---------------------------------------------------------------------------

    def _top_up_if_low(self, org: str, month: str) -> None:
        """Online, lease more in the background once less than a quarter of a lease is left."""
        budget = self._budget(org)
        if budget is None or self.ledger.offline_since is not None or self._stopped:
            return
        ask = max(1, budget // _ASK_FRACTION)
        if self.ledger.books.left((org, month)) >= ask // 4 or self._leasing_now(org):
            return
        task = asyncio.get_running_loop().create_task(self._quiet_lease(org, ask))
        self._top_ups.add(task)
        task.add_done_callback(self._top_ups.discard)

    def _leasing_now(self, org: str) -> bool:
        lock = self._leasing.get(org)
        return lock is not None and lock.locked()

    async def _quiet_lease(self, org: str, tokens: int) -> None:
        with contextlib.suppress(RouterUnreachableError, RouterRefusalError):
            await self._lease(org, tokens)

    async def _lease(self, org: str, tokens: int) -> None:
        lock = self._leasing.setdefault(org, asyncio.Lock())
        async with lock:
            try:
                grant = await self._link.lease(org, tokens)
            except RouterUnreachableError as exc:
                self._note_router(reachable=False, reason=str(exc))
                raise
            except RouterRefusalError as exc:
                self._note_router(reachable=True)
                log.warning("the router refused a budget share for org %s: %s", org, exc)
                raise
            self._note_router(reachable=True)
            if grant.total is not None:
                self.ledger.share(org, grant.month, grant.total)

    # --- reconciliation -------------------------------------------------------------------

    async def sync(self) -> int:
        """Send the unacknowledged rows; returns how many the router acknowledged."""
        acknowledged = 0
        while self.ledger.unacked:
            batch = list(self.ledger.unacked.values())[:_BATCH]
            try:
                ack = await self._link.report(batch)
            except RouterUnreachableError as exc:
                self._note_router(reachable=False, reason=str(exc))
                raise
            except RouterRefusalError:
                self._note_router(reachable=True)
                raise
            self._note_router(reachable=True)
            self._note_refused(batch, ack)
            self.ledger.acknowledged(ack.ids)
            acknowledged += len(ack.ids)
            if not set(ack.ids) & {row.id for row in batch}:
                break  # the router took none of them: try again at the next round
        if not self.ledger.unacked and self.ledger.offline_since is None:
            self.outage_since = None
        return acknowledged

    def _note_refused(self, batch: list[EdgeRow], ack: EdgeUsageAck) -> None:
        """Rows the router will never count (it names them in `ids` too, so they are
        forgotten and never sent again): logged once, here."""
        sent = {row.id: row for row in batch}
        refused = [(sent[r.id], r.code) for r in ack.refused if r.id in sent]
        if not refused:
            return
        log.warning(
            "the router refused %d usage rows (%s tokens) as rows this node may not charge: "
            "%s; they are dropped",
            len(refused),
            sum(row.tokens for row, _ in refused),
            sorted({f"{row.org}: {code}" for row, code in refused}),
        )

    async def _sync_forever(self) -> None:
        while True:
            try:
                if not await self.sync():  # nothing sent: an empty report says if it is there
                    await self.probe()
            except RouterUnreachableError:
                pass  # offline: noted once, tried again every second
            except RouterRefusalError as exc:
                log.warning("the router refused this node's usage report (%s); retrying", exc)
            except Exception:
                log.exception("reconciling usage with the router failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), SYNC_INTERVAL_S)
            self._wakeup.clear()

    async def probe(self) -> None:
        """An empty report: the cheapest way to learn that the router is back."""
        try:
            await self._link.report([])
        except RouterUnreachableError as exc:
            self._note_router(reachable=False, reason=str(exc))
            raise
        except RouterRefusalError:
            self._note_router(reachable=True)
            raise
        self._note_router(reachable=True)

    def _note_router(self, *, reachable: bool, reason: str = "") -> None:
        since = self.ledger.offline_since
        if reachable and since is not None:
            log.info("router reachable again; it was lost at %s", _iso(since))
            self.outage_since = since
            self.ledger.note_offline(None)
        elif not reachable and since is None:
            now = self._clock()
            log.warning("router unreachable (%s): serving fleet keys offline", reason)
            self.ledger.note_offline(now)
            self.outage_since = now


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{math.floor(seconds / 3600)} h"
    return f"{seconds:g} s"
