"""Wire schema of the offline edge: budget-share leases and usage reconciliation.

An enrolled appliance admits fleet keys itself (from its policy snapshot), so it must not
spend more of an org's monthly budget than the router set aside for it: it leases a share
(`POST /federation/v1/lease`) while online and spends only that, online or offline. What
it served goes back as rows (`POST /federation/v1/usage`), each with the id of the request
it admitted; the router counts each id once, whatever the node sends again, and answers
with the ids it holds, which the node then forgets. Both routes take the node's identity
from its client certificate, never from the body, and hold a node to its certified region:
it leases only for orgs allowed there, and a row counts only for an org that was allowed
there during the row's month or for which the router granted the node a share that month
(see `EdgeLeases.report`); the rest are refused, named in the answer.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from federation._private.admin_wire import UsageRecord

MAX_LEASE_TOKENS = 10**12
MAX_USAGE_ROWS = 1000  # per report: a node with more sends several

RecordId = Annotated[str, Meta(min_length=1, max_length=128)]
Month = Annotated[str, Meta(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")]  # YYYY-MM, a real month


class LeaseRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """A node asks for `tokens` more of `org`'s budget for the router's current month."""

    org: Annotated[str, Meta(min_length=1, max_length=128)]
    tokens: Annotated[int, Meta(ge=1, le=MAX_LEASE_TOKENS)]


class LeaseGrant(Struct, kw_only=True):
    """What the router set aside: `granted` now, `total` for the node and month in all
    (`None`: the org has no budget, so the node needs no share)."""

    org: str
    month: str
    granted: int
    total: int | None


class EdgeRow(Struct, kw_only=True, forbid_unknown_fields=True):
    """One request a node admitted and settled (or, after a crash, charged `interrupted`).

    `tokens` is what it counts against the org's month; `record` its usage row (None for
    `zero`-logging orgs: counters only) and `audit` its audit row (None when not kept).
    """

    id: RecordId
    org: Annotated[str, Meta(min_length=1, max_length=128)]
    month: Month
    tokens: Annotated[int, Meta(ge=0, le=MAX_LEASE_TOKENS)]
    status: Annotated[str, Meta(max_length=64)]
    record: UsageRecord | None = None
    audit: dict[str, Any] | None = None


class EdgeUsageReport(Struct, kw_only=True, forbid_unknown_fields=True):
    rows: Annotated[list[EdgeRow], Meta(max_length=MAX_USAGE_ROWS)]


class EdgeRefusal(Struct, kw_only=True):
    """A row the router will never count, and why (`code`: `org_not_found`,
    `residency_violation`, `month_not_started`)."""

    id: str
    code: str


class EdgeUsageAck(Struct, kw_only=True):
    """The ids of the report the node may forget: the rows the router now holds (counted now
    or before) and those it refused, which `refused` names again with the reason. An
    appliance that predates `refused` forgets them all the same, so it stops resending."""

    ids: list[str]
    refused: list[EdgeRefusal] = msgspec.field(default_factory=list)


LEASE_REQUEST_DECODER = msgspec.json.Decoder(LeaseRequest)
LEASE_GRANT_DECODER = msgspec.json.Decoder(LeaseGrant)
USAGE_REPORT_DECODER = msgspec.json.Decoder(EdgeUsageReport)
USAGE_ACK_DECODER = msgspec.json.Decoder(EdgeUsageAck)
