"""A certified node cannot charge usage to orgs it may not serve (real router process, node
identities enrolled with real tokens, mTLS on 127.0.0.1).

Each attacker speaks the fleet protocol itself with a node's certificate and key: us-1
(certified in us-east) asks for a share of an eu-west org's budget and reports rows for it,
for an org that does not exist and for one that left its region; eu-1 replays a row id it
was counted for under another org. Nothing of it is counted, nor written to usage or the
router's audit log, and each refused report is one management audit event. Then the demo
org leaves eu-west (the router restarted with other `--demo-regions`): eu-1's honest rows
made before still count, once.
"""

from __future__ import annotations

import json
import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from compliance import read_entries
from federation import client_context, month_of
from tests.e2e.fleet import Fleet, running_fleet
from tests.support import start_server, wait_for

ORG, FOREIGN, DEMO = "acme", "usco", "demo"
BUDGET = 10_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def identity(fleet: Fleet, node_id: str, region: str) -> ssl.SSLContext:
    """A client context presenting `node_id`'s certificate (enrolled in `region`) and key."""
    home = fleet.enroll(node_id, region)
    return client_context(fleet.ca_path, home / "fleet" / "node.pem", home / "node.key")


def post(fleet: Fleet, as_node: ssl.SSLContext, path: str, body: Any) -> httpx.Response:
    with httpx.Client(verify=as_node, timeout=30) as client:
        return client.post(f"{fleet.fleet_url}{path}", json=body)


def lease(fleet: Fleet, as_node: ssl.SSLContext, org: str) -> httpx.Response:
    return post(fleet, as_node, "/federation/v1/lease", {"org": org, "tokens": 100})


def report(fleet: Fleet, as_node: ssl.SSLContext, *rows: dict[str, Any]) -> dict[str, str]:
    """Send `rows`; the refused ones, by id, with their code (every id must be answered)."""
    response = post(fleet, as_node, "/federation/v1/usage", {"rows": list(rows)})
    assert response.status_code == 200, response.text
    ack = response.json()
    assert sorted(ack["ids"]) == sorted({row["id"] for row in rows})
    return {refusal["id"]: refusal["code"] for refusal in ack["refused"]}


def row(row_id: str, org: str, tokens: int, month: str) -> dict[str, Any]:
    record = {
        "at": f"{month}-01T00:00:00.000+00:00",
        "org": org,
        "user_id": "usr_x",
        "key_id": None,
        "model": "m",
        "region": "eu-west",  # what a node claims; the router records its certified region
        "node": "claimed",
        "input_tokens": tokens,
        "output_tokens": 0,
        "latency_ms": 1.0,
        "status": "ok",
        "cost": 0.0,
        "request_id": row_id,
    }
    audit = {"id": row_id, "org": org, "status": "ok", "input_tokens": tokens}
    return {
        "id": row_id,
        "org": org,
        "month": month,
        "tokens": tokens,
        "status": "ok",
        "record": record,
        "audit": audit,
    }


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def counted(fleet: Fleet, org: str) -> dict[str, tuple[int, str, str]]:
    """The router's usage rows for `org`: tokens, node and region by request id."""
    listing = fleet.admin.ok("GET", "/admin/v1/usage/records", org=org)
    return {
        r["request_id"]: (r["input_tokens"] + r["output_tokens"], r["node"], r["region"])
        for r in listing["data"]
    }


def used(fleet: Fleet, org: str) -> int:
    budget: int = fleet.admin.ok("GET", f"/admin/v1/orgs/{org}/budget")["used_tokens"]
    return budget


def refusal_events(fleet: Fleet) -> list[dict[str, Any]]:
    events = fleet.admin.ok("GET", "/admin/v1/audit")["data"]
    return [event for event in events if event["event"] == "edge_usage_refused"]


def audited_ids(fleet: Fleet) -> set[str]:
    """The request rows in the router's own audit log (rows nodes reported included)."""
    ids: set[str] = set()
    for body in read_entries(fleet.router.home / "audit.db"):
        entry = json.loads(body)
        if entry.get("kind") == "request":
            ids.add(entry["id"])
    return ids


def restart_router(fleet: Fleet, *args: str) -> None:
    fleet.router.stop()
    fleet.router = start_server("router", fleet.root / "router", *args)
    fleet.stack.callback(fleet.router.stop)
    fleet.router.wait_ready(30)


def test_a_certified_node_cannot_charge_orgs_it_may_not_serve(tmp_path: Path) -> None:
    month = month_of(datetime.now(UTC))
    ports = ("--port", str(free_port()), "--fleet-port", str(free_port()))
    with running_fleet(tmp_path, *ports, "--demo-regions", "eu-west") as fleet:
        admin = fleet.admin
        admin.create_org(ORG, ["eu-west"], budget=BUDGET)
        admin.create_org(FOREIGN, ["us-east"])
        eu_1, us_1 = identity(fleet, "eu-1", "eu-west"), identity(fleet, "us-1", "us-east")

        # --- us-1 gets no share of an eu-west org, nor of one that does not exist -----------
        refused = lease(fleet, us_1, ORG)
        assert refused.status_code == 403
        assert error_of(refused)["code"] == "residency_violation"
        assert "us-east" in error_of(refused)["message"]
        unknown = lease(fleet, us_1, "ghost")
        assert (unknown.status_code, error_of(unknown)["code"]) == (404, "org_not_found")

        # --- its rows for them are refused: nothing counted, usage and audit untouched -----
        attack = [row("x1", ORG, 500, month), row("x2", "ghost", 70, month)]
        attack.append(row("x3", DEMO, 9, month))  # demo runs in eu-west only
        assert report(fleet, us_1, *attack) == {
            "x1": "residency_violation",
            "x2": "org_not_found",
            "x3": "residency_violation",
        }
        assert (counted(fleet, ORG), used(fleet, ORG)) == ({}, 0)
        assert counted(fleet, DEMO) == {}
        [event] = refusal_events(fleet)
        assert (event["actor"], event["payload"]["rows"]) == ("node:us-1", 3)
        assert event["payload"]["region"] == "us-east"

        # --- eu-1 serves acme and demo honestly ---------------------------------------------
        granted = lease(fleet, eu_1, ORG)
        assert granted.status_code == 200, granted.text
        assert granted.json()["granted"] > 0
        honest = [row("e1", ORG, 40, month), row("d1", DEMO, 5, month)]
        assert report(fleet, eu_1, *honest) == {}
        # The same id again, for an org eu-1 may not charge and for one it may: once.
        assert report(fleet, eu_1, row("e1", FOREIGN, 40, month)) == {"e1": "residency_violation"}
        assert report(fleet, eu_1, row("e1", DEMO, 40, month)) == {}
        # No such month: the whole report is refused as malformed.
        malformed = post(
            fleet, eu_1, "/federation/v1/usage", {"rows": [row("m1", ORG, 1, "2026-00")]}
        )
        assert (malformed.status_code, error_of(malformed)["param"]) == (400, "rows[0].month")
        # A month before acme existed (never leased there either), and one not yet begun.
        earlier = f"{int(month[:4]) - 1}{month[4:]}"
        later = f"{int(month[:4]) + 1}{month[4:]}"
        assert report(fleet, eu_1, row("e2", ORG, 40, earlier), row("e3", ORG, 40, later)) == {
            "e2": "residency_violation",
            "e3": "month_not_started",
        }
        assert counted(fleet, ORG) == {"e1": (40, "eu-1", "eu-west")}
        assert counted(fleet, DEMO) == {"d1": (5, "eu-1", "eu-west")}
        assert counted(fleet, FOREIGN) == {}
        assert (used(fleet, ORG), used(fleet, FOREIGN)) == (40, 0)

        # --- demo leaves eu-west: eu-1's rows served before still count, once --------------
        restart_router(fleet, *ports, "--demo-regions", "us-east")
        late = [row("d2", DEMO, 6, month), row("d1", DEMO, 5, month)]
        assert report(fleet, eu_1, *late) == {}
        assert report(fleet, us_1, row("u1", DEMO, 3, month)) == {}  # allowed there now
        assert counted(fleet, DEMO) == {
            "d1": (5, "eu-1", "eu-west"),
            "d2": (6, "eu-1", "eu-west"),
            "u1": (3, "us-1", "us-east"),
        }
        assert used(fleet, DEMO) == 14

        events = refusal_events(fleet)
        assert [e["actor"] for e in events] == ["node:us-1", "node:eu-1", "node:eu-1"]
        wait_for(lambda: {"e1", "d1", "d2", "u1"} <= audited_ids(fleet))  # written behind
        assert not {"x1", "x2", "x3", "e2", "e3"} & audited_ids(fleet)
