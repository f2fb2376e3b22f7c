"""A fleet's evidence for one org, checked as one: the router's signed export and the signed
export of every node the router sent the org's requests to.

The router's log holds a row per request it settled (the node that served it, every node
it tried, the tokens and the region); each node's log holds a row per request it admitted,
with the router's request id (`fleet_request`) when the router sent it. The set holds each
export's bytes as they were downloaded, each signed by its own key, and `verify_set` checks
every export alone (`verify_export`) and then the two sides against each other:

- every request the router says node N served appears in N's log under the same request id,
  with the same tokens and region (requests that ended otherwise: same region, if present);
- every row of N for the org was sent by the router (the router's row names N among the
  nodes it tried, or the router stopped before it recorded where the request went: a note),
  or came from a local key, or from a fleet key N admitted itself;
- a request no node served carries `NOT_ROUTED` as its region and node.

Several routers sharing one store (and one fleet directory) each keep their own log,
signed by their own key. Their set (format `palisade-fleet-evidence/2`) holds, besides the
export of the router that was asked (`router`), every other live router's export of the
org (`routers`, each under its router id). `verify_set` then checks each router's export
alone, that each is a different router's log (its `origin` is its source, no router twice),
and that each router request is in exactly one router's log once; the nodes' rows are
compared against every router's rows together (a node serves whichever router sent it the
request). A set of one router keeps format /1, as before.

Every difference is named, not only the first. A node row for a router request that settled
after the router's export was taken (within `SETTLE_S` of it; of the earliest router export,
with several routers) is counted as in flight, not as a difference: collect again to compare
it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from compliance._private.export import Report, verify_export
from federation import FLEET_POLICY_VIA, INTERRUPTED, NOT_ROUTED

FLEET_FORMAT = "palisade-fleet-evidence/1"
ROUTERS_FORMAT = "palisade-fleet-evidence/2"  # with the exports of the other routers
# How long after a node wrote a request's row the router may still be writing its own.
SETTLE_S = 2.0
_ROUTER = "the router's export"

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Collected:
    """One export as downloaded: whose log it is (`router` for the router asked, another
    router's id, or a node id) and when."""

    source: str
    collected_at: str  # ISO 8601, the collector's clock when the export arrived
    export: bytes


class FleetSetError(Exception):
    """The file is not a fleet evidence set (the message says why)."""


@dataclass
class FleetReport:
    """The outcome: `problems` names every difference found (empty when the set holds)."""

    org: str = ""
    router: Report | None = None
    routers: dict[str, Report] = field(default_factory=dict)  # the other routers', by id
    nodes: dict[str, Report] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    routed: int = 0  # router requests matched to a node's row
    local: int = 0  # node rows from local keys or fleet keys the node admitted itself
    in_flight: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


# --- building ----------------------------------------------------------------------------------


def build_set(
    org: str,
    router: Collected,
    nodes: Iterable[Collected],
    routers: Iterable[Collected] = (),
) -> bytes:
    """The set file: each export's bytes kept as they are (as text: exports are UTF-8).
    `routers`: the other routers' exports (sources: their router ids), if any."""
    others = sorted(routers, key=lambda item: item.source)
    document: dict[str, Any] = {
        "format": ROUTERS_FORMAT if others else FLEET_FORMAT,
        "org": org,
        "router": _item(router),
    }
    if others:
        document["routers"] = [_item(other) for other in others]
    document["nodes"] = [_item(node) for node in sorted(nodes, key=lambda item: item.source)]
    return json.dumps(document, ensure_ascii=False, indent=1).encode() + b"\n"


def _item(collected: Collected) -> dict[str, str]:
    return {
        "source": collected.source,
        "collected_at": collected.collected_at,
        "export": collected.export.decode(),
    }


def nodes_to_collect(router_export: bytes, org: str, *others: bytes) -> list[str]:
    """The nodes the routers' rows for `org` name: the ones that served and the ones tried."""
    named: set[str] = set()
    rows = [row for export in (router_export, *others) for row in request_rows(export, org)]
    for row in rows:
        named.update(str(node) for node in row.get("tried") or [])
        if row.get("node") not in {None, NOT_ROUTED}:
            named.add(str(row["node"]))
    return sorted(named)


def request_rows(export: bytes, org: str) -> list[Row]:
    """The request rows of `org` in an export (none when it cannot be read)."""
    return _rows(_document(export), org)


def _document(export: bytes) -> dict[str, Any]:
    """An export's signed document, or {} when it cannot be read (its verification says
    why)."""
    try:
        document = json.loads(export)["export"]
    except (ValueError, KeyError, TypeError):
        return {}
    return document if isinstance(document, dict) else {}


def _rows(document: dict[str, Any], org: str) -> list[Row]:
    try:
        rows = [json.loads(item["entry"]) for item in document.get("entries") or []]
    except (ValueError, KeyError, TypeError):
        return []
    return [
        row
        for row in rows
        if isinstance(row, dict) and row.get("kind") == "request" and row.get("org") == org
    ]


# --- reading -----------------------------------------------------------------------------------


def is_fleet_set(data: bytes) -> bool:
    """Whether `data` claims to be a fleet evidence set (rather than a single export)."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("format") in {FLEET_FORMAT, ROUTERS_FORMAT}


@dataclass(frozen=True, slots=True)
class FleetSet:
    """A set file read: the org, the asked router's export, the other routers', the nodes'."""

    org: str
    router: Collected
    routers: list[Collected]
    nodes: list[Collected]


def read_set(data: bytes) -> tuple[str, Collected, list[Collected]]:
    """The org, the router's export and the nodes' exports of a set file."""
    read = read_fleet_set(data)
    return read.org, read.router, read.nodes


def read_fleet_set(data: bytes) -> FleetSet:
    """A set file of either format (/1 holds no other routers)."""
    try:
        parsed = json.loads(data)
        org = parsed["org"]
        router = _collected(parsed["router"])
        routers = [_collected(item) for item in parsed.get("routers") or []]
        nodes = [_collected(item) for item in parsed["nodes"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FleetSetError(f"the fleet evidence set is malformed ({exc!r})") from None
    expected = ROUTERS_FORMAT if routers else FLEET_FORMAT
    if parsed.get("format") != expected or not isinstance(org, str):
        raise FleetSetError(f"not a fleet evidence set (format {expected} expected)")
    return FleetSet(org, router, routers, nodes)


def _collected(item: Mapping[str, Any]) -> Collected:
    return Collected(str(item["source"]), str(item["collected_at"]), str(item["export"]).encode())


# --- verifying ---------------------------------------------------------------------------------


def verify_set(
    data: bytes,
    *,
    router_key: bytes | None = None,
    node_keys: Mapping[str, bytes] | None = None,
    settle_s: float = SETTLE_S,
) -> FleetReport:
    """Check a set: each export alone, then the routers' rows against the nodes'. Never
    raises for bad content; the report names every difference. `node_keys` pins keys by
    source: node ids, and the other routers' ids. A node row no router's log holds counts
    as in flight if written less than `settle_s` before the earliest router export was
    taken, or after."""
    report = FleetReport()
    try:
        fleet = read_fleet_set(data)
    except FleetSetError as exc:
        report.problems.append(str(exc))
        return report
    org, router, nodes = fleet.org, fleet.router, fleet.nodes
    report.org = org
    report.router, router_rows = _checked(report, _ROUTER, router, org, router_key)
    keys = dict(node_keys or {})
    router_rows = _other_routers(report, fleet, keys, router_rows)
    held: dict[str, list[Row]] = {}
    for node in nodes:
        if node.source in held:
            report.problems.append(f"node {node.source}'s export is in the set twice")
            continue
        pinned = keys.pop(node.source, None)
        report.nodes[node.source], held[node.source] = _checked(
            report, node.source, node, org, pinned
        )
    report.notes += [
        f"a key was given for node {node}, whose export is not in the set" for node in keys
    ]
    unpinned = sorted((set(report.nodes) | set(report.routers)) - set(node_keys or {}))
    if unpinned:
        report.notes.append(
            f"no pinned key for {', '.join(unpinned)}: the key in each of their exports was "
            "trusted as is (pin them with --node-key NODE=KEY)"
        )
    times = [_instant(item.collected_at) for item in [router, *fleet.routers]]
    taken = min((moment for moment in times if moment is not None), default=None)
    cutoff = taken - timedelta(seconds=settle_s) if taken is not None else None
    _compare(report, router_rows, held, cutoff)
    return report


def _other_routers(
    report: FleetReport, fleet: FleetSet, keys: dict[str, bytes], asked_rows: list[Row]
) -> list[Row]:
    """Each other router's export checked alone and as a different router's log; every
    router's request rows together, each request in one router's log once."""
    origins = Counter([str(_document(fleet.router.export).get("origin"))])
    rows = {_ROUTER: asked_rows}
    for other in fleet.routers:
        name = f"router {other.source}'s export"
        if other.source in report.routers:
            report.problems.append(f"{name} is in the set twice")
            continue
        report.routers[other.source], rows[name] = _checked(
            report, other.source, other, fleet.org, keys.pop(other.source, None), name=name
        )
        origins[str(_document(other.export).get("origin"))] += 1
    report.problems += [
        f"the set holds {count} exports of router {origin}'s log"
        for origin, count in sorted(origins.items())
        if count > 1
    ]
    holders: dict[str, list[str]] = {}
    for name, found in rows.items():
        for row in found:
            holders.setdefault(str(row.get("id")), []).append(name)
    report.problems += [
        f"router request {request} is held {len(names)} times ({', '.join(names)})"
        for request, names in sorted(holders.items())
        if len(names) > 1
    ]
    return [row for found in rows.values() for row in found]


def _checked(
    report: FleetReport,
    source: str,
    collected: Collected,
    org: str,
    key: bytes | None,
    *,
    name: str | None = None,
) -> tuple[Report, list[Row]]:
    """Verify one export alone; its request rows for `org`, read even when it fails, so
    that the comparison names what was removed or changed. Its `origin` must be `source`
    (except the asked router's, whose source is `router`)."""
    if name is None:
        name = source if source == _ROUTER else f"node {source}'s export"
    result = verify_export(collected.export, trusted_key=key)
    if not result.ok:
        report.problems.append(f"{name}: {result.problem}")
    document = _document(collected.export)
    scope = document.get("scope") or {}
    if result.ok and scope.get("org") != org:
        report.problems.append(f"{name} is scoped to org {scope.get('org')!r}, not {org!r}")
    if source != _ROUTER and document and document.get("origin") != source:
        report.problems.append(
            f"{name} is the log of {document.get('origin')!r}, not of {source!r}"
        )
    return result, _rows(document, org)


def _compare(
    report: FleetReport,
    router_rows: list[Row],
    held: dict[str, list[Row]],
    cutoff: datetime | None,
) -> None:
    by_id = {str(row.get("id")): row for row in router_rows}
    for row in router_rows:
        _check_routed(report, row, held)
    for node, rows in held.items():
        claimed = Counter(str(row["fleet_request"]) for row in rows if row.get("fleet_request"))
        report.problems += [
            f"node {node}'s log has {count} rows for router request {request}"
            for request, count in sorted(claimed.items())
            if count > 1
        ]
        for row in rows:
            _check_node_row(report, node, row, by_id, cutoff)


def _check_routed(report: FleetReport, row: Row, held: dict[str, list[Row]]) -> None:
    """A router row: where it says the request ran, and that node's own row for it."""
    request, node, region = row.get("id"), row.get("node"), row.get("region")
    if node in {None, NOT_ROUTED} or region in {None, NOT_ROUTED}:
        if node != NOT_ROUTED or region != NOT_ROUTED:
            report.problems.append(
                f"router request {request} records region {region!r} and node {node!r}: a "
                f"request no node served records {NOT_ROUTED!r} for both"
            )
        return
    rows = held.get(str(node))
    if rows is None:
        if row.get("status") == "ok" or row.get("edge"):
            report.problems.append(
                f"router request {request} was served by node {node}, whose export is not in "
                "the set"
            )
        return
    key = "id" if row.get("edge") else "fleet_request"
    own = next((item for item in rows if item.get(key) == request), None)
    if own is None:
        if row.get("status") == "ok" or row.get("edge"):
            report.problems.append(
                f"router request {request} (status {row.get('status')}, region {region}, "
                f"{row.get('input_tokens')}+{row.get('output_tokens')} tokens) was served by node "
                f"{node}, but node {node}'s signed log has no row for it"
            )
        return
    fields = ["region", "node"]
    if row.get("status") == "ok" or row.get("edge"):
        fields += ["input_tokens", "output_tokens"]
    differences = [
        f"{name}: router {row.get(name)!r}, node {own.get(name)!r}"
        for name in fields
        if row.get(name) != own.get(name)
    ]
    if differences:
        report.problems.append(
            f"router request {request} and node {node}'s row {own.get('id')} differ: "
            + "; ".join(differences)
        )
    else:
        report.routed += 1


def _check_node_row(
    report: FleetReport,
    node: str,
    row: Row,
    router_rows: Mapping[str, Row],
    cutoff: datetime | None,
) -> None:
    """A node row: who sent it (the router, a local key, or a fleet key the node admitted)."""
    request, record = row.get("fleet_request"), row.get("id")
    if request is None:
        if row.get("via") not in {None, FLEET_POLICY_VIA}:
            report.problems.append(
                f"node {node}'s row {record} was vouched for by {row.get('via')!r} but names no "
                "router request"
            )
            return
        if row.get("via") == FLEET_POLICY_VIA and str(record) not in router_rows:
            report.notes.append(
                f"node {node}'s row {record} (a fleet key it admitted itself) is not in the "
                "router's log yet: the node has not reported it"
            )
        report.local += 1
        return
    sent = router_rows.get(str(request))
    if sent is None:
        if _after(row.get("time"), cutoff):
            report.in_flight += 1
            return
        report.problems.append(
            f"node {node}'s row {record} claims router request {request}, which the router's "
            "log does not hold"
        )
        return
    if sent.get("status") == INTERRUPTED:
        report.notes.append(
            f"router request {request} was interrupted (the router stopped) before it recorded "
            f"where it ran; node {node}'s row {record} says it ran there"
        )
        return
    if node not in (sent.get("tried") or []):
        report.problems.append(
            f"node {node}'s row {record} claims router request {request}, which the router "
            f"sent to {', '.join(sent.get('tried') or []) or 'no node'}"
        )


def _after(when: object, cutoff: datetime | None) -> bool:
    """Whether a node row written at `when` may belong to a request the router settled after
    its export was taken."""
    moment = _instant(when)
    return moment is not None and cutoff is not None and moment >= cutoff


def _instant(value: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None
