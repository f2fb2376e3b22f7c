"""The metrics contract: docs/metrics.md is what the registries hold, and labels stay bounded."""

from __future__ import annotations

import pytest

from federation import FORBIDDEN_LABEL_PARTS, MetricRow
from palisade._private.references import appliance_rows, metrics_reference, router_rows
from tests.support import REPO

# The only families allowed an `org` label: budget use per org (issue: budget alerts).
ORG_LABELLED = {"palisade_org_budget_used_ratio"}


def _all_rows() -> list[MetricRow]:
    return router_rows() + appliance_rows()


def test_the_committed_reference_is_what_the_code_generates() -> None:
    committed = (REPO / "docs" / "metrics.md").read_text()
    assert committed == metrics_reference(), "run `make docs`"


def test_no_label_names_a_key_a_user_or_a_request() -> None:
    for row in _all_rows():
        for label in row.labels:
            assert not any(part in label for part in FORBIDDEN_LABEL_PARTS), (row.name, label)


def test_org_labels_only_budget_use() -> None:
    labelled = {row.name for row in _all_rows() if "org" in row.labels}
    assert labelled == ORG_LABELLED


@pytest.mark.parametrize(
    "name",
    [
        "palisade_time_to_first_token_seconds",
        "palisade_time_per_output_token_seconds",
        "palisade_request_duration_seconds",
        "palisade_router_request_duration_seconds",
    ],
)
def test_latencies_are_histograms(name: str) -> None:
    assert {row.name: row.type for row in _all_rows()}[name] == "histogram"


def test_the_issue_s_metrics_are_all_there() -> None:
    names = {row.name for row in _all_rows()}
    wanted = {
        "palisade_prompt_tokens_total",
        "palisade_completion_tokens_total",
        "palisade_queue_depth",
        "palisade_kv_cells",
        "palisade_errors_total",
        "palisade_router_errors_total",
        "palisade_router_failovers_total",
        "palisade_router_device_failovers_total",
        "palisade_router_residency_refusals_total",
        "palisade_org_budget_used_ratio",
        "palisade_certificate_expiry_seconds",
        "palisade_router_node_image_info",
        "palisade_engine_restarts_total",
        "palisade_router_node_up",
        "palisade_audit_unsigned_entries",
    }
    assert wanted <= names, wanted - names
