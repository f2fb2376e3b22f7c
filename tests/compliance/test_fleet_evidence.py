"""A fleet's evidence checked as one: sets built from real signed logs (a router and three
nodes), and every tamper or disagreement named."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from appliance._private.ledger import fleet_request_of
from compliance import (
    AuditLog,
    Collected,
    FleetReport,
    Scope,
    build_export,
    build_set,
    nodes_to_collect,
    verify_set,
)
from federation import (
    FLEET_POLICY_VIA,
    FLEET_REQUEST_HEADER,
    INTERRUPTED,
    NOT_ROUTED,
    NodeIdentity,
    Principal,
    RequestRecord,
)

ORG = "acme"
REGIONS = {"node-a": "eu-west", "node-b": "eu-west", "node-c": "eu-north"}
LATER = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="milliseconds")


def record(request: str, node: str, **fields: object) -> RequestRecord:
    """A request served by `node` as the router records it."""
    base = RequestRecord(
        id=request,
        org=ORG,
        user="usr_1",
        key_id="key_1",
        model="m",
        region=REGIONS.get(node, NOT_ROUTED),
        node=node,
        input_tokens=12,
        output_tokens=5,
        status="ok",
        tried=[node] if node != NOT_ROUTED else [],
    )
    return msgspec.structs.replace(base, **fields)


def node_row(sent: RequestRecord, node: str, **fields: object) -> RequestRecord:
    """The node's own row for a request the router sent it."""
    own = msgspec.structs.replace(
        sent,
        id=f"chatcmpl-{sent.id[-6:]}-{node}",
        region=REGIONS[node],
        node=node,
        tried=None,
        via="router-1",
        fleet_request=sent.id,
    )
    return msgspec.structs.replace(own, **fields)


@dataclass
class Fleet:
    """What each log will hold; `evidence` writes real signed logs and exports them."""

    router: list[dict[str, object]] = field(default_factory=list)
    nodes: dict[str, list[dict[str, object]]] = field(
        default_factory=lambda: {node: [] for node in REGIONS}
    )

    def served(self, request: str, node: str, *, tried: list[str] | None = None) -> None:
        sent = record(request, node, tried=tried or [node])
        self.router.append(sent.row())
        self.nodes[node].append(node_row(sent, node).row())

    def evidence(self, home: Path, *, taken: str = LATER) -> tuple[bytes, dict[str, bytes]]:
        keys = {}
        exports = {}
        for origin, rows in [("router-1", self.router), *self.nodes.items()]:
            identity = NodeIdentity.load_or_create(home / origin)
            db = home / origin / "audit.db"
            log = AuditLog(db, identity, origin=origin)
            for row in rows:
                log.append({"kind": "request", **row})
            log.append({"kind": "request", **record("other-org", "node-a", org="other").row()})
            log.close()
            exports[origin] = build_export(db, identity, origin=origin, scope=Scope(org=ORG))
            keys[origin] = identity.public_key
        router = Collected("router", taken, exports.pop("router-1"))
        nodes = [Collected(node, taken, data) for node, data in exports.items()]
        return build_set(ORG, router, nodes), {node: keys[node] for node in REGIONS} | {
            "router": keys["router-1"]
        }


def verified(data: bytes, keys: dict[str, bytes]) -> FleetReport:
    router = keys["router"]
    return verify_set(data, router_key=router, node_keys={n: keys[n] for n in REGIONS})


def three_node_fleet() -> Fleet:
    fleet = Fleet()
    fleet.served("route-000000000000000000000001", "node-a")
    fleet.served("route-000000000000000000000002", "node-b")
    fleet.served("route-000000000000000000000003", "node-c")
    # Tried on node-a (busy: a 503, with its own row), then served by node-b.
    sent = record("route-000000000000000000000004", "node-b", tried=["node-a", "node-b"])
    fleet.router.append(sent.row())
    fleet.nodes["node-a"].append(node_row(sent, "node-a", status="overloaded").row())
    fleet.nodes["node-b"].append(node_row(sent, "node-b").row())
    # Refused before any node: the same explicit region and node as usage rows.
    fleet.router.append(record("route-000000000000000000000005", NOT_ROUTED, status="x").row())
    # A local key on node-c, and a fleet key node-c admitted itself and already reported.
    local = record("chatcmpl-local", "node-c", tried=None)
    fleet.nodes["node-c"].append(local.row())
    edge = record("chatcmpl-edge", "node-c", tried=None, via=FLEET_POLICY_VIA)
    fleet.nodes["node-c"].append(edge.row())
    fleet.router.append(msgspec.structs.replace(edge, via=None, edge=True).row())
    return fleet


def edited(data: bytes, source: str, change: Callable[[bytes], bytes]) -> bytes:
    """The set with one export's bytes changed (as an attacker with the file could)."""
    document = json.loads(data)
    items = [document["router"], *document["nodes"]]
    item = next(item for item in items if item["source"] == source)
    item["export"] = change(item["export"].encode()).decode()
    return json.dumps(document).encode()


def without_entry(request: str) -> Callable[[bytes], bytes]:
    def change(export: bytes) -> bytes:
        document = json.loads(export)
        entries = document["export"]["entries"]
        document["export"]["entries"] = [e for e in entries if request not in e["entry"]]
        return json.dumps(document).encode()

    return change


def test_a_consistent_fleet_set_verifies(tmp_path: Path) -> None:
    data, keys = three_node_fleet().evidence(tmp_path)
    report = verified(data, keys)
    assert report.problems == []
    assert report.ok
    assert report.routed == 5  # four routed requests (one seen on two nodes) and the edge row
    assert report.local == 2
    assert set(report.nodes) == set(REGIONS)
    assert all(node.ok and node.entries > 0 for node in report.nodes.values())


def test_the_nodes_to_collect_are_every_node_the_router_named(tmp_path: Path) -> None:
    fleet = Fleet()
    fleet.served("route-000000000000000000000001", "node-b", tried=["node-a", "node-b"])
    data, _ = fleet.evidence(tmp_path)
    router = json.loads(data)["router"]["export"].encode()
    assert nodes_to_collect(router, ORG) == ["node-a", "node-b"]
    assert nodes_to_collect(router, "nobody") == []


def test_a_row_a_node_never_signed_is_named(tmp_path: Path) -> None:
    fleet = three_node_fleet()
    fleet.nodes["node-b"] = [r for r in fleet.nodes["node-b"] if "0002" not in str(r["id"])]
    data, keys = fleet.evidence(tmp_path)
    report = verified(data, keys)
    assert report.problems == [
        "router request route-000000000000000000000002 (status ok, region eu-west, 12+5 "
        "tokens) was served by node node-b, but node node-b's signed log has no row for it"
    ]


def test_a_row_the_router_never_signed_is_named(tmp_path: Path) -> None:
    fleet = three_node_fleet()
    fleet.router = [r for r in fleet.router if r["id"] != "route-000000000000000000000003"]
    data, keys = fleet.evidence(tmp_path)
    [problem] = verified(data, keys).problems
    assert "node node-c's row" in problem
    assert "claims router request route-000000000000000000000003, which the router's log" in (
        problem
    )


def test_a_row_written_as_the_router_export_was_taken_counts_as_in_flight(
    tmp_path: Path,
) -> None:
    fleet = three_node_fleet()
    fleet.router = [r for r in fleet.router if r["id"] != "route-000000000000000000000003"]
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    data, keys = fleet.evidence(tmp_path, taken=now)
    report = verified(data, keys)
    assert report.ok, report.problems
    assert report.in_flight == 1


def test_a_region_the_two_sides_disagree_on_is_named(tmp_path: Path) -> None:
    fleet = three_node_fleet()
    fleet.nodes["node-a"][0]["region"] = "us-east"
    data, keys = fleet.evidence(tmp_path)
    assert verified(data, keys).problems == [
        "router request route-000000000000000000000001 and node node-a's row "
        "chatcmpl-000001-node-a differ: region: router 'eu-west', node 'us-east'"
    ]


def test_tokens_the_two_sides_disagree_on_are_named(tmp_path: Path) -> None:
    fleet = three_node_fleet()
    fleet.nodes["node-c"][0]["output_tokens"] = 500
    data, keys = fleet.evidence(tmp_path)
    [problem] = verified(data, keys).problems
    assert problem.endswith("differ: output_tokens: router 5, node 500")


def test_an_entry_deleted_from_a_nodes_export_is_named_twice(tmp_path: Path) -> None:
    data, keys = three_node_fleet().evidence(tmp_path)
    tampered = edited(data, "node-b", without_entry("route-000000000000000000000002"))
    problems = verified(tampered, keys).problems
    assert problems[0].startswith("node node-b's export: ")  # its signatures fail
    assert "node node-b's signed log has no row for it" in problems[1]
    assert len(problems) == 2


def test_an_entry_deleted_from_the_routers_export_is_named(tmp_path: Path) -> None:
    data, keys = three_node_fleet().evidence(tmp_path)
    tampered = edited(data, "router", without_entry("route-000000000000000000000001"))
    problems = verified(tampered, keys).problems
    assert problems[0].startswith("the router's export: ")
    assert (
        "claims router request route-000000000000000000000001, which the router's log"
        in (problems[1])
    )


def test_a_region_changed_in_an_export_is_named(tmp_path: Path) -> None:
    data, keys = three_node_fleet().evidence(tmp_path)
    tampered = edited(data, "node-c", lambda e: e.replace(b"eu-north", b"eu-west"))
    problems = verified(tampered, keys).problems
    assert problems[0].startswith("node node-c's export: entry ")
    assert "not included in the signed tree" in problems[0]
    assert any("region: router 'eu-north', node 'eu-west'" in p for p in problems)


def test_a_refused_request_without_an_explicit_region_is_named(tmp_path: Path) -> None:
    fleet = three_node_fleet()
    fleet.router[4]["region"] = None
    data, keys = fleet.evidence(tmp_path)
    assert verified(data, keys).problems == [
        "router request route-000000000000000000000005 records region None and node '-': a "
        "request no node served records '-' for both"
    ]


def test_node_rows_the_router_did_not_send_there_are_named(tmp_path: Path) -> None:
    fleet = three_node_fleet()
    sent = record("route-000000000000000000000001", "node-a")
    fleet.nodes["node-b"].append(node_row(sent, "node-b").row())
    vouched = record("chatcmpl-vouched", "node-b", tried=None, via="router-1")
    fleet.nodes["node-b"].append(vouched.row())
    data, keys = fleet.evidence(tmp_path)
    assert verified(data, keys).problems == [
        "node node-b's row chatcmpl-000001-node-b claims router request "
        "route-000000000000000000000001, which the router sent to node-a",
        "node node-b's row chatcmpl-vouched was vouched for by 'router-1' but names no router "
        "request",
    ]


def test_an_export_signed_by_another_key_than_the_pinned_one_is_named(tmp_path: Path) -> None:
    data, keys = three_node_fleet().evidence(tmp_path)
    keys["node-a"] = keys["node-b"]
    [problem] = verified(data, keys).problems
    assert problem.startswith("node node-a's export: the export was signed by key")


def test_a_node_export_missing_from_the_set_is_named(tmp_path: Path) -> None:
    data, keys = three_node_fleet().evidence(tmp_path)
    document = json.loads(data)
    document["nodes"] = [n for n in document["nodes"] if n["source"] != "node-c"]
    problems = verified(json.dumps(document).encode(), keys).problems
    assert problems == [
        "router request route-000000000000000000000003 was served by node node-c, whose "
        "export is not in the set",
        "router request chatcmpl-edge was served by node node-c, whose export is not in the set",
    ]


def test_a_file_that_is_not_a_set_is_refused_with_a_reason(tmp_path: Path) -> None:
    report = verify_set(b'{"format": "palisade-fleet-evidence/1"}')
    assert not report.ok
    assert report.problems[0].startswith("the fleet evidence set is malformed")
    del tmp_path


def test_a_node_takes_the_routers_request_id_only_from_a_router_vouched_caller() -> None:
    sent = {FLEET_REQUEST_HEADER: "route-" + "ab" * 12}
    by_router = Principal(org=ORG, user="u", via="router-1")
    assert fleet_request_of(by_router, sent) == sent[FLEET_REQUEST_HEADER]
    assert fleet_request_of(by_router, {}) is None
    assert fleet_request_of(by_router, {FLEET_REQUEST_HEADER: "route-x\n{}"}) is None
    local = Principal(org=ORG, user="u")
    edge = Principal(org=ORG, user="u", via=FLEET_POLICY_VIA)
    assert fleet_request_of(local, sent) is None
    assert fleet_request_of(edge, sent) is None


def test_a_request_the_router_stopped_during_is_a_note_not_a_difference(tmp_path: Path) -> None:
    fleet = three_node_fleet()
    # The router was killed while node-a served it: recovery wrote its `interrupted` row.
    fleet.router[0] |= {"status": INTERRUPTED, "region": NOT_ROUTED, "node": NOT_ROUTED}
    fleet.router[0] |= {"tried": [], "output_tokens": 0}
    data, keys = fleet.evidence(tmp_path)
    report = verified(data, keys)
    assert report.ok, report.problems
    assert any("route-000000000000000000000001 was interrupted" in n for n in report.notes)


# --- several routers sharing a store: each its own log, one set ---------------------------------


def router_export(home: Path, origin: str, rows: list[dict[str, object]]) -> tuple[bytes, bytes]:
    """Another router's signed export of ORG's rows, and its key."""
    identity = NodeIdentity.load_or_create(home / origin)
    db = home / origin / "audit.db"
    log = AuditLog(db, identity, origin=origin)
    for row in rows:
        log.append({"kind": "request", **row})
    log.close()
    return build_export(db, identity, origin=origin, scope=Scope(org=ORG)), identity.public_key


def two_router_set(
    tmp_path: Path, second_rows: Callable[[list[dict[str, object]]], list[dict[str, object]]]
) -> tuple[bytes, dict[str, bytes]]:
    """Router-1's fleet plus router-2, which sent one request to node-a (the node's row
    for it is in node-a's export); `second_rows` may change router-2's rows first."""
    fleet = three_node_fleet()
    sent = record("route-000000000000000000000201", "node-a")
    fleet.nodes["node-a"].append(node_row(sent, "node-a", via="router-2").row())
    data, keys = fleet.evidence(tmp_path)
    export, key = router_export(tmp_path, "router-2", second_rows([sent.row()]))
    document = json.loads(data)
    nodes = [
        Collected(i["source"], i["collected_at"], i["export"].encode()) for i in document["nodes"]
    ]
    router = Collected("router", LATER, document["router"]["export"].encode())
    return build_set(ORG, router, nodes, [Collected("router-2", LATER, export)]), keys | {
        "router-2": key
    }


def verified_routers(data: bytes, keys: dict[str, bytes]) -> FleetReport:
    pinned = {name: keys[name] for name in [*REGIONS, "router-2"]}
    return verify_set(data, router_key=keys["router"], node_keys=pinned)


def test_a_set_of_two_routers_logs_verifies_as_one(tmp_path: Path) -> None:
    data, keys = two_router_set(tmp_path, lambda rows: rows)
    assert json.loads(data)["format"] == "palisade-fleet-evidence/2"
    report = verified_routers(data, keys)
    assert report.problems == []
    assert set(report.routers) == {"router-2"}
    assert report.routed == 6  # router-1's five and router-2's one
    # Without router-2's log, node-a's row for its request is unexplained.
    alone = verify_set(three_node_fleet().evidence(tmp_path / "alone")[0])
    assert alone.ok
    document = json.loads(data)
    del document["routers"]
    document["format"] = "palisade-fleet-evidence/1"
    problems = verified(json.dumps(document).encode(), keys).problems
    assert problems == [
        "node node-a's row chatcmpl-000201-node-a claims router request "
        "route-000000000000000000000201, which the router's log does not hold"
    ]


def test_a_request_in_two_routers_logs_is_named(tmp_path: Path) -> None:
    request = "route-000000000000000000000001"  # router-1's, claimed by router-2 as well
    data, keys = two_router_set(tmp_path, lambda rows: [*rows, record(request, "node-a").row()])
    problems = verified_routers(data, keys).problems
    assert (
        f"router request {request} is held 2 times (the router's export, router router-2's export)"
    ) in problems


def test_a_set_with_other_routers_labelled_format_1_is_refused(tmp_path: Path) -> None:
    data, keys = two_router_set(tmp_path, lambda rows: rows)
    document = json.loads(data)
    document["format"] = "palisade-fleet-evidence/1"
    problems = verified_routers(json.dumps(document).encode(), keys).problems
    assert problems == ["not a fleet evidence set (format palisade-fleet-evidence/2 expected)"]


def test_the_nodes_to_collect_include_those_other_routers_named(tmp_path: Path) -> None:
    first, _ = router_export(tmp_path, "router-1", [record("r1", "node-a").row()])
    second, _ = router_export(tmp_path, "router-2", [record("r2", "node-c").row()])
    assert nodes_to_collect(first, ORG, second) == ["node-a", "node-c"]
