"""Request and response content for `full` logging: AES-256-GCM under a node key, with retention.

Nothing here is ever written in plain text: each record is sealed with a fresh 96-bit nonce
and the record's id and org as associated data, so a ciphertext cannot be moved to another
record unnoticed. Records older than the retention period are deleted.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import closing
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
"""


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
    def __init__(self, path: Path, key: bytes, *, retention: timedelta) -> None:
        self._aead = AESGCM(key)
        self._retention = retention
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            private_database(path), check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def seal(self, record_id: str, org: str, content: bytes) -> None:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, content, f"{record_id}|{org}".encode())
        now = datetime.now(UTC)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO content VALUES (?, ?, ?, ?, ?)",
                (record_id, org, now.isoformat(), nonce, sealed),
            )
            self._db.execute(
                "DELETE FROM content WHERE created_at < ?", ((now - self._retention).isoformat(),)
            )

    def open(self, record_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT org, nonce, sealed FROM content WHERE id = ?", (record_id,)
            ).fetchone()
        if row is None:
            return None
        try:
            return self._aead.decrypt(
                bytes(row[1]), bytes(row[2]), f"{record_id}|{row[0]}".encode()
            )
        except InvalidTag as exc:
            raise AuditLogError(
                f"Content record {record_id} fails authentication: it was altered."
            ) from exc

    def close(self) -> None:
        with closing(self._db):
            pass
