"""Tenancy for one server: key authentication, the /admin/v1 management API, admission.

The appliance mounts this when it runs standalone; the router will mount the same code
when federated. Every management action is checked against the RBAC matrix in `policy`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath, Parameter

from federation._private import admin_wire as wire
from federation._private.budget_slices import LEASE_S
from federation._private.decoding import decode_request
from federation._private.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
)
from federation._private.gate import Gate
from federation._private.openai_wire import ENCODER
from federation._private.policy import (
    Action,
    allowed,
    effective_mode,
    limits_within,
    narrowest,
    require,
    require_everywhere,
    require_within,
)
from federation._private.principal import Principal
from federation._private.private_files import write_private
from federation._private.scope_headers import ScopeHeaders
from federation._private.store import (
    AuditSink,
    Caller,
    TenancyStore,
    UserRecord,
    key_view,
    org_view,
    user_view,
)

log = logging.getLogger("palisade.federation.admin")

_ORG = msgspec.json.Decoder(wire.OrgCreate)
_INVITE = msgspec.json.Decoder(wire.InviteCreate)
_ACCEPT = msgspec.json.Decoder(wire.InviteAccept)
_KEY = msgspec.json.Decoder(wire.KeyCreate)
_BUDGET = msgspec.json.Decoder(wire.BudgetSet)
_LIMITS = msgspec.json.Decoder(wire.KeyLimits)
_GROUPS = ("model", "user", "region", "node", "day", "org", "key")
# The synthetic prober (`palisade canary`): one user of role `canary` in its own org. Its keys
# are tight: a round asks each region and device class for one token.
CANARY_ORG = "palisade-canary"
CANARY_EMAIL = "canary@local"
CANARY_KEY_FILE = "canary.key"
_CANARY_KEY = wire.KeyCreate(
    name="canary",
    limits=wire.KeyLimits(requests_per_minute=300, tokens_per_minute=60_000, burst=60),
)

# Prometheus's scrape key (`palisade monitor key`): one user of role `monitor` in its own org,
# which may read the scrape targets and node metrics and nothing else.
MONITOR_ORG = "palisade-monitor"
MONITOR_EMAIL = "monitor@local"
_MONITOR_KEY = wire.KeyCreate(name="monitor")
# The orgs the router makes for its own users: nobody else creates them or joins them.
SYSTEM_ORGS = frozenset({CANARY_ORG, MONITOR_ORG})


class Tenancy:
    """Keys, roles, limits, budgets and usage metering for one server."""

    def __init__(
        self,
        home: Path,
        *,
        region: str,
        node: str,
        audit: AuditSink | None = None,
        logging_floor: str = "full",
        database: str | None = None,
        budget_lease_s: float = LEASE_S,
    ) -> None:
        self.home = home
        self.database = database  # a PostgreSQL URL or SQLite path; None: policy.db here
        self.budget_lease_s = budget_lease_s  # of a budget slice, on a shared store
        self.region = region
        self.node = node
        self.logging_floor = logging_floor
        self._audit = audit
        self._store: TenancyStore | None = None
        self._gate: Gate | None = None

    @property
    def store(self) -> TenancyStore:
        if self._store is None:
            raise RuntimeError("Tenancy.start() has not run")
        return self._store

    @property
    def gate(self) -> Gate:
        if self._gate is None:
            raise RuntimeError("Tenancy.start() has not run")
        return self._gate

    async def start(self) -> str | None:
        """Open the policy database; on first start, bootstrap the system admin.

        Returns the new system admin key exactly once (also written 0600 to admin.key).
        """
        self._store = await TenancyStore.open(
            self.home / "policy.db", database=self.database, sink=self._audit
        )
        self._gate = Gate(
            self._store, region=self.region, node=self.node, budget_lease_s=self.budget_lease_s
        )
        await self._gate.start()
        return await self._bootstrap()

    async def close(self) -> None:
        if self._gate is not None:
            await self._gate.stop()
        if self._store is not None:
            await self._store.close()
        self._store = self._gate = None

    async def demo_key(self, regions: list[str] | None = None) -> str:
        """A key for the `demo` org's user (made on first use), kept 0600 in demo.key.

        The demo org may use `regions` (default: this server's own region).
        """
        regions = regions or [self.region]
        store = self.store
        if "demo" not in store.orgs:
            await store.create_org(wire.OrgCreate(name="demo", regions=regions), "system")
        elif store.orgs["demo"].regions != frozenset(regions):
            await store.set_regions("demo", regions, "system")
        path = self.home / "demo.key"
        if path.is_file():
            with contextlib.suppress(AuthenticationError):
                store.authenticate(path.read_text().strip())
                return path.read_text().strip()
        user = next(
            (u for u in store.users.values() if u.email == "demo@local" and u.removed_at is None),
            None,
        ) or await store.add_user("demo@local", "org_user", "demo", "system")
        created = await store.create_key(user, wire.KeyCreate(name="demo"), "system")
        _write_secret(path, created.key)
        return created.key

    async def canary_key(self, regions: Iterable[str]) -> str:
        """The canary's key for this server's own canary, kept 0600 in canary.key (made,
        with the canary user and org, on first use). The org may use `regions`, and keeps
        any it was allowed before."""
        user = await self._canary_user(regions)
        path = self.home / CANARY_KEY_FILE
        if path.is_file():
            with contextlib.suppress(AuthenticationError):
                self.store.authenticate(path.read_text().strip())
                return path.read_text().strip()
        created = await self.store.create_key(user, _CANARY_KEY, "system")
        _write_secret(path, created.key)
        return created.key

    async def new_canary_key(self, regions: Iterable[str], actor: str) -> wire.CreatedKey:
        """Another canary key (shown once), for a canary run elsewhere (`palisade canary`)."""
        return await self.store.create_key(await self._canary_user(regions), _CANARY_KEY, actor)

    async def allow_canary(self, regions: Iterable[str]) -> None:
        """Widen the canary org (when there is one) to `regions`: it probes every region."""
        org = self.store.orgs.get(CANARY_ORG)
        if org is not None and not org.regions.issuperset(regions):
            await self.store.set_regions(CANARY_ORG, org.regions.union(regions), "system")

    async def _canary_user(self, regions: Iterable[str]) -> UserRecord:
        wanted = sorted(set(regions)) or [self.region]
        store = self.store
        if CANARY_ORG not in store.orgs:
            await store.create_org(wire.OrgCreate(name=CANARY_ORG, regions=wanted), "system")
        await self.allow_canary(wanted)
        return next(
            (
                u
                for u in store.users.values()
                if u.role == "canary" and u.org == CANARY_ORG and u.removed_at is None
            ),
            None,
        ) or await store.add_user(CANARY_EMAIL, "canary", CANARY_ORG, "system")

    async def new_monitor_key(self, actor: str) -> wire.CreatedKey:
        """A new key of the monitor user (shown once), made with its org on first use."""
        return await self.store.create_key(await self._monitor_user(), _MONITOR_KEY, actor)

    async def _monitor_user(self) -> UserRecord:
        store = self.store
        if MONITOR_ORG not in store.orgs:
            # An org needs a region; the monitor calls no model in it (its role may not).
            spec = wire.OrgCreate(name=MONITOR_ORG, regions=[self.region])
            await store.create_org(spec, "system")
        return next(
            (
                u
                for u in store.users.values()
                if u.role == "monitor" and u.org == MONITOR_ORG and u.removed_at is None
            ),
            None,
        ) or await store.add_user(MONITOR_EMAIL, "monitor", MONITOR_ORG, "system")

    async def _bootstrap(self) -> str | None:
        key = await self.store.bootstrap_admin()
        if key is None:
            return None
        _write_secret(self.home / "admin.key", key)
        return key

    # --- authentication -----------------------------------------------------------------

    def caller(self, request: Request[Any, Any, Any]) -> Caller:
        header = ScopeHeaders(request).get("authorization")
        if not header:
            raise AuthenticationError(
                "Missing API key. Send `Authorization: Bearer pal-sk-…`.", code="invalid_api_key"
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "Malformed Authorization header; expected `Bearer pal-sk-…`.",
                code="invalid_api_key",
            )
        return self.store.authenticate(token.strip())

    async def admin_caller(self, request: Request[Any, Any, Any]) -> Caller:
        return self.caller(request)

    async def principal(self, request: Request[Any, Any, Any]) -> Principal:
        """The inference principal: org ∩ key regions, refused for roles that may not call."""
        caller = self.caller(request)
        require(caller.user.role, Action.CALL_INFERENCE, actor_org=caller.user.org, target_org=None)
        regions = caller.org.regions
        if caller.key.regions is not None:
            regions = regions & caller.key.regions
        return Principal(
            org=caller.org.name,
            user=caller.user.id,
            key_id=caller.key.id,
            regions=regions,
            role=caller.user.role,
            logging_mode=effective_mode(caller.org.logging_mode, self.logging_floor),
        )

    def routes(self) -> list[HTTPRouteHandler]:
        return _admin_routes(self)


def _write_secret(path: Path, secret: str) -> None:
    """Write a key to a file only its owner can read (0600 before the secret lands)."""
    write_private(path, secret + "\n")


def _json(payload: object, status: int = 200) -> Response[Any]:
    return Response(ENCODER.encode(payload), status_code=status, media_type="application/json")


def _budget(tenancy: Tenancy, org: str) -> wire.Budget:
    record = tenancy.store.org(org)
    month, used, reserved = tenancy.gate.budget_state(org)
    return wire.Budget(
        org=org,
        month=month,
        limit_tokens=record.budget_tokens,
        used_tokens=used,
        reserved_tokens=reserved,
    )


def _scope_org(caller: Caller, requested: str | None, action: Action) -> str | None:
    """The org a read is scoped to: the requested one if allowed, else the caller's own."""
    org = requested if requested is not None else caller.user.org
    if org is None:  # a fleet-wide user naming no org: every org, if its role reaches them
        require_everywhere(caller.user.role, action)
        return None
    require(caller.user.role, action, actor_org=caller.user.org, target_org=org)
    return org


def _admin_routes(tenancy: Tenancy) -> list[HTTPRouteHandler]:  # noqa: PLR0915 - one closure per route
    auth = {"caller": Provide(tenancy.admin_caller)}

    def role(caller: Caller, action: Action, org: str | None) -> None:
        require(caller.user.role, action, actor_org=caller.user.org, target_org=org)

    @post("/admin/v1/orgs", dependencies=auth)
    async def create_org(
        request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        role(caller, Action.MANAGE_ORGS, None)
        spec = decode_request(await request.body(), _ORG)
        if spec.name in SYSTEM_ORGS:
            raise InvalidRequestError(
                f"`{spec.name}` is the name of an org the router makes for its own user.",
                code="invalid_value",
                param="name",
            )
        return _json(await tenancy.store.create_org(spec, caller.user.id), 201)

    @get("/admin/v1/orgs", dependencies=auth)
    async def list_orgs(caller: NamedDependency[Caller]) -> Response[Any]:
        visible = [
            org_view(org)
            for org in tenancy.store.orgs.values()
            if allowed(caller.user.role, Action.MANAGE_ORGS, actor_org=None, target_org=None)
            or org.name == caller.user.org
        ]
        return _json(wire.Listing(data=visible))

    @get("/admin/v1/orgs/{name:str}/budget", dependencies=auth)
    async def get_budget(name: FromPath[str], caller: NamedDependency[Caller]) -> Response[Any]:
        role(caller, Action.VIEW_ORG_USAGE, name)
        return _json(_budget(tenancy, name))

    @put("/admin/v1/orgs/{name:str}/budget", dependencies=auth)
    async def set_budget(
        name: FromPath[str], request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        role(caller, Action.SET_BUDGET, name)
        spec = decode_request(await request.body(), _BUDGET)
        await tenancy.store.set_budget(name, spec.tokens, caller.user.id)
        return _json(_budget(tenancy, name))

    @post("/admin/v1/invites", dependencies=auth)
    async def invite(
        request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        role(caller, Action.MANAGE_USERS, None)  # 403 before the body tells which org
        spec = decode_request(await request.body(), _INVITE)
        if spec.org is None:  # a fleet-wide role: only a role that manages every org's users
            require_everywhere(caller.user.role, Action.MANAGE_USERS)
        else:
            role(caller, Action.MANAGE_USERS, spec.org)
        if spec.org in SYSTEM_ORGS:
            raise PermissionDeniedError(
                f"Org `{spec.org}` holds the router's own user alone; nobody is invited to it.",
                code="permission_denied",
            )
        return _json(await tenancy.store.create_invite(spec, caller.user.id), 201)

    @post("/admin/v1/invites/accept")
    async def accept(request: Request[Any, Any, Any]) -> Response[Any]:
        spec = decode_request(await request.body(), _ACCEPT)
        user, key = await tenancy.store.accept_invite(spec.token, spec.key_name)
        return _json({"user": user_view(user), "key": key}, 201)

    @get("/admin/v1/users", dependencies=auth)
    async def list_users(caller: NamedDependency[Caller], org: str | None = None) -> Response[Any]:
        scope = _scope_org(caller, org, Action.MANAGE_USERS)
        users = [
            user_view(u)
            for u in tenancy.store.users.values()
            if u.removed_at is None and (scope is None or u.org == scope)
        ]
        return _json(wire.Listing(data=users))

    @delete("/admin/v1/users/{user_id:str}", dependencies=auth, status_code=200)
    async def remove_user(user_id: FromPath[str], caller: NamedDependency[Caller]) -> Response[Any]:
        target = tenancy.store.user(user_id)
        role(caller, Action.MANAGE_USERS, target.org or "")
        return _json(user_view(await tenancy.store.remove_user(user_id, caller.user.id)))

    @post("/admin/v1/keys", dependencies=auth)
    async def create_key(
        request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        role(caller, Action.CREATE_KEY, caller.user.org)
        spec = decode_request(await request.body(), _KEY)
        ceiling = narrowest(caller.key.limits, caller.org.key_limits)
        source = "the narrower of the key you are using and your organization's key limits"
        limits = limits_within(spec.limits, ceiling, source=source)
        spec = msgspec.structs.replace(spec, limits=limits)
        return _json(await tenancy.store.create_key(caller.user, spec, caller.user.id), 201)

    @get("/admin/v1/keys", dependencies=auth)
    async def list_keys(
        caller: NamedDependency[Caller],
        org: str | None = None,
        all_orgs: Annotated[bool, Parameter(query="all")] = False,
    ) -> Response[Any]:
        """Own keys by default; `org=X` for an org's keys; `all=true` for every key."""
        keys = tenancy.store.keys.values()
        if all_orgs:
            require_everywhere(caller.user.role, Action.MANAGE_ORG_KEYS)
            found = list(keys)
        elif org is not None:
            role(caller, Action.MANAGE_ORG_KEYS, org)
            found = [k for k in keys if k.org == org]
        else:
            role(caller, Action.MANAGE_OWN_KEYS, caller.user.org)
            found = [k for k in keys if k.user_id == caller.user.id]
        return _json(wire.Listing(data=[key_view(k) for k in found]))

    def may_manage_key(caller: Caller, key_id: str) -> None:
        record = tenancy.store.key(key_id)
        if record.user_id == caller.user.id:
            role(caller, Action.MANAGE_OWN_KEYS, record.org)
        else:
            role(caller, Action.MANAGE_ORG_KEYS, record.org)

    @delete("/admin/v1/keys/{key_id:str}", dependencies=auth, status_code=200)
    async def revoke_key(key_id: FromPath[str], caller: NamedDependency[Caller]) -> Response[Any]:
        may_manage_key(caller, key_id)
        return _json(key_view(await tenancy.store.revoke_key(key_id, caller.user.id)))

    @put("/admin/v1/keys/{key_id:str}/limits", dependencies=auth)
    async def set_limits(
        key_id: FromPath[str], request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        target = tenancy.store.key(key_id)
        role(caller, Action.SET_BUDGET, target.org)
        limits = decode_request(await request.body(), _LIMITS)
        if target.user_id == caller.user.id:  # an admin may not raise their own keys' limits
            require_within(limits, caller.key.limits, source="the limit of the key you are using")
        return _json(key_view(await tenancy.store.set_limits(key_id, limits, caller.user.id)))

    @put("/admin/v1/orgs/{name:str}/key-limits", dependencies=auth)
    async def set_org_key_limits(
        name: FromPath[str], request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        role(caller, Action.SET_BUDGET, name)
        limits = decode_request(await request.body(), _LIMITS)
        return _json(org_view(await tenancy.store.set_key_limits(name, limits, caller.user.id)))

    @get("/admin/v1/usage", dependencies=auth)
    async def usage(
        caller: NamedDependency[Caller],
        *,
        by: str = "model",
        org: str | None = None,
        since: str | None = None,
        until: str | None = None,
        all_orgs: Annotated[bool, Parameter(query="all")] = False,
    ) -> Response[Any]:
        if by not in _GROUPS:
            raise InvalidRequestError(
                f"`by` must be one of {', '.join(_GROUPS)}.", code="invalid_value", param="by"
            )
        scope = _usage_scope(caller, org, all_orgs=all_orgs)
        await tenancy.gate.flush()
        return _json(await tenancy.store.usage_report(by, scope, since, until))

    @get("/admin/v1/usage/records", dependencies=auth)
    async def usage_records(
        caller: NamedDependency[Caller],
        org: str | None = None,
        all_orgs: Annotated[bool, Parameter(query="all")] = False,
    ) -> Response[Any]:
        scope = _usage_scope(caller, org, all_orgs=all_orgs)
        await tenancy.gate.flush()
        return _json(wire.Listing(data=await tenancy.store.usage_records(scope)))

    @get("/admin/v1/audit", dependencies=auth)
    async def audit(caller: NamedDependency[Caller], org: str | None = None) -> Response[Any]:
        scope = _scope_org(caller, org, Action.VIEW_AUDIT)
        return _json(wire.Listing(data=await tenancy.store.audit_events(scope)))

    return [
        create_org,
        list_orgs,
        get_budget,
        set_budget,
        invite,
        accept,
        list_users,
        remove_user,
        create_key,
        list_keys,
        revoke_key,
        set_limits,
        set_org_key_limits,
        usage,
        usage_records,
        audit,
    ]


def _usage_scope(caller: Caller, org: str | None, *, all_orgs: bool) -> str | None:
    """One org's usage, or (`all=true`, or a system admin naming no org) every org's."""
    if all_orgs or (org is None and caller.user.org is None):
        require_everywhere(caller.user.role, Action.VIEW_SYSTEM_USAGE)
        return None
    return _scope_org(caller, org, Action.VIEW_ORG_USAGE)


def announce_admin_key(key: str, home: Path) -> None:
    """Tell the operator where the first-start admin key is: the key itself only on a
    terminal, never to a log or a service manager's journal."""
    path = home / "admin.key"
    if sys.stdout.isatty():
        text = f"Its API key, shown only this once, is also in {path} (mode 0600):\n  {key}"
    else:
        text = f"Its API key is in {path} (mode 0600; not printed, as this is not a terminal)."
    sys.stdout.write(f"\nCreated the system administrator. {text}\n\n")
    sys.stdout.flush()
