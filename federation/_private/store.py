"""The tenancy policy store: orgs, users, API keys, invites, budgets, usage and audit events.

SQLite through aiosqlite. Orgs, users and keys are also held in memory, updated on every
write, so that authentication never waits for the database and a revoked key or a lowered
limit takes effect on the very next request.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import msgspec

from federation._private import keys as keylib
from federation._private.admin_wire import (
    AuditEvent,
    CreatedKey,
    Invite,
    InviteCreate,
    KeyCreate,
    KeyInfo,
    KeyLimits,
    Org,
    OrgCreate,
    UsageRecord,
    UsageReport,
    UsageRow,
    User,
)
from federation._private.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PalisadeError,
)
from federation._private.private_files import private_database
from federation._private.vocabulary import ORG_ROLES

Clock = Callable[[], datetime]
INVITE_TTL = timedelta(days=7)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orgs (
    name TEXT PRIMARY KEY, regions TEXT NOT NULL, budget_tokens INTEGER,
    logging_mode TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, role TEXT NOT NULL, org TEXT,
    created_at TEXT NOT NULL, removed_at TEXT);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, user_id TEXT NOT NULL, org TEXT NOT NULL,
    secret_hash BLOB NOT NULL, created_at TEXT NOT NULL, last_used_at TEXT, expires_at TEXT,
    revoked_at TEXT, regions TEXT, limits TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invites (
    token_hash BLOB PRIMARY KEY, email TEXT NOT NULL, org TEXT NOT NULL, role TEXT NOT NULL,
    invited_by TEXT NOT NULL, created_at TEXT NOT NULL, expires_at TEXT NOT NULL,
    accepted_at TEXT);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY, at TEXT NOT NULL, org TEXT NOT NULL, user_id TEXT NOT NULL,
    key_id TEXT, model TEXT NOT NULL, region TEXT NOT NULL, node TEXT NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, latency_ms REAL NOT NULL,
    status TEXT NOT NULL, cost REAL NOT NULL, request_id TEXT,
    cached_tokens INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS usage_org_at ON usage (org, at);
CREATE TABLE IF NOT EXISTS journal_marks (
    name TEXT PRIMARY KEY, epoch TEXT NOT NULL, settled_through INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS budget_usage (
    org TEXT NOT NULL, month TEXT NOT NULL, used_tokens INTEGER NOT NULL,
    PRIMARY KEY (org, month));
CREATE TABLE IF NOT EXISTS org_key_limits (
    org TEXT PRIMARY KEY, limits TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY, at TEXT NOT NULL, event TEXT NOT NULL, actor TEXT NOT NULL,
    org TEXT, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edge_leases (
    node TEXT NOT NULL, org TEXT NOT NULL, month TEXT NOT NULL, granted INTEGER NOT NULL,
    used INTEGER NOT NULL, PRIMARY KEY (node, org, month));
CREATE TABLE IF NOT EXISTS edge_records (
    id TEXT PRIMARY KEY, node TEXT NOT NULL, month TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS org_region_spans (
    org TEXT NOT NULL, region TEXT NOT NULL, since TEXT NOT NULL, until TEXT);
"""


class AuditSink(Protocol):
    """Where management events go. The store keeps them in its own table unless a node
    supplies a sink (the compliance package's tamper-evident log)."""

    async def record(
        self, event: str, actor: str, org: str | None, payload: dict[str, Any]
    ) -> None: ...

    async def events(self, org: str | None) -> list[AuditEvent]: ...


class StoreError(PalisadeError):
    """The policy database failed; the message says which operation."""


@dataclass(frozen=True, slots=True)
class OrgRecord:
    name: str
    regions: frozenset[str]
    budget_tokens: int | None
    logging_mode: str
    created_at: str
    key_limits: KeyLimits = field(default_factory=KeyLimits)


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: str
    email: str
    role: str
    org: str | None
    created_at: str
    removed_at: str | None = None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    user_id: str
    org: str
    secret_hash: bytes
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    regions: frozenset[str] | None
    limits: KeyLimits
    last_used_at: str | None = None

    def __repr__(self) -> str:
        return f"KeyRecord(id={self.id!r}, org={self.org!r}, user_id={self.user_id!r})"


@dataclass(frozen=True, slots=True)
class Recovered:
    """A request the admission journal held and the database did not, at start-up."""

    record: UsageRecord | None  # None for `zero`-logging orgs: counters only
    org: str
    month: str
    tokens: int
    status: str


@dataclass(frozen=True, slots=True)
class EdgeLease:
    """A node's share of an org's monthly budget: `granted` in all, `used` of it reported."""

    node: str
    org: str
    month: str
    granted: int
    used: int


@dataclass(frozen=True, slots=True)
class RegionSpan:
    """From `since` until `until` (None: still), `region` was one of an org's regions."""

    region: str
    since: str
    until: str | None

    def covers(self, month: str, slack_s: float = 0.0) -> bool:
        """Whether the span, its end `slack_s` later, overlaps `month` (`YYYY-MM`)."""
        if self.since[:7] > month:  # the times are UTC ISO 8601: they start with the month
            return False
        if self.until is None:
            return True
        return month <= month_of(datetime.fromisoformat(self.until) + timedelta(seconds=slack_s))


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated key with its user and org."""

    key: KeyRecord
    user: UserRecord
    org: OrgRecord


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def month_of(moment: datetime) -> str:
    """`YYYY-MM` in UTC (formatted by hand: `strftime` costs several times more, and every
    admission asks)."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return f"{moment.year}-{moment.month:02d}"


def _now() -> datetime:
    return datetime.now(UTC)


class TenancyStore:
    def __init__(
        self, db: aiosqlite.Connection, clock: Clock, sink: AuditSink | None = None
    ) -> None:
        self._db = db
        self.clock = clock
        self._sink = sink
        self.path = Path("policy.db")  # where `open` found it; journals live beside it
        self.orgs: dict[str, OrgRecord] = {}
        self.users: dict[str, UserRecord] = {}
        self.keys: dict[str, KeyRecord] = {}
        # Where each org could be served, and when: what a node's usage rows are held to.
        self.region_spans: dict[str, list[RegionSpan]] = {}
        # Bumped by every management change (in `_audit`), which then calls `on_change`.
        self.generation = 0
        self.on_change: list[Callable[[], None]] = []

    @classmethod
    async def open(
        cls, path: Path, *, clock: Clock = _now, sink: AuditSink | None = None
    ) -> TenancyStore:
        private_database(path)
        try:
            db = await aiosqlite.connect(path)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(_SCHEMA)
            await _add_request_ids(db)
            await _add_cached_tokens(db)
            await db.commit()
        except sqlite3.Error as exc:
            raise StoreError(f"Cannot open the policy database {path}: {exc}.") from exc
        store = cls(db, clock, sink)
        store.path = path
        await store._load()
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _load(self) -> None:
        async with self._db.execute("SELECT * FROM orgs") as rows:
            async for row in rows:
                self.orgs[row[0]] = OrgRecord(
                    row[0], frozenset(json.loads(row[1])), row[2], row[3], row[4]
                )
        async with self._db.execute("SELECT org, limits FROM org_key_limits") as rows:
            async for org, limits in rows:
                if org in self.orgs:
                    key_limits = msgspec.json.decode(limits, type=KeyLimits)
                    self.orgs[org] = replace(self.orgs[org], key_limits=key_limits)
        async with self._db.execute("SELECT * FROM users") as rows:
            async for row in rows:
                self.users[row[0]] = UserRecord(*row)
        async with self._db.execute(
            "SELECT id, name, user_id, org, secret_hash, created_at, expires_at, revoked_at, "
            "regions, limits, last_used_at FROM api_keys"
        ) as rows:
            async for row in rows:
                regions = frozenset(json.loads(row[8])) if row[8] is not None else None
                limits = msgspec.json.decode(row[9], type=KeyLimits)
                self.keys[row[0]] = KeyRecord(
                    row[0],
                    row[1],
                    row[2],
                    row[3],
                    bytes(row[4]),
                    row[5],
                    row[6],
                    row[7],
                    regions,
                    limits,
                    row[10],
                )
        await self._load_region_spans()

    async def _load_region_spans(self) -> None:
        """The region history; a region without an open span (a database made before the
        history was kept) is taken as allowed since its org was created."""
        async with self._db.execute(
            "SELECT org, region, since, until FROM org_region_spans ORDER BY rowid"
        ) as rows:
            async for org, region, since, until in rows:
                self.region_spans.setdefault(org, []).append(RegionSpan(region, since, until))
        for record in self.orgs.values():
            await self._open_spans(record.name, record.regions, record.created_at)
        await self._db.commit()

    async def _open_spans(self, org: str, regions: Iterable[str], since: str) -> None:
        spans = self.region_spans.setdefault(org, [])
        open_now = {span.region for span in spans if span.until is None}
        for region in sorted(set(regions) - open_now):
            await self._db.execute(
                "INSERT INTO org_region_spans VALUES (?, ?, ?, NULL)", (org, region, since)
            )
            spans.append(RegionSpan(region, since, None))

    async def _close_spans(self, org: str, regions: frozenset[str], until: str) -> None:
        """End the open spans of `org`'s regions not in `regions`."""
        spans = self.region_spans.setdefault(org, [])
        for index, span in enumerate(spans):
            if span.until is None and span.region not in regions:
                await self._db.execute(
                    "UPDATE org_region_spans SET until = ? WHERE org = ? AND region = ? "
                    "AND until IS NULL",
                    (until, org, span.region),
                )
                spans[index] = replace(span, until=until)

    def served_in(self, org: str, region: str, month: str, *, slack_s: float = 0.0) -> bool:
        """Whether `region` was one of `org`'s regions at some moment of `month`, or less
        than `slack_s` before it began."""
        return any(
            span.region == region and span.covers(month, slack_s)
            for span in self.region_spans.get(org, [])
        )

    # --- audit --------------------------------------------------------------------------

    async def _audit(
        self, event: str, actor: str, org: str | None, payload: dict[str, Any]
    ) -> None:
        """Record a management event before the change it describes is committed.

        With a sink, the event is durable in the audit log before the change commits, so a
        crash can leave a recorded attempt but never an unrecorded change.
        """
        if self._sink is not None:
            try:
                await self._sink.record(event, actor, org, payload)
            except BaseException:
                await self._db.rollback()  # no change may commit without its event
                raise
            self._changed()
            return
        await self._db.execute(
            "INSERT INTO audit_events (at, event, actor, org, payload) VALUES (?, ?, ?, ?, ?)",
            (iso(self.clock()), event, actor, org, json.dumps(payload, sort_keys=True)),
        )
        self._changed()

    def _changed(self) -> None:
        self.generation += 1
        for callback in self.on_change:
            callback()

    async def settled(self) -> None:
        """Return once every change already under way is committed and in memory.

        A change is announced (`_audit`) just before its transaction commits, and the
        in-memory records change right after the commit. aiosqlite runs a connection's
        operations in order and resolves them in order, so a query queued now completes
        after that commit, and the change's own continuation runs before ours.
        """
        async with self._db.execute("SELECT 1"):
            pass

    async def record_event(
        self, event: str, actor: str, org: str | None, payload: dict[str, Any]
    ) -> None:
        """Audit a management action taken outside the store (e.g. a model's pricing)."""
        await self._audit(event, actor, org, payload)
        await self._db.commit()

    async def audit_events(self, org: str | None) -> list[AuditEvent]:
        if self._sink is not None:
            return await self._sink.events(org)
        query = "SELECT id, at, event, actor, org, payload FROM audit_events"
        args: tuple[Any, ...] = ()
        if org is not None:
            query += " WHERE org = ?"
            args = (org,)
        async with self._db.execute(query + " ORDER BY id", args) as rows:
            return [
                AuditEvent(
                    id=r[0], at=r[1], event=r[2], actor=r[3], org=r[4], payload=json.loads(r[5])
                )
                async for r in rows
            ]

    # --- orgs and users -----------------------------------------------------------------

    async def bootstrap_admin(self) -> str | None:
        """Create the system admin and its key on first start; returns the key once."""
        if any(user.role == "system_admin" for user in self.users.values()):
            return None
        user = await self._insert_user("admin@local", "system_admin", None)
        key_text, record = await self._insert_key(user, "bootstrap", None, None, KeyLimits())
        await self._audit(
            "system_admin_created", "system", None, {"user_id": user.id, "key_id": record.id}
        )
        await self._db.commit()
        return key_text

    async def create_org(self, spec: OrgCreate, actor: str) -> Org:
        if spec.name in self.orgs:
            raise InvalidRequestError(
                f"Organization `{spec.name}` already exists.", code="org_exists", param="name"
            )
        record = OrgRecord(
            spec.name,
            frozenset(spec.regions),
            spec.budget_tokens,
            spec.logging_mode,
            iso(self.clock()),
        )
        await self._db.execute(
            "INSERT INTO orgs VALUES (?, ?, ?, ?, ?)",
            (
                record.name,
                json.dumps(sorted(record.regions)),
                record.budget_tokens,
                record.logging_mode,
                record.created_at,
            ),
        )
        try:
            await self._open_spans(record.name, record.regions, record.created_at)
            await self._audit("org_created", actor, spec.name, msgspec.to_builtins(spec))
            await self._db.commit()
        except BaseException:
            self.region_spans.pop(record.name, None)
            raise
        self.orgs[record.name] = record
        return org_view(record)

    def org(self, name: str) -> OrgRecord:
        record = self.orgs.get(name)
        if record is None:
            raise NotFoundError(
                f"Organization `{name}` does not exist.", code="org_not_found", param="org"
            )
        return record

    async def set_budget(self, name: str, tokens: int | None, actor: str) -> OrgRecord:
        record = replace(self.org(name), budget_tokens=tokens)
        await self._db.execute("UPDATE orgs SET budget_tokens = ? WHERE name = ?", (tokens, name))
        await self._audit("budget_changed", actor, name, {"budget_tokens": tokens})
        await self._db.commit()
        self.orgs[name] = record
        return record

    async def set_key_limits(self, name: str, limits: KeyLimits, actor: str) -> OrgRecord:
        """The org's default key limits: what its members' new keys get, and at most."""
        record = replace(self.org(name), key_limits=limits)
        await self._db.execute(
            "INSERT INTO org_key_limits VALUES (?, ?) ON CONFLICT(org) DO UPDATE SET "
            "limits = excluded.limits",
            (name, msgspec.json.encode(limits)),
        )
        await self._audit(
            "org_key_limits_changed", actor, name, {"limits": msgspec.to_builtins(limits)}
        )
        await self._db.commit()
        self.orgs[name] = record
        return record

    async def set_regions(self, name: str, regions: Iterable[str], actor: str) -> OrgRecord:
        """Change where an org's requests may run; its keys' own regions still narrow it."""
        record = replace(self.org(name), regions=frozenset(regions))
        text = json.dumps(sorted(record.regions))
        await self._db.execute("UPDATE orgs SET regions = ? WHERE name = ?", (text, name))
        spans = list(self.region_spans.get(name, []))
        try:
            now = iso(self.clock())
            await self._close_spans(name, record.regions, now)
            await self._open_spans(name, record.regions, now)
            await self._audit(
                "org_regions_changed", actor, name, {"regions": sorted(record.regions)}
            )
            await self._db.commit()
        except BaseException:
            self.region_spans[name] = spans  # the transaction is rolled back: so is the history
            raise
        self.orgs[name] = record
        return record

    async def _insert_user(self, email: str, role: str, org: str | None) -> UserRecord:
        if any(u.email == email and u.removed_at is None for u in self.users.values()):
            raise InvalidRequestError(
                f"A user with email {email} already exists.", code="user_exists", param="email"
            )
        user = UserRecord("usr_" + keylib.new_key()[1], email, role, org, iso(self.clock()))
        await self._db.execute(
            "INSERT INTO users VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(email) DO UPDATE SET "
            "id = excluded.id, role = excluded.role, org = excluded.org, "
            "created_at = excluded.created_at, removed_at = NULL",
            (user.id, email, role, org, user.created_at),
        )
        self.users = {k: v for k, v in self.users.items() if v.email != email}
        self.users[user.id] = user
        return user

    async def add_user(self, email: str, role: str, org: str | None, actor: str) -> UserRecord:
        """Create a user directly (bootstrap and demo accounts; people join by invitation)."""
        user = await self._insert_user(email, role, org)
        await self._audit(
            "user_created", actor, org, {"user_id": user.id, "email": email, "role": role}
        )
        await self._db.commit()
        return user

    def user(self, user_id: str) -> UserRecord:
        user = self.users.get(user_id)
        if user is None or user.removed_at is not None:
            raise NotFoundError(f"User `{user_id}` does not exist.", code="user_not_found")
        return user

    async def create_invite(self, spec: InviteCreate, actor: str) -> Invite:
        _check_invited_org(spec)
        if spec.org is not None:
            self.org(spec.org)
        token, token_hash = keylib.new_token()
        now = self.clock()
        expires = iso(now + INVITE_TTL)
        await self._db.execute(
            "INSERT INTO invites VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
            (token_hash, spec.email, spec.org or "", spec.role, actor, iso(now), expires),
        )
        await self._audit("user_invited", actor, spec.org, {"email": spec.email, "role": spec.role})
        await self._db.commit()
        return Invite(
            token=token, email=spec.email, org=spec.org, role=spec.role, expires_at=expires
        )

    async def accept_invite(self, token: str, key_name: str) -> tuple[UserRecord, CreatedKey]:
        token_hash = keylib.hash_secret(token) if token.isascii() else b""
        async with self._db.execute(
            "SELECT email, org, role, expires_at, accepted_at FROM invites WHERE token_hash = ?",
            (token_hash,),
        ) as rows:
            row = await rows.fetchone()
        if row is None or row[4] is not None or row[3] <= iso(self.clock()):
            raise AuthenticationError(
                "This invitation token is unknown, already used or expired. Ask your "
                "organization admin for a new invitation.",
                code="invalid_invite",
            )
        email, role = row[0], row[2]
        org = row[1] or None  # none: the fleet-wide auditor
        key_limits = self.org(org).key_limits if org is not None else KeyLimits()
        user = await self._insert_user(email, role, org)
        await self._db.execute(
            "UPDATE invites SET accepted_at = ? WHERE token_hash = ?",
            (iso(self.clock()), token_hash),
        )
        key_text, record = await self._insert_key(user, key_name, None, None, key_limits)
        await self._audit(
            "user_joined", user.id, org, {"email": email, "role": role, "key_id": record.id}
        )
        await self._audit("key_created", user.id, org, {"key_id": record.id, "name": key_name})
        await self._db.commit()
        return user, CreatedKey(key=key_text, info=key_view(record))

    async def remove_user(self, user_id: str, actor: str) -> UserRecord:
        user = self.user(user_id)
        now = iso(self.clock())
        removed = replace(user, removed_at=now)
        await self._db.execute("UPDATE users SET removed_at = ? WHERE id = ?", (now, user_id))
        await self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
            (now, user_id),
        )
        await self._audit(
            "user_removed", actor, user.org, {"user_id": user_id, "email": user.email}
        )
        await self._db.commit()
        self.users[user_id] = removed
        for key in [k for k in self.keys.values() if k.user_id == user_id and k.revoked_at is None]:
            self.keys[key.id] = replace(key, revoked_at=now)
        return removed

    # --- keys -----------------------------------------------------------------------------

    async def _insert_key(
        self,
        user: UserRecord,
        name: str,
        regions: Iterable[str] | None,
        expires_in_days: int | None,
        limits: KeyLimits,
    ) -> tuple[str, KeyRecord]:
        key_text, key_id, secret_hash = keylib.new_key()
        now = self.clock()
        expires = iso(now + timedelta(days=expires_in_days)) if expires_in_days else None
        record = KeyRecord(
            key_id,
            name,
            user.id,
            user.org or "",
            secret_hash,
            iso(now),
            expires,
            None,
            frozenset(regions) if regions is not None else None,
            limits,
        )
        await self._db.execute(
            "INSERT INTO api_keys (id, name, user_id, org, secret_hash, created_at, expires_at, "
            "regions, limits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                name,
                user.id,
                record.org,
                secret_hash,
                record.created_at,
                expires,
                json.dumps(sorted(record.regions)) if record.regions is not None else None,
                msgspec.json.encode(limits),
            ),
        )
        self.keys[record.id] = record
        return key_text, record

    async def create_key(self, user: UserRecord, spec: KeyCreate, actor: str) -> CreatedKey:
        if spec.regions is not None and user.org is not None:
            outside = set(spec.regions) - self.org(user.org).regions
            if outside:
                raise InvalidRequestError(
                    f"Regions {sorted(outside)} are outside org `{user.org}`'s regions; a key "
                    "may only narrow its org's regions.",
                    code="invalid_value",
                    param="regions",
                )
        key_text, record = await self._insert_key(
            user, spec.name, spec.regions, spec.expires_in_days, spec.limits or KeyLimits()
        )
        await self._audit(
            "key_created",
            actor,
            record.org,
            {"key_id": record.id, "name": spec.name, "regions": spec.regions},
        )
        await self._db.commit()
        return CreatedKey(key=key_text, info=key_view(record))

    def key(self, key_id: str) -> KeyRecord:
        record = self.keys.get(key_id)
        if record is None:
            raise NotFoundError(f"API key `{key_id}` does not exist.", code="key_not_found")
        return record

    async def revoke_key(self, key_id: str, actor: str) -> KeyRecord:
        record = self.key(key_id)
        if record.revoked_at is None:
            record = replace(record, revoked_at=iso(self.clock()))
            await self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ?", (record.revoked_at, key_id)
            )
            await self._audit("key_revoked", actor, record.org, {"key_id": key_id})
            await self._db.commit()
            self.keys[key_id] = record
        return record

    async def set_limits(self, key_id: str, limits: KeyLimits, actor: str) -> KeyRecord:
        record = replace(self.key(key_id), limits=limits)
        await self._db.execute(
            "UPDATE api_keys SET limits = ? WHERE id = ?", (msgspec.json.encode(limits), key_id)
        )
        await self._audit(
            "limits_changed",
            actor,
            record.org,
            {"key_id": key_id, "limits": msgspec.to_builtins(limits)},
        )
        await self._db.commit()
        self.keys[key_id] = record
        return record

    def authenticate(self, presented: str) -> Caller:
        """The caller behind a key, or 401 `invalid_api_key` (never echoing the key)."""
        parsed = keylib.parse_key(presented)
        record = self.keys.get(parsed.key_id) if parsed else None
        if (
            parsed is None
            or record is None
            or not keylib.secret_matches(parsed.secret, record.secret_hash)
        ):
            raise _invalid_key()
        # The clock is read only for a key that expires (most do not; every request asks).
        if record.revoked_at is not None or (
            record.expires_at is not None and record.expires_at <= iso(self.clock())
        ):
            raise _invalid_key()
        user = self.users.get(record.user_id)
        if user is None or user.removed_at is not None:
            raise _invalid_key()
        org = self.orgs.get(record.org)
        if org is None:
            org = OrgRecord("", frozenset(), None, "metadata", iso(self.clock()))
        return Caller(record, user, org)

    # --- usage and budgets --------------------------------------------------------------------

    async def _add_totals(self, totals: dict[tuple[str, str], int]) -> None:
        await self._db.executemany(
            "INSERT INTO budget_usage VALUES (?, ?, ?) ON CONFLICT(org, month) "
            "DO UPDATE SET used_tokens = used_tokens + excluded.used_tokens",
            [(org, month, used) for (org, month), used in totals.items()],
        )

    async def _set_mark(self, epoch: str, settled_through: int) -> None:
        await self._db.execute(
            "INSERT INTO journal_marks VALUES ('admissions', ?, ?) ON CONFLICT(name) "
            "DO UPDATE SET epoch = excluded.epoch, settled_through = excluded.settled_through",
            (epoch, settled_through),
        )

    async def journal_mark(self, epoch: str) -> int:
        """The last settle line of journal `epoch` already written here (0: none)."""
        async with self._db.execute(
            "SELECT settled_through FROM journal_marks WHERE name = 'admissions' AND epoch = ?",
            (epoch,),
        ) as rows:
            row = await rows.fetchone()
        return int(row[0]) if row is not None else 0

    async def recover_usage(
        self, recovered: list[Recovered], *, mark: tuple[str, int] | None
    ) -> None:
        """One transaction: the journal's outstanding requests, and the mark that closes it.

        A request whose row is already here (by `request_id`) is neither inserted nor
        counted again.
        """
        totals: dict[tuple[str, str], int] = {}
        for entry in recovered:
            if entry.record is not None:
                cursor = await self._db.execute(_INSERT_USAGE_ONCE, _usage_row(entry.record))
                if cursor.rowcount != 1:
                    continue
            slot = (entry.org, entry.month)
            totals[slot] = totals.get(slot, 0) + entry.tokens
        await self._add_totals(totals)
        if mark is not None:
            await self._set_mark(*mark)
        await self._db.commit()

    # --- budget shares leased to nodes (the offline edge) -------------------------------------

    async def edge_leases(self, month: str) -> list[EdgeLease]:
        """The shares leased for `month` (and later months)."""
        async with self._db.execute(
            "SELECT node, org, month, granted, used FROM edge_leases WHERE month >= ?", (month,)
        ) as rows:
            return [EdgeLease(r[0], r[1], r[2], r[3], r[4]) async for r in rows]

    async def leased(self, node: str, org: str, month: str) -> bool:
        """Whether `node` was ever granted a share of `org`'s budget for `month`."""
        async with self._db.execute(
            "SELECT 1 FROM edge_leases WHERE node = ? AND org = ? AND month = ? AND granted > 0",
            (node, org, month),
        ) as rows:
            return await rows.fetchone() is not None

    async def grant_edge_lease(self, node: str, org: str, month: str, tokens: int) -> None:
        await self._db.execute(
            "INSERT INTO edge_leases VALUES (?, ?, ?, ?, 0) ON CONFLICT(node, org, month) "
            "DO UPDATE SET granted = granted + excluded.granted",
            (node, org, month, tokens),
        )
        await self._db.commit()

    async def apply_edge_usage(self, node: str, entries: list[tuple[str, Recovered]]) -> set[str]:
        """One transaction: each (id, entry) a node reported and this store does not yet
        hold adds its usage row, its tokens to the org's month and to the node's lease.

        Returns the ids applied now; an id seen before changes nothing, so a node may send
        the same rows again (it does after a lost answer or a crash) and each counts once.
        """
        try:
            applied = await self._apply_edge_usage(node, entries)
        except BaseException:
            await self._db.rollback()  # none of it, or a later commit would keep a part
            raise
        return applied

    async def _apply_edge_usage(self, node: str, entries: list[tuple[str, Recovered]]) -> set[str]:
        applied: set[str] = set()
        totals: dict[tuple[str, str], int] = {}
        for record_id, entry in entries:
            cursor = await self._db.execute(
                "INSERT OR IGNORE INTO edge_records VALUES (?, ?, ?)",
                (record_id, node, entry.month),
            )
            if cursor.rowcount != 1:
                continue
            applied.add(record_id)
            if entry.record is not None:
                await self._db.execute(_INSERT_USAGE_ONCE, _usage_row(entry.record))
            slot = (entry.org, entry.month)
            totals[slot] = totals.get(slot, 0) + entry.tokens
        await self._add_totals(totals)
        await self._db.executemany(
            "INSERT INTO edge_leases VALUES (?, ?, ?, 0, ?) ON CONFLICT(node, org, month) "
            "DO UPDATE SET used = used + excluded.used",
            [(node, org, month, used) for (org, month), used in totals.items()],
        )
        await self._db.commit()
        return applied

    async def month_usage(self, month: str) -> dict[str, int]:
        async with self._db.execute(
            "SELECT org, used_tokens FROM budget_usage WHERE month = ?", (month,)
        ) as rows:
            return {row[0]: row[1] async for row in rows}

    async def write_usage(
        self,
        records: list[UsageRecord],
        totals: dict[tuple[str, str], int],
        last_used: dict[str, str],
        *,
        mark: tuple[str, int] | None = None,
    ) -> None:
        """One transaction: usage rows, the months' budget counters, keys' last use, and
        `mark`, the admission journal's (epoch, last settle line) these records cover.

        `totals` covers every settled request, including those of `zero`-logging orgs,
        which leave no per-request row.
        """
        # A request id already present can only be a collision of random ids: it must not
        # hold back the whole batch.
        await self._db.executemany(_INSERT_USAGE_ONCE, [_usage_row(r) for r in records])
        await self._add_totals(totals)
        if mark is not None:
            await self._set_mark(*mark)
        await self._db.executemany(
            "UPDATE api_keys SET last_used_at = ? WHERE id = ?",
            [(at, kid) for kid, at in last_used.items()],
        )
        await self._db.commit()
        for key_id, at in last_used.items():
            if key_id in self.keys:
                self.keys[key_id] = replace(self.keys[key_id], last_used_at=at)

    async def usage_records(self, org: str | None) -> list[UsageRecord]:
        query = (
            "SELECT at, org, user_id, key_id, model, region, node, input_tokens, "
            "output_tokens, latency_ms, status, cost, request_id, cached_tokens FROM usage"
        )
        args: tuple[Any, ...] = ()
        if org is not None:
            query += " WHERE org = ?"
            args = (org,)
        async with self._db.execute(query + " ORDER BY id", args) as rows:
            return [
                UsageRecord(
                    at=r[0],
                    org=r[1],
                    user_id=r[2],
                    key_id=r[3],
                    model=r[4],
                    region=r[5],
                    node=r[6],
                    input_tokens=r[7],
                    output_tokens=r[8],
                    latency_ms=r[9],
                    status=r[10],
                    cost=r[11],
                    request_id=r[12],
                    cached_tokens=r[13],
                )
                async for r in rows
            ]

    async def usage_report(
        self, by: str, org: str | None, since: str | None, until: str | None
    ) -> UsageReport:
        group = {
            "model": "model",
            "user": "user_id",
            "region": "region",
            "node": "node",
            "day": "substr(at, 1, 10)",
            "org": "org",
            "key": "coalesce(key_id, '-')",
        }[by]
        where, args = ["1 = 1"], []
        for clause, value in (("org = ?", org), ("at >= ?", since), ("at < ?", until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        # `group` comes from the fixed map above and `where` from fixed clauses.
        query = (
            f"SELECT {group}, count(*), sum(input_tokens), sum(output_tokens), sum(cost), "  # noqa: S608
            "sum(cached_tokens) "
            f"FROM usage WHERE {' AND '.join(where)} GROUP BY 1 ORDER BY 1"
        )
        async with self._db.execute(query, args) as rows:
            data = [
                UsageRow(
                    group=str(r[0]),
                    requests=r[1],
                    input_tokens=r[2],
                    output_tokens=r[3],
                    cost=round(r[4], 6),
                    cached_tokens=r[5],
                )
                async for r in rows
            ]
        total = UsageRow(
            group="total",
            requests=sum(r.requests for r in data),
            input_tokens=sum(r.input_tokens for r in data),
            output_tokens=sum(r.output_tokens for r in data),
            cost=round(sum(r.cost for r in data), 6),
            cached_tokens=sum(r.cached_tokens for r in data),
        )
        return UsageReport(by=by, rows=data, total=total)


def _check_invited_org(spec: InviteCreate) -> None:
    """An org role is granted in one org; the fleet-wide auditor in none."""
    if (spec.role in ORG_ROLES) == (spec.org is None):
        needs = "names the organization to join" if spec.org is None else "names no organization"
        raise InvalidRequestError(
            f"An invitation as `{spec.role}` {needs}.", code="invalid_value", param="org"
        )


def _invalid_key() -> AuthenticationError:
    return AuthenticationError(
        "Invalid API key. Send `Authorization: Bearer pal-sk-…` with a key that has not been "
        "revoked or expired; an admin can issue one with `palisade key create`.",
        code="invalid_api_key",
    )


def org_view(record: OrgRecord) -> Org:
    return Org(
        name=record.name,
        regions=sorted(record.regions),
        budget_tokens=record.budget_tokens,
        logging_mode=record.logging_mode,
        created_at=record.created_at,
        key_limits=record.key_limits,
    )


def user_view(record: UserRecord) -> User:
    return User(
        id=record.id,
        email=record.email,
        role=record.role,
        org=record.org,
        created_at=record.created_at,
    )


def key_view(record: KeyRecord) -> KeyInfo:
    return KeyInfo(
        id=record.id,
        name=record.name,
        user_id=record.user_id,
        org=record.org,
        created_at=record.created_at,
        last_used_at=record.last_used_at,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
        regions=sorted(record.regions) if record.regions is not None else None,
        limits=record.limits,
    )


_INSERT_USAGE_ONCE = (
    "INSERT OR IGNORE INTO usage (at, org, user_id, key_id, model, region, node, input_tokens, "
    "output_tokens, latency_ms, status, cost, request_id, cached_tokens) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _usage_row(r: UsageRecord) -> tuple[Any, ...]:
    return (
        r.at,
        r.org,
        r.user_id,
        r.key_id,
        r.model,
        r.region,
        r.node,
        r.input_tokens,
        r.output_tokens,
        r.latency_ms,
        r.status,
        r.cost,
        r.request_id,
        r.cached_tokens,
    )


async def _add_request_ids(db: aiosqlite.Connection) -> None:
    """Usage rows name their request (databases made before they did gain the column)."""
    async with db.execute("PRAGMA table_info(usage)") as rows:
        columns = {row[1] async for row in rows}
    if "request_id" not in columns:
        await db.execute("ALTER TABLE usage ADD COLUMN request_id TEXT")
    await db.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS usage_request ON usage (request_id) "
        "WHERE request_id IS NOT NULL"
    )


async def _add_cached_tokens(db: aiosqlite.Connection) -> None:
    """Usage rows count the input tokens served from a prompt cache (databases made before
    they did gain the column; their rows count none)."""
    async with db.execute("PRAGMA table_info(usage)") as rows:
        columns = {row[1] async for row in rows}
    if "cached_tokens" not in columns:
        await db.execute("ALTER TABLE usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0")
