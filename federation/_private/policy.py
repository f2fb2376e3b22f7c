"""Role-based access control: the one matrix every management action is checked against.

| action                          | system_admin | auditor | org_admin | org_user | org_auditor | canary | monitor |
|---------------------------------|--------------|---------|-----------|----------|-------------|--------|---------|
| view system-wide usage          | yes          | yes     | no        | no       | no          | no     | no      |
| manage models                   | yes          | no      | no        | no       | no          | no     | no      |
| create/manage organizations     | yes          | no      | no        | no       | no          | no     | no      |
| view org usage                  | any org      | any org | own       | own      | own         | no     | no      |
| invite/remove users             | any org      | no      | own       | no       | no          | no     | no      |
| set org budgets                 | any org      | no      | own       | no       | no          | no     | no      |
| create API key                  | no           | no      | own       | own      | no          | no     | no      |
| view/revoke own keys            | no           | no      | yes       | yes      | no          | no     | no      |
| view/revoke all org keys        | any org      | no      | own       | no       | no          | no     | no      |
| view org audit log              | any org      | any org | own       | no       | own         | no     | no      |
| read sealed request content     | no           | any org | no        | no       | own         | no     | no      |
| call the inference API          | no           | no      | yes       | yes      | no          | yes    | no      |
| view the fleet                  | yes          | no      | no        | no       | no          | yes    | no      |
| read metrics and scrape targets | yes          | no      | no        | no       | no          | no     | yes     |
| enroll/revoke fleet nodes       | yes          | no      | no        | no       | no          | no     | no      |
| pin a request's device class    | no           | no      | no        | no       | no          | own    | no      |

"view org audit log" covers the signed export, its verification and residency reports. The
auditors change nothing: each gets its one API key by accepting its invitation, and an
administrator revokes it. Only they read sealed content (separation of duties: the people
who run the service do not read what its users sent), and every read is itself audited.
The `canary` is the synthetic prober's one user (made by the router, never invited): it calls
the inference API, reads the fleet to know what to probe, and alone may pin a request to one
device class (X-Palisade-Device-Class), so that no tenant can steer its requests off the
operator's order of preference. The `monitor` is Prometheus's one user (made by the router,
never invited; a system admin issues its keys): it reads the scrape targets and each node's
metrics through the router, and nothing else, so that a scrape key on disk leaks no more.
"""  # noqa: E501 - the table is one row per action, one column per role

from __future__ import annotations

from enum import Enum

from federation._private.admin_wire import KeyLimits
from federation._private.errors import PermissionDeniedError
from federation._private.vocabulary import LOGGING_MODES


class Action(Enum):
    VIEW_SYSTEM_USAGE = "view system-wide usage"
    MANAGE_MODELS = "manage models"
    MANAGE_ORGS = "create/manage organizations"
    VIEW_ORG_USAGE = "view org usage"
    MANAGE_USERS = "invite/remove users"
    SET_BUDGET = "set org budgets"
    CREATE_KEY = "create API key"
    MANAGE_OWN_KEYS = "view/revoke own keys"
    MANAGE_ORG_KEYS = "view/revoke all org keys"
    VIEW_AUDIT = "view org audit log"
    READ_CONTENT = "read sealed request content"
    CALL_INFERENCE = "call the inference API"
    VIEW_FLEET = "view the fleet"
    READ_METRICS = "read metrics and scrape targets"
    MANAGE_FLEET = "enroll/revoke fleet nodes"
    PIN_DEVICE_CLASS = "pin a request's device class"


# Per role: the actions allowed in any org ("any"), only in the actor's own org ("own").
_ANY, _OWN = "any", "own"
_MATRIX: dict[str, dict[Action, str]] = {
    "system_admin": {
        Action.VIEW_SYSTEM_USAGE: _ANY,
        Action.MANAGE_MODELS: _ANY,
        Action.MANAGE_ORGS: _ANY,
        Action.VIEW_ORG_USAGE: _ANY,
        Action.MANAGE_USERS: _ANY,
        Action.SET_BUDGET: _ANY,
        Action.MANAGE_ORG_KEYS: _ANY,
        Action.VIEW_AUDIT: _ANY,
        Action.VIEW_FLEET: _ANY,
        Action.READ_METRICS: _ANY,
        Action.MANAGE_FLEET: _ANY,
    },
    "org_admin": {
        Action.VIEW_ORG_USAGE: _OWN,
        Action.MANAGE_USERS: _OWN,
        Action.SET_BUDGET: _OWN,
        Action.CREATE_KEY: _OWN,
        Action.MANAGE_OWN_KEYS: _OWN,
        Action.MANAGE_ORG_KEYS: _OWN,
        Action.VIEW_AUDIT: _OWN,
        Action.CALL_INFERENCE: _OWN,
    },
    "org_user": {
        Action.VIEW_ORG_USAGE: _OWN,
        Action.CREATE_KEY: _OWN,
        Action.MANAGE_OWN_KEYS: _OWN,
        Action.CALL_INFERENCE: _OWN,
    },
    "auditor": {
        Action.VIEW_SYSTEM_USAGE: _ANY,
        Action.VIEW_ORG_USAGE: _ANY,
        Action.VIEW_AUDIT: _ANY,
        Action.READ_CONTENT: _ANY,
    },
    "org_auditor": {
        Action.VIEW_ORG_USAGE: _OWN,
        Action.VIEW_AUDIT: _OWN,
        Action.READ_CONTENT: _OWN,
    },
    "canary": {
        Action.CALL_INFERENCE: _OWN,
        Action.VIEW_FLEET: _ANY,
        Action.PIN_DEVICE_CLASS: _OWN,
    },
    "monitor": {
        Action.READ_METRICS: _ANY,
    },
}


def allowed(role: str, action: Action, *, actor_org: str | None, target_org: str | None) -> bool:
    """Whether `role` may do `action` on `target_org` (None: not org-scoped)."""
    scope = _MATRIX.get(role, {}).get(action)
    if scope == _ANY:
        return True
    return scope == _OWN and (target_org is None or target_org == actor_org)


def require_everywhere(role: str, action: Action) -> None:
    """For actions across every org at once: only roles allowed in any org."""
    if _MATRIX.get(role, {}).get(action) != _ANY:
        raise PermissionDeniedError(
            f"Your role ({role}) may not {action.value} across all organizations.",
            code="permission_denied",
        )


def require(role: str, action: Action, *, actor_org: str | None, target_org: str | None) -> None:
    if not allowed(role, action, actor_org=actor_org, target_org=target_org):
        where = f" in org `{target_org}`" if target_org else ""
        raise PermissionDeniedError(
            f"Your role ({role}) may not {action.value}{where}. Ask an administrator of "
            "that organization.",
            code="permission_denied",
        )


_STRICTNESS: dict[str, int] = {mode: rank for rank, mode in enumerate(LOGGING_MODES)}


def _stricter(org_mode: str, floor: str) -> str:
    return max(org_mode, floor, key=lambda mode: _STRICTNESS.get(mode, 1))


# Every pair of known modes, worked out once: each request asks several times.
_EFFECTIVE: dict[tuple[str, str], str] = {
    (org, floor): _stricter(org, floor) for org in LOGGING_MODES for floor in LOGGING_MODES
}


def effective_mode(org_mode: str, floor: str) -> str:
    """The stricter of an org's logging mode and the node's floor (full < metadata < zero)."""
    return _EFFECTIVE.get((org_mode, floor)) or _stricter(org_mode, floor)


# --- key limits: a key may only narrow the limits it was made under -----------------------

_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "burst")


def effective_limits(limits: KeyLimits) -> KeyLimits:
    """`limits` as admission applies them: a missing `burst` is `requests_per_minute`."""
    burst = limits.burst if limits.burst is not None else limits.requests_per_minute
    return KeyLimits(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        burst=burst,
    )


def narrowest(*limits: KeyLimits) -> KeyLimits:
    """Field by field, the tightest of several effective limits (`None` is unlimited)."""
    effective = [effective_limits(each) for each in limits]

    def tightest(name: str) -> int | None:
        values = [v for each in effective if (v := getattr(each, name)) is not None]
        return min(values, default=None)

    return KeyLimits(**{name: tightest(name) for name in _LIMIT_FIELDS})


def limits_within(requested: KeyLimits | None, ceiling: KeyLimits, *, source: str) -> KeyLimits:
    """A new key's limits: each field it omits inherits `ceiling`'s, none may be wider.

    `source` says where the ceiling comes from, for the 403 `limit_escalation` message.
    """
    cap = effective_limits(ceiling)
    asked = requested or KeyLimits()
    chosen = {
        name: value if (value := getattr(asked, name)) is not None else getattr(cap, name)
        for name in _LIMIT_FIELDS
    }
    if asked.burst is None and asked.requests_per_minute is not None:
        # As admission does, the bucket is as deep as the rate, within the ceiling's depth.
        rate = asked.requests_per_minute
        chosen["burst"] = rate if cap.burst is None else min(rate, cap.burst)
    limits = KeyLimits(**chosen)
    require_within(limits, ceiling, source=source)
    return limits


def require_within(limits: KeyLimits, ceiling: KeyLimits, *, source: str) -> None:
    """403 `limit_escalation` unless every effective limit is at most `ceiling`'s."""
    have, cap = effective_limits(limits), effective_limits(ceiling)
    for name in _LIMIT_FIELDS:
        value, most = getattr(have, name), getattr(cap, name)
        if most is not None and (value is None or value > most):
            asked = "unlimited" if value is None else str(value)
            raise PermissionDeniedError(
                f"`limits.{name}` may be at most {most} ({source}), not {asked}: a key's "
                "limits may only narrow those it is made under. Ask an administrator of your "
                "organization for higher limits.",
                code="limit_escalation",
                param=f"limits.{name}",
            )
