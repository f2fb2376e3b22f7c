"""The read-only auditors: `org_auditor` (one org) and `auditor` (every org).

The matrix cells are checked in-process; the routes on one real appliance (tenancy on, a
scripted engine) and one real router: the auditors read usage and export evidence that
verifies, and every write route each app mounts, enumerated from the app itself, answers
them 403.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from appliance._private.app import create_app
from appliance._private.config import load_appliance_config
from compliance import Recorder, verify_export
from federation import USER_ROLES, Action, Tenancy, allowed
from federation._private import policy
from router._private.app import create_router_app
from router._private.config import load_router_config
from tests.federation.tenants import (
    BACKENDS,
    Admin,
    Member,
    admin_of,
    database_toml,
    policy_database,
)
from tests.support import Appliance, run_appliance, run_palisade, start_server

ORG, OTHER, MODEL = "acme", "globex", "echo"
CONFIG = (
    'region = "eu-west"\n'
    f'[[models]]\nengine = "scripted"\nid = "{MODEL}"\nreplies = ["hello from echo"]\n'
)
READ_ONLY = {"GET", "HEAD", "OPTIONS"}
AUDITORS = ("auditor", "org_auditor")

# What each auditor may do, and where; every other cell of theirs is "no".
AUDITOR_CELLS: dict[str, dict[Action, str]] = {
    "auditor": {
        Action.VIEW_SYSTEM_USAGE: "any",
        Action.VIEW_ORG_USAGE: "any",
        Action.VIEW_AUDIT: "any",
        Action.READ_CONTENT: "any",
    },
    "org_auditor": {
        Action.VIEW_ORG_USAGE: "own",
        Action.VIEW_AUDIT: "own",
        Action.READ_CONTENT: "own",
    },
}


# --- the matrix -----------------------------------------------------------------------------


def _docstring_table() -> dict[str, dict[str, str]]:
    """policy.py's table: action text -> role -> cell."""
    lines = [line for line in (policy.__doc__ or "").splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return table


def test_the_documented_table_is_the_matrix_cell_for_cell() -> None:
    table = _docstring_table()
    assert set(table) == {action.value for action in Action}
    for action in Action:
        assert set(table[action.value]) == set(USER_ROLES)
        for role, cell in table[action.value].items():
            scope = policy._MATRIX.get(role, {}).get(action)
            expected = {"no": None, "any org": "any", "own": "own"}.get(cell, scope or "absent")
            assert scope == expected, f"{role} / {action.value}: documented {cell}, is {scope}"


def test_the_tenants_guide_table_is_the_documented_one() -> None:
    """docs/tenants.md's "Who may do what": the docstring's roles and cells, row by row (its
    action column may say more, e.g. the command)."""
    guide = Path(__file__).resolve().parents[2] / "docs" / "tenants.md"
    section = guide.read_text().split("## Who may do what", 1)[1]
    lines = [line for line in section.split("\n\n", 2)[1].splitlines() if line.startswith("|")]
    rows = [re.split(r"(?<!\\)\|", line.strip("|")) for line in lines]
    header = [cell.strip() for cell in rows[0]]
    documented = _docstring_table()
    assert header[1:] == list(next(iter(documented.values())))
    assert [[cell.strip() for cell in row[1:]] for row in rows[2:]] == [
        list(cells.values()) for cells in documented.values()
    ]


@pytest.mark.parametrize("action", list(Action), ids=lambda action: action.name)
@pytest.mark.parametrize("role", AUDITORS)
def test_an_auditor_cell(role: str, action: Action) -> None:
    own = ORG if role == "org_auditor" else None
    scope = AUDITOR_CELLS[role].get(action)
    assert allowed(role, action, actor_org=own, target_org=ORG) == (scope is not None)
    assert allowed(role, action, actor_org=own, target_org=OTHER) == (scope == "any")


@pytest.mark.parametrize("role", ["system_admin", "org_admin", "org_user"])
def test_only_the_auditors_read_sealed_content(role: str) -> None:
    assert not allowed(role, Action.READ_CONTENT, actor_org=ORG, target_org=ORG)
    assert not allowed(role, Action.READ_CONTENT, actor_org=None, target_org=None)


# --- on a real appliance ----------------------------------------------------------------------


@dataclass
class Tenants:
    appliance: Appliance
    admin: Admin
    members: dict[str, Member]  # by role (org roles in ORG), and "other_auditor" (in OTHER)

    def as_(self, name: str) -> Admin:
        return self.admin.as_member(self.members[name])


@pytest.fixture(scope="module", params=BACKENDS)
def tenants(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Tenants]:
    """The auditors' world on an appliance, on each policy store (SQLite, PostgreSQL)."""
    database = policy_database(request, request.param)
    config = database_toml(database) + CONFIG
    with run_appliance(tmp_path_factory.mktemp(f"auditors-{request.param}"), config) as appliance:
        admin = admin_of(appliance)
        for org in (ORG, OTHER):
            admin.ok("POST", "/admin/v1/orgs", {"name": org, "regions": ["eu-west"]})
        members = {
            role: admin.member(ORG, role, f"{role}@acme.example")
            for role in ("org_admin", "org_user", "org_auditor")
        }
        members["auditor"] = _fleet_auditor(admin)
        members["other_auditor"] = admin.member(OTHER, "org_auditor", "auditor@globex.example")
        chat = httpx.post(
            f"{appliance.v1}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {members['org_user'].key}"},
            timeout=30,
        )
        assert chat.status_code == 200, chat.text
        yield Tenants(appliance, admin, members)


def _fleet_auditor(admin: Admin) -> Member:
    invite = admin.ok("POST", "/admin/v1/invites", {"email": "a@audit.example", "role": "auditor"})
    assert invite["org"] is None
    accepted = httpx.post(
        f"{admin.url}/admin/v1/invites/accept", json={"token": invite["token"]}, timeout=30
    )
    assert accepted.status_code == 201, accepted.text
    data = accepted.json()
    assert data["user"]["org"] is None
    assert data["user"]["role"] == "auditor"
    return Member(
        data["user"]["id"], data["key"]["key"], data["key"]["info"]["id"], None, "auditor"
    )


def _app_routes(home: Path) -> Litestar:
    """The app as the appliance builds it (not started): what it mounts is what we check."""
    config_file = home / "appliance.toml"
    config_file.write_text(CONFIG)
    recorder = Recorder(home, origin="routes")
    try:
        with warnings.catch_warnings():
            # Building the routes warns of Litestar's deprecated parameter styles.
            warnings.simplefilter("ignore", DeprecationWarning)
            app, _ = create_app(
                load_appliance_config(config_file),
                tenancy=Tenancy(home, region="eu-west", node="routes"),
                recorder=recorder,
            )
    finally:
        recorder.close()
    return app


def _router_routes(home: Path, monkeypatch: pytest.MonkeyPatch) -> Litestar:
    """The router's app as `palisade router serve` builds it (not started)."""
    monkeypatch.setenv("PALISADE_HOME", str(home))
    recorder = Recorder(home, origin="routes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            app, _ = create_router_app(
                load_router_config(None),
                tenancy=Tenancy(home, region="global", node="routes", audit=recorder),
                recorder=recorder,
            )
    finally:
        recorder.close()
    return app


Route = tuple[str, str, tuple[tuple[str, object], ...]]  # method, path template, query
_NOT_QUERY = {"request", "caller", "principal", "data"}


def _write_routes(app: Litestar) -> list[Route]:
    """Every route that changes something and takes an API key: the keyed ones, and the
    inference API (the router checks its key in the handler). The fleet's own routes take a
    node certificate or an enrollment token, never a key. Each with its required query
    parameters filled in, so that nothing but the role can refuse the request."""
    return sorted(
        (method, route.path, _required_query(handler, route.path))
        for route in app.routes
        for handler in getattr(route, "route_handlers", [])
        if {"caller", "principal"} & set(handler.dependencies or {})
        or route.path.startswith("/v1/")
        for method in set(handler.http_methods) - READ_ONLY
    )


def _required_query(handler: Any, path: str) -> tuple[tuple[str, object], ...]:
    fields = handler.parsed_fn_signature.parameters.items()
    return tuple(
        (name, 1 if field.annotation is int else "x")
        for name, field in fields
        if name not in _NOT_QUERY and f"{{{name}:" not in path and not field.has_default
    )


def _fill(path: str, tenants: Tenants) -> str:
    """A path template with real ids: a missing id would be a 404 before the role check."""
    values = {
        "name": ORG,
        "user_id": tenants.members["org_user"].user_id,
        "key_id": tenants.members["org_user"].key_id,
        "model_id": MODEL,
        "node_id": "node-1",
        "rollout_id": "rollout-1",
    }

    def value(match: re.Match[str]) -> str:
        name = match["name"]
        assert name in values, f"no test value for path parameter `{name}` in {path}"
        return values[name]

    return re.sub(r"\{(?P<name>\w+)(:\w+)?\}", value, path)


def _refusals(tenants: Tenants, role: str, routes: list[Route]) -> dict[Route, str]:
    """Each route the auditor was not refused with 403 `permission_denied`, and its answer."""
    auditor = tenants.as_(role)
    answers = {
        route: auditor.call(
            route[0],
            _fill(route[1], tenants),
            None if route[0] == "DELETE" else {},
            **dict(route[2]),
        )
        for route in routes
    }
    return {
        route: f"{answer.status_code} {answer.text[:200]}"
        for route, answer in answers.items()
        if answer.status_code != 403 or answer.json()["error"]["code"] != "permission_denied"
    }


@pytest.mark.parametrize("role", AUDITORS)
def test_an_auditor_gets_403_on_every_write_route(
    tenants: Tenants, role: str, tmp_path: Path
) -> None:
    routes = _write_routes(_app_routes(tmp_path))
    assert ("POST", "/admin/v1/orgs", ()) in routes  # the enumeration sees the admin routes
    assert ("POST", "/v1/chat/completions", ()) in routes
    assert _refusals(tenants, role, routes) == {}
    # Nothing changed: the key it could have revoked still works.
    assert tenants.as_("org_user").call("GET", "/admin/v1/keys").status_code == 200


@pytest.fixture(scope="module", params=BACKENDS)
def router_tenants(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Tenants]:
    """The auditors on a router, on each policy store (SQLite, PostgreSQL)."""
    database = policy_database(request, request.param)
    extra = () if database is None else ("--database", database)
    router = start_server("router", tmp_path_factory.mktemp(f"router-{request.param}"), *extra)
    try:
        router.wait_ready(60)
        admin = admin_of(router)
        admin.ok("POST", "/admin/v1/orgs", {"name": ORG, "regions": ["eu-west"]})
        members = {
            role: admin.member(ORG, role, f"{role}@acme.example")
            for role in ("org_user", "org_auditor")
        }
        members["auditor"] = _fleet_auditor(admin)
        yield Tenants(router, admin, members)
    finally:
        router.stop()


@pytest.mark.parametrize("role", AUDITORS)
def test_an_auditor_gets_403_on_every_write_route_of_the_router(
    router_tenants: Tenants, role: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = _write_routes(_router_routes(tmp_path, monkeypatch))
    assert ("POST", "/admin/v1/fleet/tokens", ()) in routes
    assert ("POST", "/v1/chat/completions", ()) in routes
    assert _refusals(router_tenants, role, routes) == {}
    auditor = router_tenants.as_(role)
    assert auditor.call("GET", "/admin/v1/audit/export", org=ORG).status_code == 200


@pytest.mark.parametrize("role", AUDITORS)
def test_an_auditor_reads_usage_and_the_audit_log(tenants: Tenants, role: str) -> None:
    auditor = tenants.as_(role)
    usage = auditor.ok("GET", "/admin/v1/usage", org=ORG, by="user")
    assert sum(row["requests"] for row in usage["rows"]) >= 1
    records = auditor.ok("GET", "/admin/v1/usage/records", org=ORG)["data"]
    assert {record["org"] for record in records} == {ORG}
    events = auditor.ok("GET", "/admin/v1/audit", org=ORG)["data"]
    assert "user_joined" in {event["event"] for event in events}
    residency = auditor.ok("GET", "/admin/v1/audit/residency", org=ORG)
    assert residency["export"]["org"] == ORG


def test_the_org_auditor_reads_nothing_of_another_org(tenants: Tenants) -> None:
    auditor = tenants.as_("org_auditor")
    for path in ("/admin/v1/usage", "/admin/v1/audit", "/admin/v1/audit/export"):
        answer = auditor.call("GET", path, org=OTHER)
        assert answer.status_code == 403, (path, answer.text)
    everything = auditor.call("GET", "/admin/v1/audit/export")
    assert everything.status_code == 403
    assert auditor.call("GET", "/admin/v1/usage", all="true").status_code == 403


def test_the_fleet_auditor_reads_every_org(tenants: Tenants) -> None:
    auditor = tenants.as_("auditor")
    records = auditor.ok("GET", "/admin/v1/usage/records", all="true")["data"]
    assert ORG in {record["org"] for record in records}
    assert auditor.ok("GET", "/admin/v1/usage/records")["data"] == records  # no org: every org
    export = auditor.call("GET", "/admin/v1/audit/export")
    assert export.status_code == 200
    trusted = bytes.fromhex((tenants.appliance.home / "node.pub").read_text().strip())
    report = verify_export(export.content, trusted_key=trusted)
    assert report.ok, report.problem
    assert auditor.ok("GET", "/admin/v1/audit/export", org=OTHER)["export"]["scope"]["org"] == OTHER


def test_the_org_auditor_exports_and_verifies_with_the_cli(
    tenants: Tenants, tmp_path: Path
) -> None:
    out = tmp_path / "acme.json"
    key = tenants.members["org_auditor"].key
    env = {"PALISADE_URL": tenants.appliance.url, "PALISADE_API_KEY": key}
    exported = run_palisade("audit", "export", "--org", ORG, "--out", str(out), env=env)
    assert exported.returncode == 0, exported.stderr
    node_key = tenants.appliance.home / "node.pub"
    verified = run_palisade("audit", "verify", str(out), "--trusted-key", f"@{node_key}")
    assert verified.returncode == 0, verified.stderr


def test_who_may_invite_an_auditor(tenants: Tenants) -> None:
    org_admin = tenants.as_("org_admin")
    fleet_wide = org_admin.call(
        "POST", "/admin/v1/invites", {"email": "x@a.example", "role": "auditor"}
    )
    assert fleet_wide.status_code == 403
    own = {"email": "y@a.example", "role": "org_auditor", "org": ORG}
    assert org_admin.call("POST", "/admin/v1/invites", own).status_code == 201
    other = {"email": "z@a.example", "role": "org_auditor", "org": OTHER}
    assert org_admin.call("POST", "/admin/v1/invites", other).status_code == 403
    for body in (
        {"email": "w@a.example", "role": "auditor", "org": ORG},
        {"email": "v@a.example", "role": "org_auditor"},
    ):
        answer = tenants.admin.call("POST", "/admin/v1/invites", body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "org"


def test_the_cli_invites_the_fleet_wide_auditor(tenants: Tenants) -> None:
    env = {"PALISADE_URL": tenants.appliance.url, "PALISADE_API_KEY": tenants.admin.key}
    invited = run_palisade("user", "invite", "cli@audit.example", "--role", "auditor", env=env)
    assert invited.returncode == 0, invited.stderr
    assert "to every organization as auditor" in invited.stdout
    no_org = run_palisade("user", "invite", "c2@audit.example", "--role", "org_auditor", env=env)
    assert no_org.returncode == 1
    assert "names the organization to join" in no_org.stderr
