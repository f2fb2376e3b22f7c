"""The audit log: durable appends, hash chain, signed checkpoints, and the tamper matrix."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import pytest

from compliance import (
    AuditLog,
    AuditLogError,
    Scope,
    build_export,
    read_checkpoints,
    read_entries,
    verify_export,
)
from federation import NodeIdentity, signature_valid
from tests.support import run_palisade, wait_for

ORIGIN = "edge-eu-1"


def fill(log: AuditLog, count: int, start: int = 0) -> None:
    futures = [
        log.submit({"kind": "request", "org": f"org-{n % 2}", "n": n})
        for n in range(start, start + count)
    ]
    assert [f.result() for f in futures] == list(range(start, start + count))


@pytest.fixture
def node(tmp_path: Path) -> NodeIdentity:
    return NodeIdentity.load_or_create(tmp_path)


@pytest.fixture
def db(tmp_path: Path, node: NodeIdentity) -> Path:
    path = tmp_path / "audit.db"
    log = AuditLog(path, node, origin=ORIGIN, checkpoint_every=100, checkpoint_seconds=3600)
    fill(log, 250)
    log.close()
    return path


def export(db: Path, node: NodeIdentity, scope: Scope | None = None) -> bytes:
    return build_export(db, node, origin=ORIGIN, scope=scope or Scope())


def problem(data: bytes, trusted: NodeIdentity) -> str:
    """What `palisade audit verify` (offline, as an auditor runs it) says is wrong."""
    report = verify_export(data, trusted_key=trusted.public_key)
    assert not report.ok
    assert report.problem is not None
    with tempfile.NamedTemporaryFile(suffix=".json") as export_file:
        export_file.write(data)
        export_file.flush()
        result = run_palisade(
            "audit", "verify", export_file.name, "--trusted-key", trusted.public_key.hex()
        )
    assert result.returncode == 1
    assert report.problem in result.stderr
    return report.problem


def edit(db: Path, sql: str, *args: object) -> None:
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(sql, args)


def test_entries_are_chained_numbered_and_checkpointed(db: Path, node: NodeIdentity) -> None:
    bodies = [json.loads(body) for body in read_entries(db)]
    assert [b["index"] for b in bodies] == list(range(250))
    assert bodies[0]["prev"] == "00" * 32
    assert all("time" in b for b in bodies)
    checkpoints = read_checkpoints(db)
    assert [c.size for c in checkpoints] == [100, 200, 250]  # every 100, and at close
    assert all(signature_valid(node.public_key, c.signature, c.body) for c in checkpoints)
    assert {c.fields["origin"] for c in checkpoints} == {ORIGIN}


def test_clean_full_and_org_exports_verify(db: Path, node: NodeIdentity) -> None:
    report = verify_export(export(db, node), trusted_key=node.public_key)
    assert report.ok, report.problem
    assert (report.entries, report.signed_entries, report.unsigned_tail, report.checkpoints) == (
        250,
        250,
        0,
        3,
    )
    org = export(db, node, Scope(org="org-1"))
    org_report = verify_export(org, trusted_key=node.public_key)
    assert org_report.ok, org_report.problem
    assert org_report.entries == 125
    assert b'"org":"org-0"' not in org  # nothing of the other org is revealed


def test_reopening_continues_the_chain_and_never_resigns_a_size(
    db: Path, node: NodeIdentity
) -> None:
    log = AuditLog(db, node, origin=ORIGIN, checkpoint_every=100, checkpoint_seconds=3600)
    assert log.checkpoint() is None  # nothing new since the checkpoint at close
    fill(log, 10, start=250)
    log.close()
    assert [c.size for c in read_checkpoints(db)] == [100, 200, 250, 260]
    assert verify_export(export(db, node), trusted_key=node.public_key).ok


def test_unsigned_tail_is_reported(tmp_path: Path, node: NodeIdentity) -> None:
    path = tmp_path / "tail.db"
    log = AuditLog(path, node, origin=ORIGIN, checkpoint_every=100, checkpoint_seconds=3600)
    fill(log, 130)
    report = verify_export(export(path, node), trusted_key=node.public_key)
    log.close()
    assert report.ok, report.problem
    assert report.unsigned_tail == 30
    assert any("unsigned tail" in note for note in report.notes)


# --- the tamper matrix -------------------------------------------------------------------------


def test_byte_flipped_in_an_entry(db: Path, node: NodeIdentity) -> None:
    body = read_entries(db)[17].replace(b'"n":17', b'"n":71')
    edit(db, "UPDATE entries SET body = ? WHERE idx = 17", body)
    assert "entry 18 does not chain to entry 17" in problem(export(db, node), node)


def test_entry_deleted(db: Path, node: NodeIdentity) -> None:
    edit(db, "DELETE FROM entries WHERE idx = 17")
    assert "entry 17 is missing or out of place" in problem(export(db, node), node)


def test_two_entries_swapped(db: Path, node: NodeIdentity) -> None:
    bodies = read_entries(db)
    edit(db, "UPDATE entries SET body = ? WHERE idx = 17", bodies[18])
    edit(db, "UPDATE entries SET body = ? WHERE idx = 18", bodies[17])
    assert "entry 17 is missing or out of place: found index 18" in problem(export(db, node), node)


def test_forged_entry_inserted_and_rechained(db: Path, node: NodeIdentity) -> None:
    """A careful forger re-chains everything after the insertion; the signed roots still differ."""
    from compliance._private.log import GENESIS, canonical  # noqa: PLC0415 - the forger's tools
    from compliance._private.merkle import leaf_hash  # noqa: PLC0415

    originals = [json.loads(body) for body in read_entries(db)]
    forged = {"kind": "request", "org": "org-0", "n": -1, "time": originals[40]["time"]}
    rows, prev = [], GENESIS
    for index, entry in enumerate([*originals[:40], forged, *originals[40:]]):
        body = canonical(entry | {"index": index, "prev": prev.hex()})
        prev = leaf_hash(body)
        rows.append((index, body))
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM entries")
        conn.executemany("INSERT INTO entries (idx, body) VALUES (?, ?)", rows)
    assert "checkpoint size 100: the entries do not produce its signed root" in problem(
        export(db, node), node
    )


def test_forged_entry_in_an_org_export(db: Path, node: NodeIdentity) -> None:
    data = export(db, node, Scope(org="org-1")).replace(b'\\"n\\":17', b'\\"n\\":99')
    assert "entry 17: not included in the signed tree of size 250" in problem(data, node)


def test_older_database_restored(tmp_path: Path, node: NodeIdentity) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(path, node, origin=ORIGIN, checkpoint_every=100, checkpoint_seconds=3600)
    fill(log, 100)
    log.checkpoint()
    backup = tmp_path / "backup"
    backup.mkdir()
    for file in tmp_path.glob("audit.db*"):
        if not file.name.endswith(".head"):
            shutil.copy(file, backup / file.name)
    fill(log, 150, start=100)
    log.close()
    for file in backup.iterdir():
        shutil.copy(file, tmp_path / file.name)
    assert "the database was restored from an older copy" in problem(export(path, node), node)
    with pytest.raises(
        AuditLogError, match="already signed a checkpoint for 250: the database was restored"
    ):
        AuditLog(path, node, origin=ORIGIN)


def test_checkpoint_edited(db: Path, node: NodeIdentity) -> None:
    body = read_checkpoints(db)[1].body.replace(b'"size":200', b'"size":201')
    edit(db, "UPDATE checkpoints SET body = ? WHERE size = 200", body)
    assert "checkpoint #1 (size 201): its signature does not verify" in problem(
        export(db, node), node
    )


def test_wrong_public_key(db: Path, node: NodeIdentity, tmp_path: Path) -> None:
    stranger = NodeIdentity.load_or_create(tmp_path / "stranger")
    # The export is the node's; the auditor was given a stranger's key to trust.
    assert "not the trusted key" in problem(export(db, node), stranger)


def test_truncated_export_file(db: Path, node: NodeIdentity) -> None:
    data = export(db, node)
    assert "the file is not a complete export: truncated or corrupted" in problem(
        data[: len(data) // 2], node
    )


def test_export_file_edited_after_signing(db: Path, node: NodeIdentity) -> None:
    data = export(db, node).replace(b'"scope":{"org":null', b'"scope":{"org":"x"')
    assert "the manifest's SHA-256 does not match" in problem(data, node)


def test_checkpoints_are_signed_on_a_timer(tmp_path: Path, node: NodeIdentity) -> None:
    path = tmp_path / "timer.db"
    log = AuditLog(path, node, origin=ORIGIN, checkpoint_every=10_000, checkpoint_seconds=0.05)
    fill(log, 3)
    try:
        wait_for(lambda: [c.size for c in read_checkpoints(path)] == [3])
    finally:
        log.close()
    assert [c.size for c in read_checkpoints(path)] == [3]  # nothing new at close: no re-sign
