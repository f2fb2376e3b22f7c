"""Three routers of one fleet (one PostgreSQL store, one fleet directory; tests/e2e/
shared_fleet.py), each with its own signed audit log and its own member.

An org's requests go through every router; its auditor runs `palisade audit export --fleet`
against router 1 alone, and the set holds all three routers' logs (each signed by its own
router's key) and every serving node's; `palisade audit verify` accepts it with every key
pinned, and a row taken out of another router's export is named. Last, a node revoked
through router 1 is dropped by the router it heartbeats to and by the third within 2 s,
and stays out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from compliance import verify_set
from router._private.postgres import PostgresCluster
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, served_by
from tests.e2e.routers import REGION, shared_store
from tests.e2e.shared_fleet import SharedFleet, shared_fleet
from tests.support import run_palisade, wait_for

ORG = "acme"
PER_ROUTER = 4
ROUTER_IDS = ["router-1", "router-2", "router-3"]


@dataclass
class Evidence:
    fleet: SharedFleet
    served: dict[str, tuple[str, str]]  # request id -> (router asked, node that served)
    path: Path
    keys: list[str]  # the verify flags pinning every router's and every node's key

    def key_of(self, home: Path) -> bytes:
        return bytes.fromhex((home / "node.pub").read_text())

    def problems(self, data: bytes) -> list[str]:
        """The library's verdict with every key pinned (the CLI's is tested first)."""
        routers = [fleet.router.home for fleet in self.fleet.routers]
        pinned = {f"router-{n}": self.key_of(home) for n, home in enumerate(routers, start=1)}
        pinned |= {
            f"node-{n}": self.key_of(fleet.root / f"node-{n}")
            for n, fleet in enumerate(self.fleet.routers, start=1)
        }
        del pinned["router-1"]
        report = verify_set(data, router_key=self.key_of(routers[0]), node_keys=pinned, settle_s=0)
        return report.problems


def ask(url: str, key: str) -> httpx.Response:
    body = {
        "model": UPSTREAM_MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
    }
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresCluster,
) -> Iterator[SharedFleet]:
    root = tmp_path_factory.mktemp("fleet-routers")
    store = shared_store(postgres, root, "fleet_routers_e2e")
    with shared_fleet(root, store) as running:
        yield running


@pytest.fixture(scope="module")
def evidence(fleet: SharedFleet) -> Evidence:
    admin = fleet.routers[0].admin
    admin.create_org(ORG, [REGION])
    user_key = admin.member(ORG, "org_admin", f"owner@{ORG}.test").key
    auditor_key = admin.member(ORG, "org_auditor", f"auditor@{ORG}.test").key
    served = {}
    for router_id, router in zip(ROUTER_IDS, fleet.routers, strict=True):
        for _ in range(PER_ROUTER):
            reply = ask(router.router.url, user_key)
            assert reply.status_code == 200, reply.text
            served[reply.headers["x-request-id"]] = (router_id, served_by(reply)[1])
    path = fleet.routers[0].root.parent / "evidence.json"
    exported = run_palisade(
        "audit", "export", "--org", ORG, "--fleet", "--out", str(path),
        env={"PALISADE_URL": fleet.routers[0].router.url, "PALISADE_API_KEY": auditor_key},
        unset=("PALISADE_HOME",),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert auditor_key not in exported.stdout + exported.stderr
    keys = ["--trusted-key", f"@{fleet.routers[0].router.home / 'node.pub'}"]
    for n, member in enumerate(fleet.routers, start=1):
        if n > 1:
            keys += ["--node-key", f"router-{n}=@{member.router.home / 'node.pub'}"]
        keys += ["--node-key", f"node-{n}=@{member.root / f'node-{n}' / 'node.pub'}"]
    return Evidence(fleet, served, path, keys)


def sources(path: Path) -> dict[str, list[str]]:
    document = json.loads(path.read_bytes())
    return {
        "routers": [item["source"] for item in document["routers"]],
        "nodes": [item["source"] for item in document["nodes"]],
        "format": [document["format"]],
    }


def test_the_set_holds_every_routers_log_and_verifies_as_one(evidence: Evidence) -> None:
    found = sources(evidence.path)
    assert found["format"] == ["palisade-fleet-evidence/2"]
    assert found["routers"] == ["router-2", "router-3"]
    assert set(found["nodes"]) >= {node for _, node in evidence.served.values()}
    done = run_palisade("audit", "verify", str(evidence.path), *evidence.keys, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"], report["problems"]
    assert report["routed"] == len(evidence.served) == PER_ROUTER * len(ROUTER_IDS)
    assert set(report["routers"]) == {"router-2", "router-3"}
    assert all(item["trusted_key_checked"] for item in report["routers"].values())
    assert report["router"]["trusted_key_checked"]
    # Each router's log is signed by its own key, not the fleet's shared one.
    keys = {item["public_key"] for item in report["routers"].values()}
    assert len(keys | {report["router"]["public_key"]}) == len(ROUTER_IDS)


def test_each_routers_requests_are_in_its_own_log_once(evidence: Evidence) -> None:
    document = json.loads(evidence.path.read_bytes())
    logs = {"router-1": document["router"]} | {item["source"]: item for item in document["routers"]}
    for router_id, item in logs.items():
        entries = json.loads(item["export"])["export"]["entries"]
        rows = [json.loads(entry["entry"]) for entry in entries]
        ids = [row["id"] for row in rows if row.get("kind") == "request"]
        mine = {rid for rid, (asked, _) in evidence.served.items() if asked == router_id}
        assert sorted(ids) == sorted(mine)


def test_a_row_taken_out_of_another_routers_export_is_named(evidence: Evidence) -> None:
    request, node = next(
        (rid, node) for rid, (asked, node) in evidence.served.items() if asked == "router-3"
    )
    document = json.loads(evidence.path.read_bytes())
    item = next(item for item in document["routers"] if item["source"] == "router-3")
    export = json.loads(item["export"])
    entries = export["export"]["entries"]
    export["export"]["entries"] = [e for e in entries if request not in e["entry"]]
    assert len(export["export"]["entries"]) == len(entries) - 1
    item["export"] = json.dumps(export)
    problems = evidence.problems(json.dumps(document).encode())
    assert problems[0].startswith("router router-3's export: ")
    assert any(
        p.startswith(f"node {node}'s row")
        and f"claims router request {request}, which the router's log does not hold" in p
        for p in problems
    ), problems
    assert evidence.problems(evidence.path.read_bytes()) == []


def test_one_routers_export_passed_off_as_anothers_is_named(evidence: Evidence) -> None:
    document = json.loads(evidence.path.read_bytes())
    two = next(item for item in document["routers"] if item["source"] == "router-2")
    three = next(item for item in document["routers"] if item["source"] == "router-3")
    three["export"] = two["export"]
    problems = evidence.problems(json.dumps(document).encode())
    assert "router router-3's export is the log of 'router-2', not of 'router-3'" in problems
    assert "the set holds 2 exports of router router-2's log" in problems
    assert any(p.endswith("(router router-2's export, router router-3's export)") for p in problems)


def fleet_view(router: Fleet) -> set[str]:
    return set(router.status())


def test_a_node_revoked_through_one_router_is_dropped_by_every_router(
    fleet: SharedFleet, evidence: Evidence
) -> None:
    """Last: it revokes node-2, which heartbeats to router 2 only."""
    assert all("node-2" in fleet_view(router) for router in fleet.routers)
    fleet.routers[0].admin.ok("POST", "/admin/v1/fleet/nodes/node-2/revoke")
    revoked_at = time.monotonic()
    for router in fleet.routers[1:]:

        def dropped(router: Fleet = router) -> bool:
            return "node-2" not in fleet_view(router)

        wait_for(dropped, timeout=5)
        assert time.monotonic() - revoked_at < 2.0, router.router.url
    assert "revoked through another router" in fleet.routers[1].router.log_text()
    # node-2 keeps trying router 2 (its connection cut, its certificate now refused): it
    # stays out of every router's fleet, and no request reaches it.
    user_key = fleet.routers[0].admin.member(ORG, "org_user", f"late@{ORG}.test").key
    watch_until = time.monotonic() + 3.0
    while time.monotonic() < watch_until:
        for router in fleet.routers:
            assert "node-2" not in fleet_view(router)
            reply = ask(router.router.url, user_key)
            assert reply.status_code == 200, reply.text
            assert served_by(reply)[1] != "node-2"
