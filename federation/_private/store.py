"""The tenancy policy store: orgs, users, API keys, invites, budgets, usage and audit events.

On SQLite (the embedded default) or PostgreSQL (several routers sharing one store), behind
the `Database` seam (database.py), with the schema's migrations in migrations.py. Orgs,
users and keys are also held in memory, updated on every write, so that authentication
never waits for the database and a revoked key or a lowered limit takes effect on the very
next request. On a shared store, every change is announced to the other processes (NOTIFY,
delivered when its transaction commits) and each reloads what changed (`_heard`): a key
revoked through one router is refused by every other within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

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
from federation._private.database import (
    RELOAD,
    Database,
    StoreError,
    Transaction,
    open_database,
)
from federation._private.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
)
from federation._private.migrations import check_schema, migrate
from federation._private.vocabulary import ORG_ROLES

__all__ = ["StoreError", "TenancyStore"]
log = logging.getLogger("palisade.federation.store")

Clock = Callable[[], datetime]
INVITE_TTL = timedelta(days=7)


class AuditSink(Protocol):
    """Where management events go. The store keeps them in its own table unless a node
    supplies a sink (the compliance package's tamper-evident log)."""

    async def record(
        self, event: str, actor: str, org: str | None, payload: dict[str, Any]
    ) -> None: ...

    async def events(self, org: str | None) -> list[AuditEvent]: ...


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
    def __init__(self, db: Database, clock: Clock, sink: AuditSink | None = None) -> None:
        self._db = db
        self.clock = clock
        self._sink = sink
        self.path = Path("policy.db")  # the server's home is its parent: journals live there
        self.orgs: dict[str, OrgRecord] = {}
        self.users: dict[str, UserRecord] = {}
        self.keys: dict[str, KeyRecord] = {}
        # Where each org could be served, and when: what a node's usage rows are held to.
        self.region_spans: dict[str, list[RegionSpan]] = {}
        # Bumped by every management change (in `_audit`, or heard from another process),
        # which then calls `on_change`.
        self.generation = 0
        self.on_change: list[Callable[[], None]] = []
        # Who announces this process's changes, so that it does not reload its own.
        self._origin = os.urandom(6).hex()
        self._reloads: set[asyncio.Task[None]] = set()
        self._reloading = asyncio.Lock()
        self._writes = 0  # this process's transactions ended so far

    @property
    def database(self) -> Database:
        return self._db

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        database: str | None = None,
        clock: Clock = _now,
        sink: AuditSink | None = None,
    ) -> TenancyStore:
        """The store in `database` (a PostgreSQL URL or a SQLite path; default `path`).

        A SQLite store migrates itself; a PostgreSQL one must already be at this code's
        schema version (`palisade db migrate`), and is listened to for other processes'
        changes.
        """
        db = await open_database(database or str(path), path.parent)
        try:
            if db.shared:
                await check_schema(db)
            else:
                await migrate(db, now=iso(clock()))
            store = cls(db, clock, sink)
            store.path = path
            await store._load()
            await db.listen(store._heard)
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        for task in list(self._reloads):
            task.cancel()
        await self._db.close()

    @property
    def shared(self) -> bool:
        """Whether other processes share this store (and so its budgets must be leased)."""
        return self._db.shared

    async def _load(self) -> None:
        (await self._read_everything())()
        await self._open_missing_spans()

    async def _read_everything(self) -> Callable[[], None]:
        orgs = {row[0]: _org_record(row) for row in await self._db.fetch(_SELECT_ORGS)}
        users = {row[0]: UserRecord(*row) for row in await self._db.fetch(_SELECT_USERS)}
        keys = {row[0]: _key_record(row) for row in await self._db.fetch(_SELECT_KEYS)}
        spans: dict[str, list[RegionSpan]] = {}
        for org, region, since, until in await self._db.fetch(
            f"SELECT org, region, since, until FROM org_region_spans ORDER BY {self._db.rowid}"  # noqa: S608
        ):
            spans.setdefault(org, []).append(RegionSpan(region, since, until))

        def apply() -> None:
            self.orgs, self.users, self.keys, self.region_spans = orgs, users, keys, spans

        return apply

    async def _open_missing_spans(self) -> None:
        """A region without an open span (a database made before the history was kept) is
        taken as allowed since its org was created."""
        missing = [
            record
            for record in self.orgs.values()
            if set(record.regions) - self._open_regions(record.name)
        ]
        if missing:
            async with self._transaction() as tx:
                for record in missing:
                    await self._open_spans(tx, record.name, record.regions, record.created_at)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Transaction]:
        """A transaction of this process's; counted when it ends (see `_reload`)."""
        try:
            async with self._db.transaction() as tx:
                yield tx
        finally:
            self._writes += 1

    def _open_regions(self, org: str) -> set[str]:
        return {span.region for span in self.region_spans.get(org, []) if span.until is None}

    async def _open_spans(
        self, tx: Transaction, org: str, regions: Iterable[str], since: str
    ) -> None:
        spans = self.region_spans.setdefault(org, [])
        for region in sorted(set(regions) - self._open_regions(org)):
            await tx.execute(
                "INSERT INTO org_region_spans (org, region, since, until) VALUES (?, ?, ?, NULL)",
                (org, region, since),
            )
            spans.append(RegionSpan(region, since, None))

    async def _close_spans(
        self, tx: Transaction, org: str, regions: frozenset[str], until: str
    ) -> None:
        """End the open spans of `org`'s regions not in `regions`."""
        spans = self.region_spans.setdefault(org, [])
        for index, span in enumerate(spans):
            if span.until is None and span.region not in regions:
                await tx.execute(
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

    # --- changes made by other processes sharing the store --------------------------------

    def _announce(self, tx: Transaction, kind: str, name: str) -> None:
        tx.notify(f"{self._origin} {kind} {name}")

    def _heard(self, topic: str) -> None:
        """Another process changed `kind name` (or, with RELOAD, maybe anything): reload it."""
        if topic == RELOAD:
            self._reload(self._read_everything)
            return
        origin, _, rest = topic.partition(" ")
        kind, _, name = rest.partition(" ")
        if origin == self._origin or not name:
            return
        readers = {"org": self._read_org, "user": self._read_user, "key": self._read_key}
        read = readers.get(kind)
        if read is not None:
            self._reload(functools.partial(read, name))

    def _reload(self, read: Callable[[], Awaitable[Callable[[], None]]]) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_in_turn(read))
        self._reloads.add(task)
        task.add_done_callback(self._reloaded)

    async def _reload_in_turn(self, read: Callable[[], Awaitable[Callable[[], None]]]) -> None:
        """Reloads run one at a time, in the order heard, so an older read never lands after
        a newer one; and a read that a transaction of this process's ended during is read
        again, so it cannot put back what that transaction had just changed in memory."""
        async with self._reloading:
            while True:
                writes = self._writes
                apply = await read()
                if writes == self._writes:
                    apply()
                    return

    def _reloaded(self, task: asyncio.Task[None]) -> None:
        self._reloads.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("reloading a policy change failed: %s", task.exception())
            return
        self._changed()

    async def _read_org(self, name: str) -> Callable[[], None]:
        row = await self._db.fetchone(_SELECT_ORGS + " WHERE o.name = ?", (name,))
        spans = await self._db.fetch(
            f"SELECT region, since, until FROM org_region_spans WHERE org = ? "  # noqa: S608
            f"ORDER BY {self._db.rowid}",  # the rowid word is one of two fixed names
            (name,),
        )

        def apply() -> None:
            if row is None:
                self.orgs.pop(name, None)
                return
            self.orgs[name] = _org_record(row)
            self.region_spans[name] = [RegionSpan(*span) for span in spans]

        return apply

    async def _read_user(self, user_id: str) -> Callable[[], None]:
        row = await self._db.fetchone(_SELECT_USERS + " WHERE id = ?", (user_id,))
        keys = await self._db.fetch(_SELECT_KEYS + " WHERE user_id = ?", (user_id,))

        def apply() -> None:
            if row is not None:
                self._keep_user(UserRecord(*row))
            for key_row in keys:
                self.keys[key_row[0]] = _key_record(key_row)

        return apply

    async def _read_key(self, key_id: str) -> Callable[[], None]:
        row = await self._db.fetchone(_SELECT_KEYS + " WHERE id = ?", (key_id,))

        def apply() -> None:
            if row is not None:
                self.keys[key_id] = _key_record(row)

        return apply

    # --- audit --------------------------------------------------------------------------

    async def _audit(
        self,
        tx: Transaction,
        event: str,
        actor: str,
        org: str | None,
        payload: dict[str, Any],
    ) -> None:
        """Record a management event before the change it describes is committed.

        With a sink, the event is durable in the audit log before the change commits, so a
        crash can leave a recorded attempt but never an unrecorded change (an event the sink
        refuses raises, and the transaction is rolled back).
        """
        if self._sink is not None:
            await self._sink.record(event, actor, org, payload)
        else:
            await tx.execute(
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
        in-memory records change right after the commit, without awaiting anything more;
        so once every transaction begun so far has ended, they are in memory too.
        """
        await self._db.settled()

    async def caught_up(self) -> None:
        """Return once every change committed by any process before this call is in this
        process's memory: its own are (`settled`), and others' were heard and reloaded."""
        await self.settled()
        await self._db.heard_up_to_now()
        pending = list(self._reloads)  # started for what was heard before the marker
        if pending:
            await asyncio.wait(pending)

    async def record_event(
        self, event: str, actor: str, org: str | None, payload: dict[str, Any]
    ) -> None:
        """Audit a management action taken outside the store (e.g. a model's pricing)."""
        async with self._transaction() as tx:
            await self._audit(tx, event, actor, org, payload)

    async def audit_events(self, org: str | None) -> list[AuditEvent]:
        if self._sink is not None:
            return await self._sink.events(org)
        query = "SELECT id, at, event, actor, org, payload FROM audit_events"
        args: tuple[Any, ...] = ()
        if org is not None:
            query += " WHERE org = ?"
            args = (org,)
        return [
            AuditEvent(id=r[0], at=r[1], event=r[2], actor=r[3], org=r[4], payload=json.loads(r[5]))
            for r in await self._db.fetch(query + " ORDER BY id", args)
        ]

    # --- orgs and users -----------------------------------------------------------------

    async def bootstrap_admin(self) -> str | None:
        """Create the system admin and its key on first start; returns the key once."""
        if any(user.role == "system_admin" for user in self.users.values()):
            return None
        async with self._transaction() as tx:
            user = await self._insert_user(tx, "admin@local", "system_admin", None)
            key_text, record = await self._insert_key(
                tx, user, "bootstrap", None, None, KeyLimits()
            )
            await self._audit(
                tx,
                "system_admin_created",
                "system",
                None,
                {"user_id": user.id, "key_id": record.id},
            )
        self._keep_user(user)
        self.keys[record.id] = record
        return key_text

    async def create_org(self, spec: OrgCreate, actor: str) -> Org:
        if spec.name in self.orgs:
            raise _org_exists(spec.name)
        record = OrgRecord(
            spec.name,
            frozenset(spec.regions),
            spec.budget_tokens,
            spec.logging_mode,
            iso(self.clock()),
        )
        try:
            async with self._transaction() as tx:
                inserted = await tx.execute(
                    "INSERT INTO orgs VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (
                        record.name,
                        json.dumps(sorted(record.regions)),
                        record.budget_tokens,
                        record.logging_mode,
                        record.created_at,
                    ),
                )
                if inserted != 1:  # made through another router sharing the store
                    raise _org_exists(spec.name)  # noqa: TRY301 - rolls the transaction back
                await self._open_spans(tx, record.name, record.regions, record.created_at)
                await self._audit(tx, "org_created", actor, spec.name, msgspec.to_builtins(spec))
                self._announce(tx, "org", record.name)
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
        async with self._transaction() as tx:
            await tx.execute("UPDATE orgs SET budget_tokens = ? WHERE name = ?", (tokens, name))
            await self._audit(tx, "budget_changed", actor, name, {"budget_tokens": tokens})
            self._announce(tx, "org", name)
        self.orgs[name] = record
        return record

    async def set_key_limits(self, name: str, limits: KeyLimits, actor: str) -> OrgRecord:
        """The org's default key limits: what its members' new keys get, and at most."""
        record = replace(self.org(name), key_limits=limits)
        async with self._transaction() as tx:
            await tx.execute(
                "INSERT INTO org_key_limits VALUES (?, ?) ON CONFLICT(org) DO UPDATE SET "
                "limits = excluded.limits",
                (name, _limits_text(limits)),
            )
            await self._audit(
                tx,
                "org_key_limits_changed",
                actor,
                name,
                {"limits": msgspec.to_builtins(limits)},
            )
            self._announce(tx, "org", name)
        self.orgs[name] = record
        return record

    async def set_regions(self, name: str, regions: Iterable[str], actor: str) -> OrgRecord:
        """Change where an org's requests may run; its keys' own regions still narrow it."""
        record = replace(self.org(name), regions=frozenset(regions))
        text = json.dumps(sorted(record.regions))
        spans = list(self.region_spans.get(name, []))
        try:
            async with self._transaction() as tx:
                await tx.execute("UPDATE orgs SET regions = ? WHERE name = ?", (text, name))
                now = iso(self.clock())
                await self._close_spans(tx, name, record.regions, now)
                await self._open_spans(tx, name, record.regions, now)
                await self._audit(
                    tx, "org_regions_changed", actor, name, {"regions": sorted(record.regions)}
                )
                self._announce(tx, "org", name)
        except BaseException:
            self.region_spans[name] = spans  # the transaction is rolled back: so is the history
            raise
        self.orgs[name] = record
        return record

    async def _insert_user(
        self, tx: Transaction, email: str, role: str, org: str | None
    ) -> UserRecord:
        if any(u.email == email and u.removed_at is None for u in self.users.values()):
            raise InvalidRequestError(
                f"A user with email {email} already exists.", code="user_exists", param="email"
            )
        user = UserRecord("usr_" + keylib.new_key()[1], email, role, org, iso(self.clock()))
        await tx.execute(
            "INSERT INTO users VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(email) DO UPDATE SET "
            "id = excluded.id, role = excluded.role, org = excluded.org, "
            "created_at = excluded.created_at, removed_at = NULL",
            (user.id, email, role, org, user.created_at),
        )
        self._announce(tx, "user", user.id)
        return user

    def _keep_user(self, user: UserRecord) -> None:
        self.users = {k: v for k, v in self.users.items() if v.email != user.email}
        self.users[user.id] = user

    async def add_user(self, email: str, role: str, org: str | None, actor: str) -> UserRecord:
        """Create a user directly (bootstrap and demo accounts; people join by invitation)."""
        async with self._transaction() as tx:
            user = await self._insert_user(tx, email, role, org)
            await self._audit(
                tx, "user_created", actor, org, {"user_id": user.id, "email": email, "role": role}
            )
        self._keep_user(user)
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
        async with self._transaction() as tx:
            await tx.execute(
                "INSERT INTO invites VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (token_hash, spec.email, spec.org or "", spec.role, actor, iso(now), expires),
            )
            await self._audit(
                tx, "user_invited", actor, spec.org, {"email": spec.email, "role": spec.role}
            )
        return Invite(
            token=token, email=spec.email, org=spec.org, role=spec.role, expires_at=expires
        )

    async def accept_invite(self, token: str, key_name: str) -> tuple[UserRecord, CreatedKey]:
        token_hash = keylib.hash_secret(token) if token.isascii() else b""
        row = await self._db.fetchone(
            "SELECT email, org, role, expires_at, accepted_at FROM invites WHERE token_hash = ?",
            (token_hash,),
        )
        if row is None or row[4] is not None or row[3] <= iso(self.clock()):
            raise _invalid_invite()
        email, role = row[0], row[2]
        org = row[1] or None  # none: the fleet-wide auditor
        key_limits = self.org(org).key_limits if org is not None else KeyLimits()
        async with self._transaction() as tx:
            # Taken once even when two routers sharing the store are handed it at once.
            taken = await tx.execute(
                "UPDATE invites SET accepted_at = ? WHERE token_hash = ? AND accepted_at IS NULL",
                (iso(self.clock()), token_hash),
            )
            if taken != 1:
                raise _invalid_invite()
            user = await self._insert_user(tx, email, role, org)
            key_text, record = await self._insert_key(tx, user, key_name, None, None, key_limits)
            await self._audit(
                tx, "user_joined", user.id, org, {"email": email, "role": role, "key_id": record.id}
            )
            await self._audit(
                tx, "key_created", user.id, org, {"key_id": record.id, "name": key_name}
            )
        self._keep_user(user)
        self.keys[record.id] = record
        return user, CreatedKey(key=key_text, info=key_view(record))

    async def remove_user(self, user_id: str, actor: str) -> UserRecord:
        user = self.user(user_id)
        now = iso(self.clock())
        removed = replace(user, removed_at=now)
        async with self._transaction() as tx:
            await tx.execute("UPDATE users SET removed_at = ? WHERE id = ?", (now, user_id))
            await tx.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
                (now, user_id),
            )
            await self._audit(
                tx, "user_removed", actor, user.org, {"user_id": user_id, "email": user.email}
            )
            self._announce(tx, "user", user_id)
        self.users[user_id] = removed
        for key in [k for k in self.keys.values() if k.user_id == user_id and k.revoked_at is None]:
            self.keys[key.id] = replace(key, revoked_at=now)
        return removed

    # --- keys -----------------------------------------------------------------------------

    async def _insert_key(  # noqa: PLR0917 - one transaction's private helper
        self,
        tx: Transaction,
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
        await tx.execute(
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
                _limits_text(limits),
            ),
        )
        self._announce(tx, "key", record.id)
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
        async with self._transaction() as tx:
            key_text, record = await self._insert_key(
                tx, user, spec.name, spec.regions, spec.expires_in_days, spec.limits or KeyLimits()
            )
            await self._audit(
                tx,
                "key_created",
                actor,
                record.org,
                {"key_id": record.id, "name": spec.name, "regions": spec.regions},
            )
        self.keys[record.id] = record
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
            async with self._transaction() as tx:
                await tx.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE id = ?", (record.revoked_at, key_id)
                )
                await self._audit(tx, "key_revoked", actor, record.org, {"key_id": key_id})
                self._announce(tx, "key", key_id)
            self.keys[key_id] = record
        return record

    async def set_limits(self, key_id: str, limits: KeyLimits, actor: str) -> KeyRecord:
        record = replace(self.key(key_id), limits=limits)
        async with self._transaction() as tx:
            await tx.execute(
                "UPDATE api_keys SET limits = ? WHERE id = ?", (_limits_text(limits), key_id)
            )
            await self._audit(
                tx,
                "limits_changed",
                actor,
                record.org,
                {"key_id": key_id, "limits": msgspec.to_builtins(limits)},
            )
            self._announce(tx, "key", key_id)
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

    @staticmethod
    async def _add_totals(tx: Transaction, totals: dict[tuple[str, str], int]) -> None:
        await tx.executemany(
            "INSERT INTO budget_usage VALUES (?, ?, ?) ON CONFLICT(org, month) "
            "DO UPDATE SET used_tokens = budget_usage.used_tokens + excluded.used_tokens",
            [(org, month, used) for (org, month), used in totals.items()],
        )

    @staticmethod
    async def _set_mark(
        tx: Transaction,
        name: str,
        epoch: str,
        settled_through: int,
    ) -> None:
        await tx.execute(
            "INSERT INTO journal_marks VALUES (?, ?, ?) ON CONFLICT(name) "
            "DO UPDATE SET epoch = excluded.epoch, settled_through = excluded.settled_through",
            (name, epoch, settled_through),
        )

    @staticmethod
    async def _landed(tx: Transaction, name: str, epoch: str, settled_through: int) -> bool:
        row = await tx.fetchone(
            "SELECT epoch, settled_through FROM journal_marks WHERE name = ?", (name,)
        )
        return row is not None and row[0] == epoch and int(row[1]) >= settled_through

    async def journal_mark(self, epoch: str, name: str = "admissions") -> int:
        """The last settle line of journal `name`'s `epoch` already written here (0: none)."""
        row = await self._db.fetchone(
            "SELECT settled_through FROM journal_marks WHERE name = ? AND epoch = ?",
            (name, epoch),
        )
        return int(row[0]) if row is not None else 0

    async def recover_usage(
        self,
        recovered: list[Recovered],
        *,
        mark: tuple[str, int] | None,
        journal: str = "admissions",
    ) -> None:
        """One transaction: the journal's outstanding requests, and the mark that closes it.

        A request whose row is already here (by `request_id`) is neither inserted nor
        counted again.
        """
        totals: dict[tuple[str, str], int] = {}
        async with self._db.transaction() as tx:  # usage: no org, user or key changes
            for entry in recovered:
                row = _usage_row(entry.record) if entry.record is not None else None
                if row is not None and await tx.execute(_INSERT_USAGE_ONCE, row) != 1:
                    continue
                slot = (entry.org, entry.month)
                totals[slot] = totals.get(slot, 0) + entry.tokens
            await self._add_totals(tx, totals)
            if mark is not None:
                await self._set_mark(tx, journal, *mark)

    # --- budget shares leased to nodes (the offline edge) -------------------------------------

    async def edge_leases(self, month: str) -> list[EdgeLease]:
        """The shares leased for `month` (and later months)."""
        rows = await self._db.fetch(
            "SELECT node, org, month, granted, used FROM edge_leases WHERE month >= ?", (month,)
        )
        return [EdgeLease(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def leased(self, node: str, org: str, month: str) -> bool:
        """Whether `node` was ever granted a share of `org`'s budget for `month`."""
        row = await self._db.fetchone(
            "SELECT 1 FROM edge_leases WHERE node = ? AND org = ? AND month = ? AND granted > 0",
            (node, org, month),
        )
        return row is not None

    async def grant_edge_lease(self, node: str, org: str, month: str, tokens: int) -> None:
        async with self._db.transaction() as tx:  # usage: no org, user or key changes
            await tx.execute(
                "INSERT INTO edge_leases VALUES (?, ?, ?, ?, 0) ON CONFLICT(node, org, month) "
                "DO UPDATE SET granted = edge_leases.granted + excluded.granted",
                (node, org, month, tokens),
            )

    async def apply_edge_usage(self, node: str, entries: list[tuple[str, Recovered]]) -> set[str]:
        """One transaction: each (id, entry) a node reported and this store does not yet
        hold adds its usage row, its tokens to the org's month and to the node's lease.

        Returns the ids applied now; an id seen before changes nothing, so a node may send
        the same rows again (it does after a lost answer or a crash) and each counts once.
        """
        applied: set[str] = set()
        totals: dict[tuple[str, str], int] = {}
        async with self._db.transaction() as tx:  # usage: no org, user or key changes
            for record_id, entry in entries:
                inserted = await tx.execute(
                    "INSERT INTO edge_records VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (record_id, node, entry.month),
                )
                if inserted != 1:
                    continue
                applied.add(record_id)
                if entry.record is not None:
                    await tx.execute(_INSERT_USAGE_ONCE, _usage_row(entry.record))
                slot = (entry.org, entry.month)
                totals[slot] = totals.get(slot, 0) + entry.tokens
            await self._add_totals(tx, totals)
            await tx.executemany(
                "INSERT INTO edge_leases VALUES (?, ?, ?, 0, ?) ON CONFLICT(node, org, month) "
                "DO UPDATE SET used = edge_leases.used + excluded.used",
                [(node, org, month, used) for (org, month), used in totals.items()],
            )
        return applied

    async def month_usage(self, month: str) -> dict[str, int]:
        rows = await self._db.fetch(
            "SELECT org, used_tokens FROM budget_usage WHERE month = ?", (month,)
        )
        return {row[0]: int(row[1]) for row in rows}

    async def write_usage(
        self,
        records: list[UsageRecord],
        totals: dict[tuple[str, str], int],
        last_used: dict[str, str],
        *,
        mark: tuple[str, int] | None = None,
        journal: str = "admissions",
        slices: Callable[[Transaction], Awaitable[None]] | None = None,
    ) -> None:
        """One transaction: usage rows, the months' budget counters, keys' last use, and
        `mark`, the admission journal's (epoch, last settle line) these records cover
        (and, on a shared store, `slices`: the budget slices these tokens came out of).

        `totals` covers every settled request, including those of `zero`-logging orgs,
        which leave no per-request row.
        """
        async with self._db.transaction() as tx:  # usage: no org, user or key changes
            if mark is not None and await self._landed(tx, journal, *mark):
                return  # an earlier try committed, and its answer was lost with the connection
            # A request id already present can only be a collision of random ids (or a row
            # recovered from the journal already): it must not hold back the whole batch.
            await tx.executemany(_INSERT_USAGE_ONCE, [_usage_row(r) for r in records])
            await self._add_totals(tx, totals)
            if slices is not None:
                await slices(tx)
            if mark is not None:
                await self._set_mark(tx, journal, *mark)
            await tx.executemany(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ?",
                [(at, kid) for kid, at in last_used.items()],
            )
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
            for r in await self._db.fetch(query + " ORDER BY id", args)
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
            f"SELECT {group}, count(*), CAST(sum(input_tokens) AS BIGINT), "  # noqa: S608
            "CAST(sum(output_tokens) AS BIGINT), sum(cost), CAST(sum(cached_tokens) AS BIGINT) "
            f"FROM usage WHERE {' AND '.join(where)} GROUP BY 1 ORDER BY 1"
        )
        data = [
            UsageRow(
                group=str(r[0]),
                requests=r[1],
                input_tokens=r[2],
                output_tokens=r[3],
                cost=round(r[4], 6),
                cached_tokens=r[5],
            )
            for r in await self._db.fetch(query, args)
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


_SELECT_ORGS = (
    "SELECT o.name, o.regions, o.budget_tokens, o.logging_mode, o.created_at, l.limits "
    "FROM orgs o LEFT JOIN org_key_limits l ON l.org = o.name"
)
_SELECT_USERS = "SELECT id, email, role, org, created_at, removed_at FROM users"
_SELECT_KEYS = (
    "SELECT id, name, user_id, org, secret_hash, created_at, expires_at, revoked_at, "
    "regions, limits, last_used_at FROM api_keys"
)


def _org_record(row: tuple[Any, ...]) -> OrgRecord:
    limits = msgspec.json.decode(row[5], type=KeyLimits) if row[5] is not None else KeyLimits()
    return OrgRecord(row[0], frozenset(json.loads(row[1])), row[2], row[3], row[4], limits)


def _key_record(row: tuple[Any, ...]) -> KeyRecord:
    regions = frozenset(json.loads(row[8])) if row[8] is not None else None
    return KeyRecord(
        row[0],
        row[1],
        row[2],
        row[3],
        bytes(row[4]),
        row[5],
        row[6],
        row[7],
        regions,
        msgspec.json.decode(row[9], type=KeyLimits),
        row[10],
    )


def _limits_text(limits: KeyLimits) -> str:
    return msgspec.json.encode(limits).decode()


def _org_exists(name: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Organization `{name}` already exists.", code="org_exists", param="name"
    )


def _invalid_invite() -> AuthenticationError:
    return AuthenticationError(
        "This invitation token is unknown, already used or expired. Ask your "
        "organization admin for a new invitation.",
        code="invalid_invite",
    )


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
    "INSERT INTO usage (at, org, user_id, key_id, model, region, node, input_tokens, "
    "output_tokens, latency_ms, status, cost, request_id, cached_tokens) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
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
