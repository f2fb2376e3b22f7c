"""The `monitor` role: Prometheus's scrape key reads the scrape targets and each node's
metrics through the router, and nothing else.

On a real fleet (a router, one appliance in front of a stand-in upstream) with a key issued
by `palisade monitor key`: its chat completion is a 403 `permission_denied` that reserves
nothing and reaches no node, pinned or not; every other keyed route the router mounts,
enumerated from the app itself, refuses it the same way; the targets and the node's metrics
answer it. Nobody is invited as the monitor or into its org. A canary key left as
`fleet up --with-prometheus`'s scrape key is replaced.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from compliance import Recorder
from federation import Tenancy, write_private
from router._private.app import create_router_app
from router._private.config import load_router_config
from router._private.local_fleet import MONITORING_DIR, SCRAPE_KEY, _scrape_key
from router._private.prometheus_routes import NODE_METRICS_PATH, SD_PATH
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, running_fleet, upstream_toml
from tests.federation.tenants import Admin
from tests.support import run_palisade

CHAT = "/v1/chat/completions"
MONITOR_ORG = "palisade-monitor"
# What the monitor may read; every other route taking a key refuses it, but for the list of
# organizations, where every user sees its own org (checked below: only the monitor's).
METRICS_ROUTES = {SD_PATH, NODE_METRICS_PATH.replace("{node_id}", "{node_id:str}")}
OWN_ORG_ROUTE = ("GET", "/admin/v1/orgs", ())

Route = tuple[str, str, tuple[tuple[str, object], ...]]  # method, path template, query
_NOT_QUERY = {"request", "caller", "principal", "data"}


def _keyed_routes(home: Path, monkeypatch: pytest.MonkeyPatch) -> list[Route]:
    """Every method of every route the router mounts that takes an API key: the keyed
    ones, and the inference API (its handlers check the key). Built as `palisade router
    serve` builds it, not started."""
    monkeypatch.setenv("PALISADE_HOME", str(home))
    recorder = Recorder(home, origin="routes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Litestar's parameter styles
            app: Litestar
            app, _ = create_router_app(
                load_router_config(None),
                tenancy=Tenancy(home, region="global", node="routes", audit=recorder),
                recorder=recorder,
            )
    finally:
        recorder.close()
    return sorted(
        (method, route.path, _required_query(handler, route.path))
        for route in app.routes
        for handler in getattr(route, "route_handlers", [])
        if {"caller", "principal"} & set(handler.dependencies or {})
        or route.path.startswith("/v1/")
        for method in set(handler.http_methods) - {"HEAD", "OPTIONS"}
    )


def _required_query(handler: Any, path: str) -> tuple[tuple[str, object], ...]:
    """The query parameters a route requires, filled in: a missing one is a 400 first."""
    fields = handler.parsed_fn_signature.parameters.items()
    return tuple(
        (name, 1 if field.annotation is int else "x")
        for name, field in fields
        if name not in _NOT_QUERY and f"{{{name}:" not in path and not field.has_default
    )


def _fill(path: str, ids: dict[str, str]) -> str:
    """A path template with real ids, so that only the role can refuse the request."""

    def value(match: re.Match[str]) -> str:
        assert match["name"] in ids, f"no test value for `{match['name']}` in {path}"
        return ids[match["name"]]

    return re.sub(r"\{(?P<name>\w+)(:\w+)?\}", value, path)


def _monitor(fleet: Fleet) -> Admin:
    issued = run_palisade(
        "monitor", "key", "--url", fleet.router.url, "--key", fleet.admin.key, "--json"
    )
    assert issued.returncode == 0, issued.stderr
    created = json.loads(issued.stdout)
    assert created["info"]["org"] == MONITOR_ORG
    return Admin(fleet.router.url, created["key"])


def _refused(answer: httpx.Response) -> bool:
    return answer.status_code == 403 and answer.json()["error"]["code"] == "permission_denied"


def test_a_monitor_key_reads_the_metrics_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = _keyed_routes(tmp_path / "routes", monkeypatch)
    seen = {(method, path) for method, path, _ in routes}
    assert ("POST", CHAT) in seen  # the enumeration sees the API, the admin and fleet routes
    assert ("GET", "/admin/v1/usage") in seen
    assert ("GET", "/federation/v1/fleet") in seen
    with running_fleet(tmp_path) as fleet:
        fleet.start_member("eu-1", "eu-west", upstream_toml(fleet.standin("eu-1"), "cpu"))
        fleet.wait_joined("eu-1")
        tenant_key = fleet.org_key("acme", ["eu-west"])
        tenant = fleet.admin.ok("GET", "/admin/v1/keys", org="acme")["data"][0]
        monitor = _monitor(fleet)

        # Its chat completion, pinned or not, is refused before admission: no node sees it.
        body = {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}]}
        for pin in ({}, {"X-Palisade-Device-Class": "cpu"}):
            answer = httpx.post(
                fleet.router.url + CHAT,
                json=body,
                headers={"Authorization": f"Bearer {monitor.key}", **pin},
                timeout=30,
            )
            assert _refused(answer), answer.text
        assert fleet.standins["eu-1"].stats()["requests"].get(CHAT, 0) == 0
        budget = fleet.admin.ok("GET", f"/admin/v1/orgs/{MONITOR_ORG}/budget")
        assert (budget["used_tokens"], budget["reserved_tokens"]) == (0, 0)

        # Every other keyed route refuses it: usage, keys, audit, the fleet, key issuing...
        ids = {
            "name": "acme",
            "user_id": tenant["user_id"],
            "key_id": tenant["id"],
            "model_id": UPSTREAM_MODEL,
            "node_id": "eu-1",
            "rollout_id": "rollout-1",
            "request_id": "req-1",
            "router_id": "router",
        }
        answers: dict[Route, httpx.Response] = {
            (method, path, query): monitor.call(
                method,
                _fill(path, ids),
                None if method in {"GET", "DELETE"} else {},
                **dict(query),
            )
            for method, path, query in routes
            if path not in METRICS_ROUTES and (method, path, query) != OWN_ORG_ROUTE
        }
        allowed = {
            route: f"{a.status_code} {a.text[:120]}"
            for route, a in answers.items()
            if not _refused(a)
        }
        assert allowed == {}
        assert OWN_ORG_ROUTE in routes
        own = monitor.ok(*OWN_ORG_ROUTE[:2])["data"]
        assert [org["name"] for org in own] == [MONITOR_ORG]
        # Nothing it tried changed anything: the tenant's key still calls the model.
        served = httpx.post(
            fleet.router.url + CHAT,
            json=body,
            headers={"Authorization": f"Bearer {tenant_key}"},
            timeout=30,
        )
        assert served.status_code == 200, served.text

        # What it is for: the targets, and each node's metrics through the router.
        targets = monitor.ok("GET", SD_PATH)
        nodes = [group for group in targets if group["labels"]["palisade_role"] == "node"]
        assert [group["labels"]["node"] for group in nodes] == ["eu-1"]
        scraped = monitor.call("GET", nodes[0]["labels"]["__metrics_path__"])
        assert scraped.status_code == 200, scraped.text
        assert 'palisade_requests_total{endpoint="/v1/chat/completions"' in scraped.text

        # The router's own series name orgs (budget use) only to a key that may read them.
        fleet.admin.ok("PUT", "/admin/v1/orgs/acme/budget", {"tokens": 1_000_000})
        budget_series = 'palisade_org_budget_used_ratio{org="acme"}'
        assert budget_series in monitor.call("GET", "/metrics").text
        anonymous = httpx.get(fleet.router.url + "/metrics", timeout=30)
        assert anonymous.status_code == 200
        assert "palisade_router_requests_total" in anonymous.text
        assert "acme" not in anonymous.text
        as_tenant = httpx.get(
            fleet.router.url + "/metrics",
            headers={"Authorization": f"Bearer {tenant_key}"},
            timeout=30,
        )
        assert _refused(as_tenant), as_tenant.text


def test_the_monitor_and_its_org_take_no_invitation_and_a_canary_scrape_key_is_replaced(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        fleet.admin.create_org("acme", ["eu-west"])
        for org in ("acme", MONITOR_ORG):
            invite = {"email": "prom@acme.test", "role": "monitor", "org": org}
            answer = fleet.admin.call("POST", "/admin/v1/invites", invite)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["param"] == "role"
        canary: dict[str, Any] = fleet.admin.ok("POST", "/federation/v1/canary/keys")
        refused = Admin(fleet.router.url, canary["key"]).call("GET", SD_PATH)
        assert _refused(refused), refused.text

        # `fleet up --with-prometheus` finds an earlier run's canary scrape key: it issues a
        # monitor key in its place, then keeps that one.
        home = tmp_path / "home"
        scrape_key = home / MONITORING_DIR / SCRAPE_KEY
        write_private(scrape_key, canary["key"] + "\n")
        with httpx.Client(timeout=30) as client:
            assert _scrape_key(client, home, fleet.router.url, fleet.admin.key) == scrape_key
            replaced = scrape_key.read_text().strip()
            assert _scrape_key(client, home, fleet.router.url, fleet.admin.key) == scrape_key
        assert scrape_key.read_text().strip() == replaced != canary["key"]
        assert scrape_key.stat().st_mode & 0o777 == 0o600
        monitor = Admin(fleet.router.url, replaced)
        assert monitor.call("GET", SD_PATH).status_code == 200
        assert [org["name"] for org in monitor.ok("GET", "/admin/v1/orgs")["data"]] == [MONITOR_ORG]

        # The router's own orgs take nobody else, and nobody makes one before it does.
        for org in (MONITOR_ORG, "palisade-canary"):
            invite = {"email": "someone@acme.test", "role": "org_user", "org": org}
            joined = fleet.admin.call("POST", "/admin/v1/invites", invite)
            assert _refused(joined), joined.text
            created = fleet.admin.call("POST", "/admin/v1/orgs", {"name": org, "regions": ["x"]})
            assert created.status_code == 400, created.text
            error = created.json()["error"]
            assert (error["code"], error["param"]) == ("invalid_value", "name")  # not org_exists
