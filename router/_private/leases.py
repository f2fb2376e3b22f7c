"""Budget shares leased to nodes (the offline edge), counted against each org's budget.

An enrolled appliance admits fleet keys itself and must keep serving when the router is
gone, so it spends a share of the org's monthly budget that it leased beforehand. The
router grants at most `SHARE` of what is neither used, reserved by its own requests in
flight, nor already leased, and its gate counts every node's unspent share as reserved
(`Gate.held_by_leases`): router traffic plus every node's share never exceeds the budget,
even with every node offline. Usage a node reports converts its share into used tokens
(`TenancyStore.apply_edge_usage`: once per record id, in one transaction with the rows).

Grants and reports change the books in memory before they await the database, so on one
event loop no two grants can hand out the same tokens; a grant the database refuses is
taken back.

A node is held to its certified region. It gets a share only of an org allowed there now,
and a row it reports counts only for an org that was allowed there at some moment of the
row's month (`TenancyStore.served_in`, from the org's region history; or less than the
offline grace period before the month began: a node cut off from the router serves on its
last snapshot that long) or for which the router granted it a share for that month (which
it did only while the org was allowed there). An honest node's rows made before the org
left its region therefore still count, while a compromised node cannot charge orgs it could
never serve, nor a month that has not begun (beyond a day of clock skew). Refused rows
change nothing but one management audit event per report (`edge_usage_refused`); the
answer names them so the node forgets them.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

from compliance import Recorder
from federation import (
    DEFAULT_GRACE_S,
    EdgeLease,
    EdgeRefusal,
    EdgeRow,
    EdgeUsageAck,
    Gate,
    InvalidRequestError,
    LeaseGrant,
    NotFoundError,
    PeerIdentity,
    PermissionDeniedError,
    Recovered,
    RequestRecord,
    ServiceUnavailableError,
    TenancyStore,
    UsageRecord,
    month_of,
)

log = logging.getLogger("palisade.router.leases")
SHARE = 0.5  # of what is left of the budget, at most, per grant
_CLOCK_SKEW = timedelta(days=1)  # a node's clock may run ahead of the router's by this much
_AUDITED_NAMES = 10  # ids and orgs named in a refusal's audit event (it gives the counts)


def fair_share(limit: int, committed: int, asked: int) -> int:
    """What one grant may hand out: at most `SHARE` of what is left (at least one token
    while anything is left, so the last tokens are not stranded), never more than asked."""
    left = limit - committed
    if left <= 0:
        return 0
    return min(asked, max(1, math.floor(left * SHARE)))


@dataclass(slots=True)
class _Share:
    granted: int
    used: int

    @property
    def held(self) -> int:
        return max(0, self.granted - self.used)


class EdgeLeases:
    """Every node's leased shares, in memory and in the tenancy store."""

    def __init__(
        self,
        store: TenancyStore,
        gate: Gate,
        recorder: Recorder | None = None,
        *,
        grace_s: float = DEFAULT_GRACE_S,  # the longest a node serves on an old snapshot
    ) -> None:
        self._store = store
        self._gate = gate
        self._recorder = recorder
        self._grace_s = grace_s
        self._shares: dict[tuple[str, str, str], _Share] = {}  # (node, org, month)
        self._held: dict[tuple[str, str], int] = {}  # (org, month): all nodes' unspent shares

    async def start(self) -> None:
        """Load this month's shares and make the gate count them."""
        for lease in await self._store.edge_leases(month_of(self._store.clock())):
            self._shares[(lease.node, lease.org, lease.month)] = _Share(lease.granted, lease.used)
            self._recount(lease.org, lease.month)
        self._gate.held_by_leases = self.held

    def held(self, org: str, month: str) -> int:
        return self._held.get((org, month), 0)

    def shares(self) -> list[EdgeLease]:
        return [
            EdgeLease(node, org, month, share.granted, share.used)
            for (node, org, month), share in sorted(self._shares.items())
        ]

    def _recount(self, org: str, month: str) -> None:
        self._held[(org, month)] = sum(
            share.held for (_, o, m), share in self._shares.items() if (o, m) == (org, month)
        )

    # --- grants -------------------------------------------------------------------------------

    async def grant(self, node: PeerIdentity, org: str, asked: int) -> LeaseGrant:
        record = self._store.orgs.get(org)
        if record is None:
            raise NotFoundError(f"No org named `{org}`.", code="org_not_found")
        if node.region is None or node.region not in record.regions:
            raise PermissionDeniedError(
                f"Org `{org}` may not be served in region `{node.region}`, this node's "
                "certified region; it gets no share of the org's budget.",
                code="residency_violation",
            )
        month = month_of(self._store.clock())
        if record.budget_tokens is None:
            return LeaseGrant(org=org, month=month, granted=0, total=None)
        granted = fair_share(record.budget_tokens, self._gate.committed(org, month), asked)
        share = self._shares.setdefault((node.node_id, org, month), _Share(0, 0))
        if granted:
            share.granted += granted
            self._recount(org, month)
            try:
                await self._store.grant_edge_lease(node.node_id, org, month, granted)
            except Exception as exc:
                share.granted -= granted
                self._recount(org, month)
                log.exception("could not record a budget share for node %s", node.node_id)
                raise ServiceUnavailableError(
                    "The router could not record this budget share; retry shortly.",
                    code="lease_unavailable",
                    retry_after=5,
                ) from exc
        return LeaseGrant(org=org, month=month, granted=granted, total=share.granted)

    # --- usage reports ------------------------------------------------------------------------

    async def report(self, node: PeerIdentity, rows: list[EdgeRow]) -> EdgeUsageAck:
        """Count each row the node may charge once (by id), convert its share into used
        tokens, keep the audit rows; refuse the others (`_refusal`). The answer names every
        row of the report, held (counted now or before) or refused."""
        rows = list({row.id: row for row in rows}.values())
        refused = await self._refusals(node, rows)
        counted = [row for row in rows if row.id not in refused]
        entries = [(row.id, self._entry(node, row)) for row in counted]
        if refused:
            await self._audit_refusals(node, rows, refused)
        applied = await self._store.apply_edge_usage(node.node_id, entries)
        for row, (_, entry) in zip(counted, entries, strict=True):
            if row.id not in applied:
                continue
            self._gate.absorb(entry.org, entry.month, entry.tokens)
            share = self._shares.setdefault((node.node_id, entry.org, entry.month), _Share(0, 0))
            share.used += entry.tokens
            self._recount(entry.org, entry.month)
            self._audit(node, row)
        if applied:
            log.info("node %s reported %d requests served on its own", node.node_id, len(applied))
        return EdgeUsageAck(
            ids=[row.id for row in rows],
            refused=[EdgeRefusal(id=row_id, code=code) for row_id, code in refused.items()],
        )

    async def _refusals(self, node: PeerIdentity, rows: list[EdgeRow]) -> dict[str, str]:
        """The rows the node may not charge, by id, with the reason's code."""
        verdicts: dict[tuple[str, str], str | None] = {}
        refused: dict[str, str] = {}
        for row in rows:
            slot = (row.org, row.month)
            if slot not in verdicts:
                verdicts[slot] = await self._refusal(node, row.org, row.month)
            code = verdicts[slot]
            if code is not None:
                refused[row.id] = code
        return refused

    async def _refusal(self, node: PeerIdentity, org: str, month: str) -> str | None:
        """None if `node` may charge `org` for `month`: the org was allowed in the node's
        certified region during that month (or within the grace period before it), or the
        router granted the node a share of it for that month. Otherwise why not."""
        if org not in self._store.orgs:
            return "org_not_found"
        if month > month_of(self._store.clock() + _CLOCK_SKEW):
            return "month_not_started"  # it would spend a budget nobody has had yet
        region = node.region
        if region is not None and self._store.served_in(org, region, month, slack_s=self._grace_s):
            return None
        if await self._store.leased(node.node_id, org, month):
            return None
        return "residency_violation"

    async def _audit_refusals(
        self, node: PeerIdentity, rows: list[EdgeRow], refused: dict[str, str]
    ) -> None:
        """One management event per report, however many rows it refuses."""
        orgs = sorted({row.org for row in rows if row.id in refused})
        payload = {
            "node_id": node.node_id,
            "region": node.region,
            "rows": len(refused),
            "tokens": sum(row.tokens for row in rows if row.id in refused),
            "codes": dict(sorted(Counter(refused.values()).items())),
            "orgs": orgs[:_AUDITED_NAMES],
            "ids": sorted(refused)[:_AUDITED_NAMES],
        }
        await self._store.record_event("edge_usage_refused", f"node:{node.node_id}", None, payload)
        log.warning(
            "node %s (region %s) reported %d usage rows it may not charge (orgs %s): "
            "refused, not counted",
            node.node_id,
            node.region,
            len(refused),
            orgs[:_AUDITED_NAMES],  # a list's repr: names from a node cannot forge log lines
        )

    def _entry(self, node: PeerIdentity, row: EdgeRow) -> Recovered:
        """The row as the store counts it, attributed to the node its certificate names."""
        record: UsageRecord | None = None
        if row.record is not None:
            counts = (row.record.input_tokens, row.record.output_tokens)
            if min(counts) < 0 or sum(counts) != row.tokens:
                raise InvalidRequestError(
                    f"Usage row `{row.id}` counts {row.tokens} tokens, but its record has "
                    f"{counts[0]} input and {counts[1]} output tokens.",
                    code="invalid_usage_row",
                    param="rows",
                )
            record = UsageRecord(
                at=row.record.at,
                org=row.org,
                user_id=row.record.user_id,
                key_id=row.record.key_id,
                model=row.record.model,
                region=node.region or row.record.region,
                node=node.node_id,
                input_tokens=row.record.input_tokens,
                output_tokens=row.record.output_tokens,
                latency_ms=row.record.latency_ms,
                status=row.status,
                cost=row.record.cost,
                request_id=row.id,
                cached_tokens=min(max(row.record.cached_tokens, 0), row.record.input_tokens),
            )
        return Recovered(record, row.org, row.month, row.tokens, row.status)

    def _audit(self, node: PeerIdentity, row: EdgeRow) -> None:
        if self._recorder is None or row.audit is None:
            return
        org = self._store.orgs.get(row.org)
        mode = org.logging_mode if org is not None else "metadata"
        record = _edge_record(node, row)
        if record is not None:
            self._recorder.request(mode, record)


def _edge_record(node: PeerIdentity, row: EdgeRow) -> RequestRecord | None:
    """The router's audit row for a request a node admitted itself: what the router counted
    (the usage record), where the node's certificate says it ran, and what only the node's
    own audit row knows (the model version, who vouched). None without a usage record (a
    `zero`-logging org's row is counters only)."""
    usage, audit = row.record, row.audit or {}
    if usage is None:
        return None

    def text(name: str) -> str | None:
        value = audit.get(name)
        return value if isinstance(value, str) else None

    return RequestRecord(
        id=row.id,
        org=row.org,
        user=usage.user_id,
        key_id=usage.key_id,
        model=usage.model,
        region=node.region or usage.region,
        node=node.node_id,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        status=row.status,
        model_version=text("model_version"),
        via=text("via"),
        edge=True,
    )
