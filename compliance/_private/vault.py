"""Request and response content for `full` logging: AES-256-GCM under a node key, with retention.

Nothing here is ever written in plain text: each record is sealed with a fresh 96-bit nonce
and the record's id and org as associated data, so a ciphertext cannot be moved to another
record unnoticed. The recorder deletes the records past the retention period once their
purge is on record in the audit log; a record past its retention is never read back,
deleted yet or not.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from compliance._private.errors import AuditLogError
from federation import private_database, write_private

KEY_FILE = "content.key"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS content (
    id TEXT PRIMARY KEY, org TEXT NOT NULL, created_at TEXT NOT NULL,
    nonce BLOB NOT NULL, sealed BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS content_created_at ON content (created_at);
"""

Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class SealedContent:
    """One opened record: whose it is, when it was sealed, and the plain content."""

    id: str
    org: str
    sealed_at: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Purged:
    """What one purge deleted: the records' ids by org, and the retention cut-off."""

    before: str
    ids_by_org: dict[str, list[str]]


def load_or_create_content_key(home: Path) -> bytes:
    path = home / KEY_FILE
    if path.exists():
        key = path.read_bytes()
        if len(key) != 32:
            raise AuditLogError(f"{path} must hold a 32-byte AES-256 key; it has {len(key)} bytes.")
        return key
    key = AESGCM.generate_key(bit_length=256)
    write_private(path, key)
    return key


class ContentVault:
    def __init__(
        self, path: Path, key: bytes, *, retention: timedelta, clock: Clock = _now
    ) -> None:
        self._aead = AESGCM(key)
        self._retention = retention
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            private_database(path), check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def seal(self, record_id: str, org: str, content: bytes) -> None:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, content, f"{record_id}|{org}".encode())
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO content VALUES (?, ?, ?, ?, ?)",
                (record_id, org, self._clock().isoformat(), nonce, sealed),
            )

    def expired(self, *, skip: set[str]) -> Purged:
        """The records past the retention period (but those in `skip`), by org."""
        before = self._cutoff()
        with self._lock:
            rows = self._db.execute(
                "SELECT id, org FROM content WHERE created_at < ? ORDER BY created_at, id",
                (before,),
            ).fetchall()
        ids_by_org: dict[str, list[str]] = {}
        for record_id, org in rows:
            if record_id not in skip:
                ids_by_org.setdefault(org, []).append(record_id)
        return Purged(before=before, ids_by_org=ids_by_org)

    def delete(self, record_ids: list[str], *, before: str) -> None:
        """Delete these records if still sealed before `before` (not sealed anew since)."""
        with self._lock:
            self._db.executemany(
                "DELETE FROM content WHERE id = ? AND created_at < ?",
                [(record_id, before) for record_id in record_ids],
            )

    def read(self, record_id: str) -> SealedContent | None:
        """The record, opened; None when there is none (or it is past its retention)."""
        with self._lock:
            row = self._db.execute(
                "SELECT org, created_at, nonce, sealed FROM content "
                "WHERE id = ? AND created_at >= ?",
                (record_id, self._cutoff()),
            ).fetchone()
        if row is None:
            return None
        org, sealed_at, nonce, sealed = row
        try:
            content = self._aead.decrypt(bytes(nonce), bytes(sealed), f"{record_id}|{org}".encode())
        except InvalidTag as exc:
            raise AuditLogError(
                f"Content record {record_id} fails authentication: it was altered."
            ) from exc
        return SealedContent(id=record_id, org=org, sealed_at=sealed_at, content=content)

    def open(self, record_id: str) -> bytes | None:
        found = self.read(record_id)
        return None if found is None else found.content

    def _cutoff(self) -> str:
        return (self._clock() - self._retention).isoformat()

    def close(self) -> None:
        with closing(self._db):
            pass
