"""The append-only audit log: canonical JSON entries in SQLite, an RFC 6962 Merkle tree over
them, and Ed25519-signed checkpoints.

Each entry records its `index` and `prev`, the leaf hash of the entry before it, so a
verifier holding every entry can name the first one that was changed, removed, swapped
or forged; the signed checkpoints pin the whole sequence.

One writer thread owns the database. Appends queue up and are committed in groups (one
fsync for many entries, WAL with synchronous=FULL); each caller is released only once its
entry is durable. Entries submitted with `linger` (rows that are journaled elsewhere and
that nobody waits for) may be held up to `linger_s` to share a commit with the entries that
follow them; any other append, a checkpoint or close commits them at once. A checkpoint
(origin, size, root, time) is signed every `checkpoint_every` entries or
`checkpoint_seconds`, and at close. Sizes are the primary key of the checkpoint table, so
the node can never sign two different roots for one size; the last checkpoint is also kept
in `<db>.head`, so a database restored from an older copy refuses to open.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compliance._private.errors import AuditLogError
from compliance._private.merkle import CompactRange, leaf_hash
from federation import NodeIdentity, private_database, private_file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY, body BLOB NOT NULL, signature BLOB NOT NULL);
"""
_BATCH = 4096
# How long a lingering entry may wait for others to share its commit (see `submit`).
LINGER_S = 0.02
GENESIS = bytes(32)  # the `prev` of entry 0
Clock = Callable[[], datetime]


def canonical(value: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: one byte string per logical entry."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: the log of `origin` had `size` entries with Merkle `root`."""

    body: bytes
    signature: bytes

    @property
    def fields(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    @property
    def size(self) -> int:
        return int(self.fields["size"])

    @property
    def root(self) -> bytes:
        return bytes.fromhex(self.fields["root"])


@dataclass(slots=True)
class _Append:
    entry: dict[str, Any]
    done: Future[int]
    linger: bool = False


@dataclass(slots=True)
class _Command:
    kind: str  # "checkpoint" or "close"
    done: Future[Checkpoint | None]


class AuditLog:
    def __init__(
        self,
        path: Path,
        identity: NodeIdentity,
        *,
        origin: str,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 10.0,
        linger_s: float = LINGER_S,
        clock: Clock = _now,
    ) -> None:
        self.path = path
        self.origin = origin
        self._identity = identity
        self._every = checkpoint_every
        self._seconds = checkpoint_seconds
        self._clock = clock
        self._linger_s = linger_s
        self._queue: queue.SimpleQueue[_Append | _Command] = queue.SimpleQueue()
        # Set when something that must not linger is queued: it cuts the writer's wait short.
        self._urgent = threading.Event()
        self._tree = CompactRange()
        self._latest: Checkpoint | None = None
        self._prev = GENESIS
        self._signed_size = 0
        self._last_signed_at = time.monotonic()
        # Entries below this index are durable and their appenders released (in that order).
        self.committed = 0
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()
        self._ready.result()  # re-raises an AuditLogError from opening

    @property
    def public_key(self) -> bytes:
        return self._identity.public_key

    # --- writing --------------------------------------------------------------------------------

    def append(self, entry: Mapping[str, Any]) -> int:
        """Append one entry; returns its index once it is durable on disk."""
        return self.submit(entry).result()

    def submit(self, entry: Mapping[str, Any], *, linger: bool = False) -> Future[int]:
        """Queue one entry; the future gets its index once it is durable.

        `linger`: nobody waits for this entry and it is on record elsewhere until then (the
        `Recorder` journals request rows), so the writer may hold it up to `linger_s` and
        commit it with the entries that follow. At low load that is one commit (an fsync,
        and the writer thread taking the interpreter lock) per group of requests instead of
        one per request, off the serving thread's back.
        """
        done: Future[int] = Future()
        self._queue.put(_Append(dict(entry), done, linger))
        if not linger:
            self._urgent.set()
        return done

    async def append_async(self, entry: Mapping[str, Any]) -> int:
        return await asyncio.wrap_future(self.submit(entry))

    def checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint now (None when nothing was appended since the last one)."""
        done: Future[Checkpoint | None] = Future()
        self._queue.put(_Command("checkpoint", done))
        self._urgent.set()
        return done.result()

    def lag(self) -> tuple[int, float]:
        """Entries no signed checkpoint covers yet, and seconds since the writer last signed
        (or found nothing to sign): what the checkpoint-staleness metric reports."""
        return self._tree.size - self._signed_size, time.monotonic() - self._last_signed_at

    def close(self) -> None:
        """Commit what is queued, sign a final checkpoint, and stop the writer."""
        if not self._thread.is_alive():
            return
        done: Future[Checkpoint | None] = Future()
        self._queue.put(_Command("close", done))
        self._urgent.set()
        done.result()
        self._thread.join()

    # --- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            db = self._open()
        except AuditLogError as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            self._serve(db)
        finally:
            db.close()

    def _open(self) -> sqlite3.Connection:
        try:
            private_database(self.path)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise AuditLogError(f"Cannot open the audit log {self.path}: {exc}.") from exc
        for (body,) in db.execute("SELECT body FROM entries ORDER BY idx"):
            self._prev = leaf_hash(body)
            self._tree.append(self._prev)
        last = db.execute("SELECT max(size) FROM checkpoints").fetchone()[0]
        self._signed_size = last or 0
        self.committed = self._tree.size
        self._check_head()
        return db

    def _check_head(self) -> None:
        signed = read_head(self.path)
        if signed is not None and signed.size > self._tree.size:
            raise AuditLogError(
                f"The audit log {self.path} has {self._tree.size} entries but this node "
                f"already signed a checkpoint for {signed.size}: the database was restored "
                "from an older copy or truncated. Restore the newest copy; do not start on "
                "this one."
            )

    def _serve(self, db: sqlite3.Connection) -> None:
        while True:
            batch = self._next_batch()
            appends = [item for item in batch if isinstance(item, _Append)]
            commands = [item for item in batch if isinstance(item, _Command)]
            for chunk, last in self._chunks(appends):
                self._commit_and_release(db, chunk, sign_now=last and bool(commands))
            if not appends and (commands or self._timer_due()):
                self._commit_and_release(db, [], sign_now=bool(commands))
            for command in commands:
                command.done.set_result(self._latest)
            if any(command.kind == "close" for command in commands):
                return

    def _chunks(self, appends: list[_Append]) -> Iterator[tuple[list[_Append], bool]]:
        """Split a batch so that every `checkpoint_every`-th entry ends a transaction."""
        start = 0
        while start < len(appends):
            room = self._every - (self._tree.size - self._signed_size)
            end = min(len(appends), start + max(1, room))
            yield appends[start:end], end == len(appends)
            start = end

    def _timer_due(self) -> bool:
        return time.monotonic() - self._last_signed_at >= self._seconds

    def _commit_and_release(
        self, db: sqlite3.Connection, appends: list[_Append], *, sign_now: bool
    ) -> None:
        reaches = self._tree.size + len(appends) - self._signed_size >= self._every
        try:
            first = self._commit(db, appends, sign=sign_now or reaches or self._timer_due())
        except (sqlite3.Error, OSError) as exc:
            error = AuditLogError(f"Writing the audit log {self.path} failed: {exc}.")
            for item in appends:
                item.done.set_exception(error)
            return
        for offset, item in enumerate(appends):
            item.done.set_result(first + offset)
        self.committed = first + len(appends)

    def _next_batch(self) -> list[_Append | _Command]:
        timeout = max(0.01, self._seconds - (time.monotonic() - self._last_signed_at))
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        if isinstance(batch[0], _Append) and batch[0].linger:
            self._urgent.wait(self._linger_s)  # for company, unless something must go now
        # Cleared before draining: whatever set it was queued before it did, so it is drained
        # now; a set that comes later leaves it set, and the next wait does not linger.
        self._urgent.clear()
        while len(batch) < _BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _commit(self, db: sqlite3.Connection, appends: list[_Append], *, sign: bool) -> int:
        """One transaction: the batch, and a checkpoint when one is due. Returns the first index."""
        first = self._tree.size
        before, prev = copy.deepcopy(self._tree), self._prev
        bodies = self._chain(appends, first)
        signed: Checkpoint | None = None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO entries (idx, body) VALUES (?, ?)",
                [(first + offset, body) for offset, body in enumerate(bodies)],
            )
            if sign and self._tree.size > self._signed_size:
                signed = self._sign()
                db.execute(
                    "INSERT INTO checkpoints (size, body, signature) VALUES (?, ?, ?)",
                    (signed.size, signed.body, signed.signature),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._tree, self._prev = before, prev
            raise
        if signed is not None:
            self._signed_size = signed.size
            self._last_signed_at = time.monotonic()
            self._latest = signed
            self._write_head(signed)
        elif sign:
            self._last_signed_at = time.monotonic()
        return first

    def _chain(self, appends: list[_Append], first: int) -> list[bytes]:
        """Number each entry and link it to its predecessor's leaf hash (a hash chain)."""
        bodies = []
        for offset, item in enumerate(appends):
            stamp = {"index": first + offset, "prev": self._prev.hex()}
            if "time" not in item.entry:
                stamp["time"] = self._stamp()
            body = canonical(item.entry | stamp)
            self._prev = leaf_hash(body)
            self._tree.append(self._prev)
            bodies.append(body)
        return bodies

    def _stamp(self) -> str:
        return self._clock().astimezone(UTC).isoformat(timespec="milliseconds")

    def _sign(self) -> Checkpoint:
        body = canonical(
            {
                "origin": self.origin,
                "size": self._tree.size,
                "root": self._tree.root().hex(),
                "time": self._stamp(),
            }
        )
        return Checkpoint(body, self._identity.sign(body))

    def _write_head(self, checkpoint: Checkpoint) -> None:
        head = head_path(self.path)
        temporary = private_file(head.with_name(head.name + ".tmp"))
        record = {"body": checkpoint.body.decode(), "signature": checkpoint.signature.hex()}
        with temporary.open("w") as out:
            out.write(json.dumps(record))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, head)


def head_path(db: Path) -> Path:
    """Where the node keeps its latest signed checkpoint, outside the database."""
    return db.with_name(db.name + ".head")


def read_head(db: Path) -> Checkpoint | None:
    path = head_path(db)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return Checkpoint(record["body"].encode(), bytes.fromhex(record["signature"]))


def read_log(path: Path) -> tuple[list[bytes], list[Checkpoint]]:
    """Entries and checkpoints from one read transaction (one consistent snapshot)."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)) as db:
        db.execute("BEGIN")
        bodies = [bytes(body) for (body,) in db.execute("SELECT body FROM entries ORDER BY idx")]
        rows = db.execute("SELECT body, signature FROM checkpoints ORDER BY size").fetchall()
        db.execute("COMMIT")
    return bodies, [Checkpoint(bytes(body), bytes(signature)) for body, signature in rows]


def read_entries(path: Path, start: int = 0) -> list[bytes]:
    """Every entry body from index `start` on, in order, from a read-only connection."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        query = "SELECT body FROM entries WHERE idx >= ? ORDER BY idx"
        return [bytes(body) for (body,) in db.execute(query, (start,))]


def read_checkpoints(path: Path) -> list[Checkpoint]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT body, signature FROM checkpoints ORDER BY size").fetchall()
    return [Checkpoint(bytes(body), bytes(signature)) for body, signature in rows]
