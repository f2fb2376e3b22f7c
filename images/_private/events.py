"""The image agent's event file, `DATA/image/events.jsonl`: one JSON object per line, fsynced.

The agent writes here, not into the audit log, because the audit log belongs to the
appliance process (one writer). The appliance reads the file at start and every few seconds
and appends each event it has not yet logged as a management row (idempotent by `id`:
`appliance/_private/image_events.py`), so "which signed image ran on which node, when"
ends up in the tamper-evident log.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec

from federation import sync_directory

IMAGE_DIR = "image"
EVENTS_FILE = "events.jsonl"
EventName = Literal[
    "image.install", "image.boot", "image.commit", "image.rollback", "image.mark_bad"
]


class ImageEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One thing that happened to a slot. `detail`: why (or, for a boot, trial/committed)."""

    id: str
    event: EventName
    at: str
    slot: str
    version: str
    digest: str
    detail: str = ""


def events_path(data_dir: Path) -> Path:
    return data_dir / IMAGE_DIR / EVENTS_FILE


def record_event(
    data_dir: Path,
    event: EventName,
    *,
    slot: str,
    version: str,
    digest: str,
    detail: str = "",
) -> ImageEvent:
    """Append one event and fsync it before returning."""
    item = ImageEvent(
        id=f"img-{os.urandom(12).hex()}",
        event=event,
        at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        slot=slot,
        version=version,
        digest=digest,
        detail=detail,
    )
    append_line(events_path(data_dir), msgspec.json.encode(item))
    return item


def read_events(data_dir: Path) -> list[ImageEvent]:
    """Every whole, well-formed event in the file (torn or foreign lines are skipped)."""
    try:
        lines = events_path(data_dir).read_bytes().splitlines()
    except FileNotFoundError:
        return []
    decoder = msgspec.json.Decoder(ImageEvent)
    events = []
    for line in lines:
        try:
            events.append(decoder.decode(line))
        except msgspec.DecodeError:
            continue
    return events


def append_line(path: Path, line: bytes) -> None:
    """Append `line` + newline durably. A line torn by a crash is ended first, so that it
    stays one malformed line instead of swallowing this one."""
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (b"\n" if torn else b"") + line + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        sync_directory(path.parent)
