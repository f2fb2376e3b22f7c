"""`palisade audit export --org O --fleet` and `palisade audit verify` of a fleet evidence set
(`fleet_evidence`): the collecting and the printing; `cli` wires the options."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer

from compliance._private.cli import _get, _replacing, _size, _trusted_key, fingerprint
from compliance._private.export import Report
from compliance._private.fleet_evidence import (
    Collected,
    FleetReport,
    build_set,
    nodes_to_collect,
    verify_set,
)
from federation.client import Target, fail, print_json

_SHOWN = 50  # differences printed (--json lists them all)


def export_fleet(target: Target, org: str, out: Path) -> None:
    """The router's export of `org`, every other live router's (routers sharing its store),
    then each node's they name: all through the router asked."""
    router = _download(target, "/admin/v1/audit/export", org, "router")
    routers = [
        _download(
            target, f"/admin/v1/fleet/routers/{quote(other, safe='')}/audit/export", org, other
        )
        for other in _other_routers(target, org)
    ]
    exports = [other.export for other in routers]
    nodes = [
        _download(target, f"/admin/v1/fleet/nodes/{quote(node, safe='')}/audit/export", org, node)
        for node in nodes_to_collect(router.export, org, *exports)
    ]
    data = build_set(org, router, nodes, routers)
    with _replacing(out) as sink:
        sink.write(data)
    names = ", ".join(node.source for node in nodes) or "none"
    also = "".join(f", router {other.source}'s" for other in routers)
    typer.echo(
        f"Wrote fleet evidence set {out} ({_size(len(data))}) for org {org}: the router's "
        f"export{also} and {len(nodes)} node exports ({names}). Check it offline with "
        f"`palisade audit verify {out} --trusted-key <router key> --node-key <node or "
        "router>=<key> …`."
    )


def _other_routers(target: Target, org: str) -> list[str]:
    """The ids of the other live routers sharing the asked router's store (none alone)."""
    with _get(target, "/admin/v1/fleet/routers", {"org": org}) as response:
        listing = json.loads(response.read())
    return [
        str(item["router_id"])
        for item in listing["data"]
        if item["router_id"] != listing["router_id"]
    ]


def _download(target: Target, path: str, org: str, source: str) -> Collected:
    with _get(target, path, {"org": org}) as response:
        data = response.read()
    if not data:
        raise fail(f"{target.url} answered with an empty export for {source}.")
    return Collected(source, datetime.now(UTC).isoformat(timespec="milliseconds"), data)


def node_keys(values: list[str]) -> dict[str, bytes]:
    """--node-key NODE=KEY (64 hex digits, or @FILE holding them), repeated."""
    keys: dict[str, bytes] = {}
    for value in values:
        node, equals, key = value.partition("=")
        if not equals or not node or not key:
            raise fail(f"--node-key {value!r}: expected NODE=KEY (64 hex digits or @FILE).")
        pinned = _trusted_key(key)
        assert pinned is not None
        keys[node] = pinned
    return keys


def verify_fleet(
    file: Path, data: bytes, router_key: bytes | None, keys: dict[str, bytes], *, as_json: bool
) -> None:
    """Verify a set; exit 1 naming every difference when it does not hold."""
    report = verify_set(data, router_key=router_key, node_keys=keys)
    if as_json:
        print_json(_as_json(file, report, router_key is not None, keys))
    else:
        typer.echo("\n".join(_summary(file, report, router_key is not None, keys)))
    if not report.ok:
        count = len(report.problems)
        plural = "difference" if count == 1 else "differences"
        typer.echo(f"FAILED: {count} {plural}; the first: {report.problems[0]}", err=True)
        raise typer.Exit(1)


def _summary(
    file: Path, report: FleetReport, router_pinned: bool, keys: dict[str, bytes]
) -> list[str]:
    lines = [
        f"Fleet evidence set {file}: {'OK' if report.ok else 'FAILED'}",
        f"  org              {report.org}",
    ]
    if report.router is not None:
        lines.append(_export_line("router", report.router, pinned=router_pinned))
    lines += [
        _export_line(router, result, pinned=router in keys)
        for router, result in report.routers.items()
    ]
    lines += [
        _export_line(node, result, pinned=node in keys) for node, result in report.nodes.items()
    ]
    lines += [
        f"  routed requests  {report.routed} (matched on both sides)",
        f"  local requests   {report.local} (local keys and fleet keys the nodes admitted)",
        f"  in flight        {report.in_flight} (settled as the router's export was taken)",
    ]
    lines += [f"  note: {note}" for note in report.notes]
    lines += [f"  DIFFERENCE: {problem}" for problem in report.problems[:_SHOWN]]
    if len(report.problems) > _SHOWN:
        lines.append(f"  … and {len(report.problems) - _SHOWN} more (--json lists them all)")
    return lines


def _export_line(name: str, result: Report, *, pinned: bool) -> str:
    key = fingerprint(bytes.fromhex(result.public_key)) if result.public_key else "no key"
    trust = "pinned" if pinned else "as found in the file"
    state = "OK" if result.ok else "FAILED"
    return f"  {name:<16} {state}, {result.entries} entries, key {key} ({trust})"


def _as_json(
    file: Path, report: FleetReport, router_pinned: bool, keys: dict[str, bytes]
) -> dict[str, Any]:
    def export(result: Report, pinned: bool) -> dict[str, Any]:
        return {
            "ok": result.ok,
            "problem": result.problem,
            "entries": result.entries,
            "public_key": result.public_key or None,
            "trusted_key_checked": pinned,
        }

    return {
        "file": str(file),
        "fleet": True,
        "ok": report.ok,
        "org": report.org,
        "router": export(report.router, router_pinned) if report.router is not None else None,
        "routers": {
            router: export(result, router in keys) for router, result in report.routers.items()
        },
        "nodes": {node: export(result, node in keys) for node, result in report.nodes.items()},
        "routed": report.routed,
        "local": report.local,
        "in_flight": report.in_flight,
        "problems": report.problems,
        "notes": report.notes,
    }
