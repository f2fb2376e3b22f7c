"""Crash safety: a real writer process killed with SIGKILL at random moments, 100 times
(PALISADE_CRASH_ROUNDS: as many as asked)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

from compliance import AuditLog, Scope, build_export, read_entries, verify_export
from federation import NodeIdentity
from tests.compliance.writer import start_writer

ROUNDS = int(os.environ.get("PALISADE_CRASH_ROUNDS", "100"))


def run_and_kill(db: Path, rng: random.Random) -> int:
    """Start a writer, kill it after a random number of acknowledgements; the last acked index."""
    writer = start_writer(db)
    last = -1
    for _ in range(rng.randint(1, 40)):
        line = writer.lines.readline()
        assert line, "the writer exited before it was killed"
        last = int(line)
    writer.process.kill()
    writer.process.join(timeout=30)
    for line in writer.lines.read().splitlines():  # acknowledged before the kill landed
        last = max(last, int(line))
    writer.lines.close()
    assert writer.process.exitcode == -signal.SIGKILL
    return last


def check(db: Path, acknowledged: int, node: NodeIdentity) -> None:
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        indices = [row[0] for row in conn.execute("SELECT idx FROM entries ORDER BY idx")]
    assert indices == list(range(len(indices)))
    assert len(indices) > acknowledged  # every acknowledged entry survived
    report = verify_export(
        build_export(db, node, origin="crash-node", scope=Scope()), trusted_key=node.public_key
    )
    assert report.ok, report.problem


def test_sigkill_never_loses_an_acknowledged_entry(tmp_path: Path) -> None:
    rng = random.Random(20261122)
    db = tmp_path / "audit.db"
    node = NodeIdentity.load_or_create(tmp_path)
    acknowledged = -1
    for _ in range(ROUNDS):
        acknowledged = max(acknowledged, run_and_kill(db, rng))
        check(db, acknowledged, node)
    log = AuditLog(db, node, origin="crash-node")  # recovers and signs the tail at close
    log.close()
    report = verify_export(
        build_export(db, node, origin="crash-node", scope=Scope()), trusted_key=node.public_key
    )
    assert report.ok, report.problem
    assert report.unsigned_tail == 0
    assert len(read_entries(db)) > acknowledged
