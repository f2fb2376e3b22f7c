"""The image agent's events file into the appliance's audit log: exactly once, by event id,
across restarts and a crash between a row and the cursor; hostile lines never crash it."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

from appliance._private.image_events import ACTOR, ImageEventFeed
from compliance import Recorder, Scope, build_export, read_entries
from federation import NodeIdentity
from images import read_events, record_event
from tests.e2e.fleet import upstream_toml
from tests.standin import run_standin
from tests.support import run_appliance, run_palisade, wait_for

DIGEST = "ab" * 32
REWOUND = b'{"offset":0,"log_size":0}'
HOSTILE = (
    b"not json at all\n",
    b'["a", "list"]\n',
    b'{"id": 5, "event": "image.boot"}\n',
    b'{"id": "x1", "event": "image.format_disk"}\n',
    b'{"id": "bad id with spaces", "event": "image.boot"}\n',
    b'{"id": "img-huge", "event": "image.boot", "detail": "' + b"x" * 20_000 + b'"}\n',
)


def image_rows(home: Path) -> list[dict[str, Any]]:
    db = home / "audit.db"
    if not db.exists():
        return []
    rows = [json.loads(body) for body in read_entries(db)]
    return [row for row in rows if str(row.get("event", "")).startswith("image.")]


def append_raw(home: Path, data: bytes) -> None:
    path = home / "image" / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as file:
        file.write(data)


def cursor_caught_up(home: Path) -> bool:
    cursor = home / "image" / "events.cursor"
    events = home / "image" / "events.jsonl"
    if not cursor.exists():
        return False
    return bool(json.loads(cursor.read_bytes())["offset"] == events.stat().st_size)


def test_appliance_logs_each_image_event_once(tmp_path: Path) -> None:
    home = tmp_path / "node"
    boot = record_event(home, "image.boot", slot="A", version="1.0.0", digest=DIGEST)
    append_raw(home, b"".join(HOSTILE))
    install = record_event(home, "image.install", slot="B", version="1.1.0", digest=DIGEST)
    with run_standin() as standin:
        config = upstream_toml(standin, "cpu")
        with run_appliance(home, config) as appliance:
            wait_for(lambda: len(image_rows(home)) == 2, timeout=15)
            commit = record_event(home, "image.commit", slot="B", version="1.1.0", digest=DIGEST)
            wait_for(lambda: len(image_rows(home)) == 3, timeout=15)
            assert appliance.process.poll() is None
            assert "skipping a malformed image event" in appliance.log_text()
        # A crash after the rows were appended but before the cursor moved: the next start
        # reads the whole file again and must not log any event twice.
        (home / "image" / "events.cursor").write_bytes(REWOUND)
        with run_appliance(home, config):
            wait_for(lambda: cursor_caught_up(home), timeout=15)
    rows = image_rows(home)
    assert Counter(row["payload"]["id"] for row in rows) == {
        boot.id: 1,
        install.id: 1,
        commit.id: 1,
    }
    assert [row["event"] for row in rows] == ["image.boot", "image.install", "image.commit"]
    assert {row["actor"] for row in rows} == {ACTOR}
    assert rows[1]["payload"] | {"at": None} == {
        "id": install.id,
        "event": "image.install",
        "at": None,
        "slot": "B",
        "version": "1.1.0",
        "digest": DIGEST,
    }
    assert_log_verifies(home, tmp_path / "export.json")


def assert_log_verifies(home: Path, export: Path) -> None:
    """The rows are in the tamper-evident log: a signed export passes `palisade audit verify`."""
    identity = NodeIdentity.load_or_create(home)
    export.write_bytes(
        build_export(home / "audit.db", identity, origin="appliance-local", scope=Scope())
    )
    result = run_palisade("audit", "verify", str(export), "--trusted-key", f"@{home / 'node.pub'}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_torn_line_waits_for_its_end_and_a_rewound_cursor_logs_nothing_twice(
    tmp_path: Path,
) -> None:
    home = tmp_path
    recorder = Recorder(home, origin="node-1")
    feed = ImageEventFeed(recorder, home)
    try:
        first = record_event(home, "image.boot", slot="A", version="1.0.0", digest=DIGEST)
        line = b'{"id":"img-torn","event":"image.rollback","slot":"A","version":"1.0.0"'
        append_raw(home, line)  # the writer is mid-line
        assert asyncio.run(feed.ingest()) == 1
        append_raw(home, b"}\n")
        assert asyncio.run(feed.ingest()) == 1
        assert asyncio.run(feed.ingest()) == 0
        (home / "image" / "events.cursor").write_bytes(REWOUND)  # crash before the cursor
        assert asyncio.run(feed.ingest()) == 0
    finally:
        recorder.close()
    ids = [row["payload"]["id"] for row in image_rows(home)]
    assert ids == [first.id, "img-torn"]


def test_a_torn_line_left_by_a_crash_does_not_swallow_the_next_event(tmp_path: Path) -> None:
    append_raw(tmp_path, b'{"id":"img-half","event":"image.bo')  # the agent died mid-write
    after = record_event(tmp_path, "image.boot", slot="B", version="2.0.0", digest=DIGEST)
    assert [event.id for event in read_events(tmp_path)] == [after.id]
