"""Image events (install, boot, commit, rollback, mark bad) into the node's audit log.

The image agent (`palisade image agent` / `supervise`) appends one JSON object per line to
`PALISADE_HOME/image/events.jsonl` and fsyncs it; it never opens the audit log, which has
one writer, this process. `ImageEventFeed` reads the file at start and every few seconds
and appends each event as a management row (`event` = the event's name, actor
`image-agent`, payload = the event's fields).

Exactly once, by event id: a cursor (`image/events.cursor`) keeps how far the file was
read and how long the audit log was then. After a crash between appending a row and
moving the cursor, the rows logged since that length are read back and their ids skipped.
The appliance does not import `images`: the file is a plain JSON-lines contract.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import msgspec

from compliance import Recorder, read_entries
from federation import cancel_and_wait, replace_private

log = logging.getLogger("palisade.appliance.image")

ACTOR = "image-agent"
EVENTS = frozenset(
    {"image.install", "image.boot", "image.commit", "image.rollback", "image.mark_bad"}
)
POLL_S = 2.0
_EVENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# One read; a longer run of bytes without a newline is skipped as one malformed line.
_CHUNK = 1024 * 1024
# An event is a few hundred bytes; a longer line is not one the agent wrote.
MAX_EVENT_BYTES = 16 * 1024


class _Cursor(msgspec.Struct):
    offset: int = 0  # bytes of the events file already logged (whole lines)
    log_size: int = 0  # the audit log's length when `offset` was written


class ImageEventFeed:
    """Follows the agent's event file into the audit log."""

    def __init__(self, recorder: Recorder, home: Path, *, poll_s: float = POLL_S) -> None:
        self.recorder = recorder
        self.path = home / "image" / "events.jsonl"
        self.cursor_path = home / "image" / "events.cursor"
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            try:
                await self.ingest()
            except OSError:
                log.exception("reading the image events in %s failed; retrying", self.path)
            await asyncio.sleep(self.poll_s)

    async def ingest(self) -> int:
        """Log every new whole event in the file; returns how many rows were appended."""
        cursor = self._read_cursor()
        appended = 0
        while True:
            chunk, consumed = await asyncio.to_thread(self._read_from, cursor.offset)
            if consumed == 0:
                return appended
            events = self._parse(chunk, cursor.offset)
            if events:
                logged = await asyncio.to_thread(self._logged_ids, cursor.log_size)
                for event in events:
                    if event["id"] not in logged:
                        await self.recorder.record(event["event"], ACTOR, None, event)
                        logged.add(event["id"])
                        appended += 1
            cursor = _Cursor(cursor.offset + consumed, self.recorder.log.committed)
            await asyncio.to_thread(replace_private, self.cursor_path, msgspec.json.encode(cursor))

    def _read_cursor(self) -> _Cursor:
        try:
            cursor = msgspec.json.decode(self.cursor_path.read_bytes(), type=_Cursor)
        except FileNotFoundError:
            return _Cursor()
        except msgspec.DecodeError:
            log.warning("%s is unreadable; checking every image event again", self.cursor_path)
            return _Cursor()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if cursor.offset > size:  # the file was replaced: every event is checked again
            return _Cursor()
        return cursor

    def _read_from(self, offset: int) -> tuple[bytes, int]:
        """Whole lines from `offset` (a line still being written waits for its newline)."""
        try:
            with self.path.open("rb") as file:
                file.seek(offset)
                chunk = file.read(_CHUNK)
        except FileNotFoundError:
            return b"", 0
        end = chunk.rfind(b"\n")
        if end >= 0:
            return chunk[: end + 1], end + 1
        if len(chunk) == _CHUNK:
            log.warning(
                "skipping %d bytes without a newline at offset %d of %s", _CHUNK, offset, self.path
            )
            return b"", _CHUNK
        return b"", 0

    def _parse(self, chunk: bytes, offset: int) -> list[dict[str, Any]]:
        events = []
        for number, line in enumerate(chunk.splitlines()):
            if not line.strip():
                continue
            event = _event(line)
            if event is None:
                log.warning(
                    "skipping a malformed image event (line %d after offset %d of %s)",
                    number + 1,
                    offset,
                    self.path,
                )
                continue
            events.append(event)
        return events

    def _logged_ids(self, start: int) -> set[str]:
        """Ids of the image events the audit log holds from index `start` on."""
        ids = set()
        for body in read_entries(self.recorder.log.path, start):
            entry = json.loads(body)
            payload = entry.get("payload")
            if entry.get("kind") != "management" or entry.get("event") not in EVENTS:
                continue
            if isinstance(payload, dict) and isinstance(payload.get("id"), str):
                ids.add(payload["id"])
        return ids


def _event(line: bytes) -> dict[str, Any] | None:
    if len(line) > MAX_EVENT_BYTES:
        return None
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    event_id, name = value.get("id"), value.get("event")
    if not isinstance(event_id, str) or not _EVENT_ID.match(event_id) or name not in EVENTS:
        return None
    return value
