"""Fleet evidence end to end: a router and three enrolled appliances (real processes, mTLS)
serve an org; its auditor collects the fleet's evidence through the router with the real
CLI and its own key (no appliance key), the set verifies against each signer's pinned key,
and a row deleted from an appliance's export or the router's, or a changed region, is
named. A refused request has the same explicit region in its usage row and its audit row."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from compliance import verify_set
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, running_fleet, served_by, upstream_toml
from tests.support import run_palisade

ORG = "acme"
NODES = {"node-a": "eu-west", "node-b": "eu-west", "node-c": "eu-north"}
REGIONS = ["eu-west", "eu-north", "ap-south"]  # nothing serves ap-south: refusals


@dataclass
class Served:
    fleet: Fleet
    auditor_key: str
    served: dict[str, str]  # request id -> node, for every request answered
    evidence: Path  # the set the auditor collected
    keys: list[str]  # the verify flags pinning the router's and every node's key

    def verify(self, path: Path, *extra: str) -> tuple[int, str]:
        """`palisade audit verify` of a set, as a real process."""
        done = run_palisade("audit", "verify", str(path), *self.keys, *extra)
        return done.returncode, done.stdout + done.stderr

    def problems(self, path: Path) -> list[str]:
        """What the same verification names, in this process (the CLI is tested above)."""
        root = self.fleet.root
        router = bytes.fromhex((self.fleet.router.home / "node.pub").read_text())
        nodes = {node: bytes.fromhex((root / node / "node.pub").read_text()) for node in NODES}
        # The requests ended before the collection started: none of them was in flight.
        report = verify_set(path.read_bytes(), router_key=router, node_keys=nodes, settle_s=0)
        return report.problems


def ask(fleet: Fleet, key: str, region: str, *, stream: bool = False) -> httpx.Response:
    body = {
        "model": UPSTREAM_MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}", "X-Palisade-Regions": region}
    return httpx.post(
        f"{fleet.router.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("fleet-evidence")
    with running_fleet(root) as fleet:
        standin = fleet.standin("upstream")
        for node, region in NODES.items():
            fleet.start_member(node, region, upstream_toml(standin, "cpu"))
        fleet.wait_joined(*NODES)
        user_key = fleet.org_key(ORG, REGIONS)
        auditor_key = fleet.admin.member(ORG, "org_auditor", "auditor@acme.test").key

        asks = [("eu-west", False)] * 10 + [("eu-north", False)] * 3 + [("eu-west", True)] * 3
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda a: ask(fleet, user_key, a[0], stream=a[1]), asks))
        assert [reply.status_code for reply in replies] == [200] * len(asks)
        served = {reply.headers["x-request-id"]: served_by(reply)[1] for reply in replies}
        refusal = ask(fleet, user_key, "ap-south")
        assert refusal.status_code == 503, refusal.text
        assert refusal.json()["error"]["code"] == "no_backend_in_region"

        evidence = root / "evidence.json"
        exported = run_palisade(
            "audit", "export", "--org", ORG, "--fleet", "--out", str(evidence),
            env={"PALISADE_URL": fleet.router.url, "PALISADE_API_KEY": auditor_key},
            unset=("PALISADE_HOME",),
        )  # fmt: skip
        assert exported.returncode == 0, exported.stdout + exported.stderr
        keys = ["--trusted-key", f"@{fleet.router.home / 'node.pub'}"]
        for node in NODES:
            keys += ["--node-key", f"{node}=@{root / node / 'node.pub'}"]
        yield Served(fleet, auditor_key, served, evidence, keys)


def exports(path: Path) -> dict[str, dict[str, object]]:
    """Each export in a set, decoded, by source."""
    document = json.loads(path.read_bytes())
    return {item["source"]: item for item in [document["router"], *document["nodes"]]}


def rows(export: str) -> list[dict[str, object]]:
    entries = json.loads(export)["export"]["entries"]
    found = [json.loads(entry["entry"]) for entry in entries]
    return [row for row in found if row.get("kind") == "request"]


def tampered(served: Served, name: str, source: str, change: Callable[[str], str]) -> Path:
    """A copy of the set with one export's text changed."""
    document = json.loads(served.evidence.read_bytes())
    for item in [document["router"], *document["nodes"]]:
        if item["source"] == source:
            item["export"] = change(item["export"])
    path = served.evidence.with_name(name)
    path.write_text(json.dumps(document))
    return path


def without(request_id_part: str) -> Callable[[str], str]:
    def change(export: str) -> str:
        document = json.loads(export)
        entries = document["export"]["entries"]
        kept = [entry for entry in entries if request_id_part not in entry["entry"]]
        assert len(kept) == len(entries) - 1
        document["export"]["entries"] = kept
        return json.dumps(document)

    return change


def test_the_auditor_collects_a_set_of_every_serving_node_and_it_verifies(
    served: Served,
) -> None:
    collected = exports(served.evidence)
    assert set(collected) == {"router", *served.served.values()}
    assert len(set(served.served.values())) >= 2  # eu-north's node and at least one in eu-west
    code, output = served.verify(served.evidence, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["ok"]
    assert report["problems"] == []
    assert report["routed"] == len(served.served)
    assert report["router"]["trusted_key_checked"]
    assert all(node["trusted_key_checked"] for node in report["nodes"].values())
    # Each node's rows name the router's id for the request the router sent it.
    for source, item in collected.items():
        if source == "router":
            continue
        claimed = {row["fleet_request"] for row in rows(str(item["export"]))}
        assert claimed == {rid for rid, node in served.served.items() if node == source}


def test_a_refused_request_has_the_same_explicit_region_in_usage_and_audit_rows(
    served: Served,
) -> None:
    records = httpx.get(
        f"{served.fleet.router.url}/admin/v1/usage/records",
        params={"org": ORG},
        headers={"Authorization": f"Bearer {served.auditor_key}"},
        timeout=30,
    )
    assert records.status_code == 200, records.text
    [usage] = [r for r in records.json()["data"] if r["status"] == "no_backend_in_region"]
    router_rows = rows(str(exports(served.evidence)["router"]["export"]))
    audited = next(row for row in router_rows if row["id"] == usage["request_id"])
    assert (audited["region"], audited["node"]) == ("-", "-")
    assert (usage["region"], usage["node"]) == ("-", "-")
    assert audited["status"] == "no_backend_in_region"


def test_a_row_deleted_from_an_appliances_export_is_named(served: Served) -> None:
    request, node = next(iter(served.served.items()))
    path = tampered(served, "node-row-deleted.json", node, without(request))
    code, output = served.verify(path)
    assert code == 1
    assert f"node {node}'s export: " in output
    assert f"router request {request} " in output
    assert f"node {node}'s signed log has no row for it" in output


def test_a_row_deleted_from_the_routers_export_is_named(served: Served) -> None:
    request, node = next(iter(served.served.items()))
    path = tampered(served, "router-row-deleted.json", "router", without(f'"id":"{request}"'))
    problems = served.problems(path)
    assert problems[0].startswith("the router's export: ")
    assert f"claims router request {request}, which the router's log does not hold" in problems[1]
    assert problems[1].startswith(f"node {node}'s row")


def test_a_changed_region_is_named(served: Served) -> None:
    node = next(node for node in served.served.values() if NODES[node] == "eu-north")
    path = tampered(served, "region-changed.json", node, lambda e: e.replace("eu-north", "eu-west"))
    problems = served.problems(path)
    assert problems[0].startswith(f"node {node}'s export: ")
    assert any("region: router 'eu-north', node 'eu-west'" in p for p in problems[1:])


def test_the_auditor_cannot_reach_another_orgs_node_evidence(served: Served) -> None:
    node = next(iter(NODES))
    answer = httpx.get(
        f"{served.fleet.router.url}/admin/v1/fleet/nodes/{node}/audit/export",
        params={"org": "other"},
        headers={"Authorization": f"Bearer {served.auditor_key}"},
        timeout=30,
    )
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "permission_denied"
    unknown = httpx.get(
        f"{served.fleet.router.url}/admin/v1/fleet/nodes/nowhere/audit/export",
        params={"org": ORG},
        headers={"Authorization": f"Bearer {served.auditor_key}"},
        timeout=30,
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "node_not_found"


def test_a_node_that_is_down_is_named_not_a_hang(served: Served) -> None:
    """Last: it kills node-c."""
    member = served.fleet.members["node-c"]
    member.process.send_signal(signal.SIGKILL)
    member.process.wait(timeout=10)
    answer = httpx.get(
        f"{served.fleet.router.url}/admin/v1/fleet/nodes/node-c/audit/export",
        params={"org": ORG},
        headers={"Authorization": f"Bearer {served.auditor_key}"},
        timeout=30,
    )
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["code"] == "node_unreachable"
    assert "node-c" in error["message"]
