"""The Grafana dashboards in ops/grafana: every query names only series the router's and the
appliance's registries define (docs/metrics.md's contract), with labels those series carry
once Prometheus has scraped them (the router's service discovery adds the target labels),
and parses as PromQL (`promtool check rules`, when Debian's prometheus is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from federation import FleetNode, FleetStatus, MetricRow
from palisade._private.references import appliance_rows, router_rows
from router import scrape_targets
from tests.support import REPO

DASHBOARDS = sorted((REPO / "ops" / "grafana").glob("*.json"))
# Grafana's variables, as PromQL sees them once Grafana has filled them in.
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_SERIES = re.compile(r"\b(palisade_[a-z0-9_]+)\b(\{[^}]*\})?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"^label_values\((\w+),\s*(\w+)\)$")


def _scrape_labels() -> tuple[frozenset[str], frozenset[str]]:
    """The labels Prometheus adds to the router's series and to a node's (its target labels
    from the router's HTTP service discovery, `job` and `instance`)."""
    node = FleetNode(
        node_id="n",
        region="r",
        url="https://n:8400",
        device_classes=["cpu"],
        models=["m"],
        state="up",
        in_flight=0,
        queue_depth=0,
        ttft_p50_ms=None,
        heartbeat_age_s=0.0,
        version="0",
    )
    router, member = scrape_targets(
        "router", "http://127.0.0.1:8300", FleetStatus(router_id="router", nodes=[node])
    )

    def visible(labels: dict[str, str]) -> frozenset[str]:
        return frozenset(name for name in labels if not name.startswith("__")) | {"job", "instance"}

    return visible(router.labels), visible(member.labels)


def known_series() -> dict[str, frozenset[str]]:
    """Every series name Prometheus can hold for the fleet, with its labels."""
    router_labels, node_labels = _scrape_labels()
    series: dict[str, frozenset[str]] = {}

    def add(rows: list[MetricRow], scraped: frozenset[str]) -> None:
        for row in rows:
            names = {row.name: frozenset(row.labels)}
            if row.type == "histogram":
                names = {
                    f"{row.name}_bucket": frozenset(row.labels) | {"le"},
                    f"{row.name}_sum": frozenset(row.labels),
                    f"{row.name}_count": frozenset(row.labels),
                }
            for name, labels in names.items():
                series[name] = series.get(name, frozenset()) | labels | scraped

    add(router_rows(), router_labels)
    add(appliance_rows(), node_labels)
    return series


def filled(expr: str) -> str:
    """`expr` with Grafana's variables replaced as Grafana would (a multi-value variable is a
    regex: `.*` stands for all)."""
    for name, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return _VARIABLE.sub(".*", expr)


def problems(expr: str, series: dict[str, frozenset[str]]) -> list[str]:
    """What in `expr` names a series or a label that the fleet does not export."""
    found: list[str] = []
    used: set[str] = set()
    for name, selector in _SERIES.findall(expr):
        if name not in series:
            found.append(f"unknown series {name}")
            continue
        used |= series[name]
        found += [
            f"{name} has no label `{label}`"
            for label in _MATCHER.findall(selector or "")
            if label not in series[name]
        ]
    grouped = {part.strip() for grouping in _GROUPING.findall(expr) for part in grouping.split(",")}
    found += [
        f"no series of the query has the label `{label}` to group by"
        for label in sorted(grouped - used - {""})
    ]
    if not used and "palisade_" not in expr:
        found.append("names no palisade series")
    return found


def queries(dashboard: dict[str, Any]) -> list[str]:
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def test_the_three_dashboards_are_there() -> None:
    titles = {_load(path)["title"] for path in DASHBOARDS}
    assert titles == {
        "Palisade fleet overview",
        "Palisade region detail",
        "Palisade tenant usage",
    }
    uids = [_load(path)["uid"] for path in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_every_query_names_series_and_labels_the_fleet_exports(path: Path) -> None:
    series = known_series()
    dashboard = _load(path)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], f"{panel['title']} has no query"
    wrong = {
        expr: found for expr in queries(dashboard) if (found := problems(filled(expr), series))
    }
    assert not wrong, json.dumps(wrong, indent=2)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable["definition"])
            assert match is not None, variable["definition"]
            name, label = match.groups()
            assert label in series.get(name, frozenset()), variable["definition"]


def test_the_check_catches_unknown_series_and_labels() -> None:
    series = known_series()
    assert problems(filled('sum by (region) (palisade_router_node_up{region=~"$r"})'), series) == []
    assert problems("rate(palisade_router_requestz_total[5m])", series) == [
        "unknown series palisade_router_requestz_total"
    ]
    assert problems('palisade_router_requests_total{org="acme"}', series) == [
        "palisade_router_requests_total has no label `org`"
    ]
    assert problems("sum by (model) (palisade_canary_requests_total)", series) == [
        "no series of the query has the label `model` to group by"
    ]
    # A node's series carry their target's region; the router's do not.
    assert problems('palisade_queue_depth{region="eu"}', series) == []
    assert problems('palisade_router_errors_total{region="eu"}', series) != []


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian's prometheus package; `make system-deps`)",
)
def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    exprs = [filled(expr) for path in DASHBOARDS for expr in queries(_load(path))]
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboards.rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(rules))
    checked = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout
    broken = path.with_name("broken.rules.json")
    broken.write_text(
        json.dumps({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum by (le"}]}]})
    )
    refused = subprocess.run(
        ["promtool", "check", "rules", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
