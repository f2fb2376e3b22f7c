"""Lingering appends: rows nobody waits for share a commit with the rows that follow them,
and anything that must not wait (an awaited append, a checkpoint, close) commits them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from compliance import AuditLog, read_entries
from federation import NodeIdentity

ORIGIN = "edge-linger-1"
LONG_S = 30.0  # longer than any test may take: only something urgent can end the wait


@pytest.fixture
def node(tmp_path: Path) -> NodeIdentity:
    return NodeIdentity.load_or_create(tmp_path)


def row(n: int) -> dict[str, object]:
    return {"kind": "request", "org": "org-a", "n": n}


def test_a_lingering_row_waits_for_company_then_commits_alone(
    tmp_path: Path, node: NodeIdentity
) -> None:
    linger_s = 0.3
    log = AuditLog(tmp_path / "audit.db", node, origin=ORIGIN, linger_s=linger_s)
    try:
        started = time.monotonic()
        first = log.submit(row(0), linger=True)
        later = [log.submit(row(n), linger=True) for n in range(1, 20)]
        assert first.result(timeout=10) == 0
        waited = time.monotonic() - started
        assert [future.result(timeout=10) for future in later] == list(range(1, 20))
    finally:
        log.close()
    assert waited >= linger_s * 0.9  # held for company, not committed at once
    assert len(read_entries(tmp_path / "audit.db")) == 20


@pytest.mark.parametrize("urgent", ["append", "checkpoint", "close"])
def test_anything_that_must_not_wait_commits_the_lingering_rows(
    tmp_path: Path, node: NodeIdentity, urgent: str
) -> None:
    log = AuditLog(tmp_path / "audit.db", node, origin=ORIGIN, linger_s=LONG_S)
    lingering = [log.submit(row(n), linger=True) for n in range(5)]
    started = time.monotonic()
    if urgent == "append":
        assert log.append({"kind": "management", "event": "key.create"}) == 5
    elif urgent == "checkpoint":
        checkpoint = log.checkpoint()
        assert checkpoint is not None
        assert checkpoint.size == 5
    else:
        log.close()
    assert time.monotonic() - started < LONG_S / 3
    assert [future.result(timeout=1) for future in lingering] == list(range(5))
    log.close()
    assert len(read_entries(tmp_path / "audit.db")) == 5 + (urgent == "append")


def test_rows_submitted_without_linger_are_not_held(tmp_path: Path, node: NodeIdentity) -> None:
    log = AuditLog(tmp_path / "audit.db", node, origin=ORIGIN, linger_s=LONG_S)
    try:
        started = time.monotonic()
        assert log.submit(row(0)).result(timeout=LONG_S / 3) == 0
        assert time.monotonic() - started < LONG_S / 3
    finally:
        log.close()
