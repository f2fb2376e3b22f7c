"""The export verifier on files that are JSON but not shaped like a valid export.

The tamper matrix (test_audit_log.py) edits the database and exports it; these edit the file's
JSON directly, the way a damaged or hand-made file reaches an auditor. Each must be reported,
naming what is wrong, and never raise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from compliance import AuditLog, Scope, build_export, canonical, verify_export
from federation import NodeIdentity

ORIGIN = "edge-eu-1"
Edit = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeIdentity:
    return NodeIdentity.load_or_create(tmp_path_factory.mktemp("node"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, node: NodeIdentity) -> dict[str, bytes]:
    """A full and an org-1 export of 45 entries alternating between two orgs, taken while
    the log is open: checkpoints at 20 and 40, then an unsigned tail of 5."""
    path = tmp_path_factory.mktemp("log") / "audit.db"
    log = AuditLog(path, node, origin=ORIGIN, checkpoint_every=20, checkpoint_seconds=3600)
    try:
        for n in range(45):
            log.append({"kind": "request", "org": f"org-{n % 2}", "n": n})
        return {
            "full": build_export(path, node, origin=ORIGIN, scope=Scope()),
            "org": build_export(path, node, origin=ORIGIN, scope=Scope(org="org-1")),
        }
    finally:
        log.close()


def problem_of(document: dict[str, Any], node: NodeIdentity) -> str:
    report = verify_export(canonical(document), trusted_key=node.public_key)
    assert report.problem is not None
    return report.problem


def _set(path: str, value: Any) -> Edit:
    """An edit that sets the value at a dotted path (list positions are numbers)."""

    def edit(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return edit


def _delete(key: str) -> Edit:
    return lambda document: document.pop(key)


MALFORMED_ENTRY = "entry at position 3 in the file is malformed"
CASES = [
    (_delete("export"), "the file is not a Palisade audit export (no `export` object)"),
    (_set("export.format", "palisade-audit-export/9"), "unknown export format"),
    (_delete("manifest"), "the export has no manifest"),
    (
        _set("export.entries.3.entry", 7),
        "the export is malformed: Expected `str`, got `int` - at `$.export.entries[3].entry`",
    ),
    (_set("export.entries.3.entry", '{"index":"3"}'), MALFORMED_ENTRY),
    (_set("export.entries.3.entry", "[1, 2]"), MALFORMED_ENTRY),
    (_set("export.entries.3.proof", ["zz"]), "entry 7: its inclusion proof is malformed"),
    (_set("export.entries.3.proof", [1]), "got `int` - at `$.export.entries[3].proof[0]`"),
    (_set("export.checkpoints.0.body", "not json"), "checkpoint #0 is malformed"),
    (_set("export.checkpoints.1.signature", "zz"), "checkpoint #1 is malformed"),
    (_set("export.head.signature", "zz"), "the node's head checkpoint is malformed"),
    (_set("export.head.body", '{"size": 45}'), "the node's head checkpoint is malformed"),
    (_set("export.tree_size", "40"), "got `str` - at `$.export.tree_size`"),
    (_set("export.consistency.0.from", None), "got `null` - at `$.export.consistency[0].from`"),
    (
        _set("export.consistency.0.proof", ["zz"]),
        "the consistency proof from checkpoint 20 to 40 is malformed",
    ),
    (_set("export.public_key", "not hex"), "the export's public_key is not hex"),
]


@pytest.mark.parametrize(("edit", "expected"), CASES)
def test_a_misshapen_org_export_is_named(
    exports: dict[str, bytes], node: NodeIdentity, edit: Edit, expected: str
) -> None:
    document = json.loads(exports["org"])
    edit(document)
    assert expected in problem_of(document, node)


def test_a_misshapen_entry_in_a_full_export_is_named(
    exports: dict[str, bytes], node: NodeIdentity
) -> None:
    document = json.loads(exports["full"])
    _set("export.entries.3.entry", '{"prev": 5}')(document)
    assert MALFORMED_ENTRY in problem_of(document, node)


@pytest.mark.parametrize(("name", "entries", "signed"), [("full", 45, 40), ("org", 22, 20)])
def test_signed_entries_and_the_unsigned_tail_are_counted(
    exports: dict[str, bytes], node: NodeIdentity, name: str, entries: int, signed: int
) -> None:
    report = verify_export(exports[name], trusted_key=node.public_key)
    assert report.ok, report.problem
    assert (report.entries, report.signed_entries, report.unsigned_tail) == (
        entries,
        signed,
        entries - signed,
    )
