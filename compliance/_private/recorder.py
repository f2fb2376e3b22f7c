"""What one node writes into its audit log, per each org's logging mode.

Modes, strictest last: `full` (metadata, plus request and response content sealed in the
vault for the retention period), `metadata` (counts, timings, status; no content), `zero`
(no per-request rows at all). A node-wide floor can only make an org's mode stricter.
Management events are audited in every mode.

Request rows are journaled (`audit.journal`, `federation.Journal`): `begin` writes the row a
request would leave if the process died before it ended (status `interrupted`), `request`
the row it did leave. Neither waits for the disk. At start-up, the journaled rows that the
log does not hold are appended, so a SIGKILL loses no request's row and duplicates none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

from compliance._private.log import AuditLog, read_entries
from compliance._private.vault import (
    Clock,
    ContentVault,
    Purged,
    SealedContent,
    load_or_create_content_key,
)
from federation import (
    INTERRUPTED,
    AuditEvent,
    Journal,
    LoggingMode,
    NodeIdentity,
    RequestRecord,
    boot_id,
    effective_mode,
    journal_epoch,
    write_private,
)

log = logging.getLogger("palisade.compliance")
_ROTATE_BYTES = 4 * 1024 * 1024
_PURGE_EVERY_S = 60.0
_PURGE_EVENT_IDS = 1000  # request ids per `content_purged` event


class _Header(msgspec.Struct, tag="h", tag_field="t"):
    epoch: str
    boot: str
    start: int  # the log's size when this epoch began: later rows are at or past it


class _Begun(msgspec.Struct, tag="b", tag_field="t"):
    row: dict[str, Any]  # what the request leaves if it never ends (status `interrupted`)


class _Ended(msgspec.Struct, tag="e", tag_field="t"):
    row: dict[str, Any]


_LINE = msgspec.json.Decoder(_Header | _Begun | _Ended)
_ENCODE = msgspec.json.encode


class Recorder:
    """The node's audit log, its content vault, and the tenancy store's audit sink."""

    def __init__(
        self,
        home: Path,
        *,
        origin: str,
        floor: LoggingMode = "full",
        retention_days: int = 30,
        clock: Clock = lambda: datetime.now(UTC),
    ) -> None:
        self.home = home
        self.origin = origin
        self.floor = floor
        self.identity = NodeIdentity.load_or_create(home)
        # What auditors pin with `palisade audit verify --trusted-key @node.pub`.
        write_private(home / "node.pub", self.identity.public_key.hex() + "\n")
        self.log = AuditLog(home / "audit.db", self.identity, origin=origin)
        self.vault = ContentVault(
            home / "content.db",
            load_or_create_content_key(home),
            retention=timedelta(days=retention_days),
            clock=clock,
        )
        self._purging: set[str] = set()  # on their way out: their purge is being recorded
        self._purge_lock = threading.Lock()
        self._closing = threading.Event()
        self._journal = Journal(home / "audit.journal")
        self._open: dict[str, bytes] = {}  # begun, not ended
        self._unacked: dict[str, bytes] = {}  # ended, not yet durable in the log
        self.recovered = self._recover()
        self.purge_content()
        self._purger = threading.Thread(
            target=self._purge_periodically, name="palisade-content-purge", daemon=True
        )
        self._purger.start()

    @property
    def db(self) -> Path:
        return self.log.path

    def close(self) -> None:
        self._closing.set()
        self._purger.join()
        self.log.close()  # after the purger: every purge it recorded is deleted too
        self.vault.close()
        if not self._open and not self._unacked:
            self._new_epoch([])  # every row is in the log: nothing to recover next time
        self._journal.close()

    # --- the tenancy store's audit sink ---------------------------------------------------------

    async def record(
        self, event: str, actor: str, org: str | None, payload: dict[str, Any]
    ) -> None:
        await self.log.append_async(_management(event, actor, org, payload))

    async def events(self, org: str | None) -> list[AuditEvent]:
        found = []
        for body in read_entries(self.log.path):
            entry = json.loads(body)
            if entry.get("kind") == "management" and (org is None or entry.get("org") == org):
                found.append(
                    AuditEvent(
                        id=entry["index"],
                        at=entry["time"],
                        event=entry["event"],
                        actor=entry["actor"],
                        org=entry["org"],
                        payload=entry["payload"],
                    )
                )
        return found

    # --- requests -------------------------------------------------------------------------------

    def mode_for(self, org_mode: str) -> str:
        return effective_mode(org_mode, self.floor)

    def begin(self, org_mode: str, record: RequestRecord) -> None:
        """Journal the row an admitted request leaves if this process dies before it ends
        (its `status` is `interrupted`); `request` with the same `id` ends it."""
        if self.mode_for(org_mode) == "zero":
            return
        line = _ENCODE(_Begun(record.row()))
        self._journal_line(line)
        self._open[record.id] = line

    def request(self, org_mode: str, record: RequestRecord) -> None:
        """Queue one request's metadata row (not awaited: the response never waits). It is
        journaled, so it may linger in the log's writer and share a commit with the rows
        that follow it (`AuditLog.submit`)."""
        if self.mode_for(org_mode) == "zero":
            return
        row_id, entry = record.id, record.row()
        line = _ENCODE(_Ended(entry))
        self._journal_line(line)
        self._open.pop(row_id, None)
        self._unacked[row_id] = line  # before submitting: the writer thread acknowledges it
        done = self.log.submit({"kind": "request", **entry}, linger=True)
        done.add_done_callback(partial(self._acknowledged, row_id))
        if self._journal.size > _ROTATE_BYTES:
            self._new_epoch([*self._open.values(), *self._unacked.values()])

    def _acknowledged(self, row_id: str, done: Future[int]) -> None:
        """On the writer thread: the row is durable (a failed one stays, for recovery)."""
        if done.exception() is None:
            self._unacked.pop(row_id, None)

    # --- the journal ------------------------------------------------------------------------------

    def _journal_line(self, line: bytes) -> None:
        """Never fails a request: without the line, only a crash before the row is
        committed loses the row."""
        try:
            self._journal.append(line)
        except OSError:
            log.exception("the audit journal could not record a request row")

    def _new_epoch(self, carried: list[bytes]) -> None:
        # `committed` is read before the unacknowledged rows are copied, and the writer
        # thread drops a row from them before it moves `committed` past it: every carried
        # row is at or past `start`, where recovery looks for it.
        header = _Header(journal_epoch(), boot_id(), self.log.committed)
        self._journal.start([_ENCODE(header), *carried], durable=not carried)

    def _recover(self) -> int:
        """Append the journaled rows the log lacks; returns how many."""
        lines = self._journal.read()
        missing: list[dict[str, Any]] = []
        if lines:
            start, rows = _journaled(lines)
            present = _request_ids(read_entries(self.log.path, start))
            missing = [row for row_id, row in rows.items() if row_id not in present]
            done = [self.log.submit({"kind": "request", **row}) for row in missing]
            for future in done:
                future.result()
            if missing:
                interrupted = sum(1 for row in missing if row.get("status") == INTERRUPTED)
                log.warning(
                    "recovered %d request rows from the audit journal (%d interrupted)",
                    len(missing),
                    interrupted,
                )
        self._new_epoch([])
        return len(missing)

    def content(self, org_mode: str, record_id: str, org: str, content: dict[str, Any]) -> None:
        """Seal a request's content, only for orgs whose effective mode is `full`."""
        if self.mode_for(org_mode) != "full":
            return
        self.vault.seal(record_id, org, json.dumps(content, ensure_ascii=False).encode())

    def purge_content(self) -> Purged:
        """Delete sealed content past its retention (at start, then every minute). Each
        org's purge is first a management event in the log; its records are deleted once
        that event is durable, so no purge goes unrecorded, and none is recorded twice."""
        with self._purge_lock:
            purged = self.vault.expired(skip=self._purging)
            for ids in purged.ids_by_org.values():
                self._purging.update(ids)
        for org, ids in purged.ids_by_org.items():
            for start in range(0, len(ids), _PURGE_EVENT_IDS):  # bounded entries
                batch = ids[start : start + _PURGE_EVENT_IDS]
                payload = {"request_ids": batch, "sealed_before": purged.before}
                done = self.log.submit(_management("content_purged", "system", org, payload))
                done.add_done_callback(partial(self._purge_recorded, batch, purged.before))
        return purged

    def _purge_periodically(self) -> None:
        while not self._closing.wait(_PURGE_EVERY_S):
            try:
                self.purge_content()
            except Exception:  # the next round retries; serving goes on
                log.exception("sealed content past its retention could not be purged")

    def _purge_recorded(self, ids: list[str], before: str, done: Future[int]) -> None:
        """On the log's writer thread: the purge is on record, so the content goes."""
        if done.exception() is None:
            self.vault.delete(ids, before=before)
        with self._purge_lock:
            self._purging.difference_update(ids)

    async def read_content(
        self, record_id: str, actor: str, *, visible: Callable[[str], bool]
    ) -> SealedContent | None:
        """A request's sealed content, if its org is `visible` to the reader; the read is
        in the log before the content is returned."""
        found = await asyncio.to_thread(self.vault.read, record_id)
        if found is None or not visible(found.org):
            return None
        await self.record("content_read", actor, found.org, {"request_id": record_id})
        return found


def _management(event: str, actor: str, org: str | None, payload: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "management", "event": event, "actor": actor, "org": org, "payload": payload}


def _journaled(lines: list[bytes]) -> tuple[int, dict[str, dict[str, Any]]]:
    """Where the journal's rows may be in the log, and each row by id (an end overrides
    its beginning). A line torn by a power cut is skipped."""
    start: int | None = None
    rows: dict[str, dict[str, Any]] = {}
    for line in lines:
        try:
            item = _LINE.decode(line)
        except msgspec.DecodeError:
            continue
        if isinstance(item, _Header):
            start = item.start if start is None else start
        elif isinstance(item, _Ended) or item.row["id"] not in rows:
            rows[item.row["id"]] = item.row
    return start or 0, rows


def _request_ids(bodies: list[bytes]) -> set[str]:
    ids = set()
    for body in bodies:
        entry = json.loads(body)
        if entry.get("kind") == "request" and "id" in entry:
            ids.add(entry["id"])
    return ids
