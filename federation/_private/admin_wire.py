"""Wire schema of the management API under /admin/v1 (msgspec Structs)."""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from msgspec import Meta, Struct, field

from federation._private.vocabulary import InvitedRole, LoggingMode

OrgName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
Region = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
Email = Annotated[str, Meta(pattern=r"^[^@\s]+@[^@\s]+$", max_length=254)]
# SQLite integers are signed 64-bit: bigger counts are refused with a 400, not a 500.
TokenCount = Annotated[int, Meta(ge=0, le=2**63 - 1)]
PerMinute = Annotated[int, Meta(ge=1, le=2**53)]
UsageGroup = Literal["model", "user", "region", "node", "day", "org", "key"]
T = TypeVar("T")


class OrgCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    name: OrgName
    regions: Annotated[list[Region], Meta(min_length=1)]
    budget_tokens: TokenCount | None = None
    logging_mode: LoggingMode = "metadata"


class InviteCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    """An org role names its `org`; the fleet-wide `auditor` names none."""

    email: Email
    role: InvitedRole
    org: OrgName | None = None


class Invite(Struct, kw_only=True):
    token: str
    email: str
    org: str | None
    role: str
    expires_at: str


class InviteAccept(Struct, forbid_unknown_fields=True, kw_only=True):
    token: Annotated[str, Meta(min_length=1, max_length=200)]
    key_name: Annotated[str, Meta(min_length=1, max_length=100)] = "default"


class User(Struct, kw_only=True):
    id: str
    email: str
    role: str
    org: str | None
    created_at: str


class KeyLimits(Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-key rate limits; `None` means unlimited. `burst` is the bucket depth."""

    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None
    burst: PerMinute | None = None


class Org(Struct, kw_only=True):
    name: str
    regions: list[str]
    budget_tokens: int | None
    logging_mode: str
    created_at: str
    # The ceiling, and the default, of the keys the org's members make.
    key_limits: KeyLimits = field(default_factory=KeyLimits)


class KeyCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    regions: list[Region] | None = None
    expires_in_days: Annotated[int, Meta(ge=1, le=3650)] | None = None
    limits: KeyLimits | None = None


class KeyInfo(Struct, kw_only=True):
    id: str
    name: str
    user_id: str
    org: str
    created_at: str
    last_used_at: str | None
    expires_at: str | None
    revoked_at: str | None
    regions: list[str] | None
    limits: KeyLimits


class CreatedKey(Struct, kw_only=True):
    """A new key: `key` is shown this once and never stored."""

    key: str
    info: KeyInfo


class BudgetSet(Struct, forbid_unknown_fields=True, kw_only=True):
    tokens: TokenCount | None


class Budget(Struct, kw_only=True):
    org: str
    month: str
    limit_tokens: int | None
    used_tokens: int
    reserved_tokens: int


class UsageRow(Struct, kw_only=True):
    group: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost: float
    # Of the input tokens, those served from a prompt cache.
    cached_tokens: int = 0


class UsageReport(Struct, kw_only=True):
    by: str
    rows: list[UsageRow]
    total: UsageRow


class UsageRecord(Struct, kw_only=True):
    at: str
    org: str
    user_id: str
    key_id: str | None
    model: str
    region: str
    node: str
    input_tokens: int
    output_tokens: int
    latency_ms: float
    status: str
    cost: float
    # The admitted request's id: also its audit row's and its `x-request-id` header's.
    request_id: str | None = None
    # Of the input tokens, those served from a prompt cache (they cost the model's
    # cached-input price, when it has one).
    cached_tokens: int = 0


class AuditEvent(Struct, kw_only=True):
    id: int
    at: str
    event: str
    actor: str
    org: str | None
    payload: dict[str, object]


class Listing(Struct, Generic[T], kw_only=True):
    data: list[T]
