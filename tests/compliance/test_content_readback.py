"""Reading back sealed content (`full` logging): exactly what was sent and produced, each read
an audit row; and retention with an injected clock, the purge itself an audit row.

The read-back runs on one real appliance (tenancy on, a scripted engine) through the
`openai` SDK, the HTTP route and the `palisade audit content` CLI; retention on a `Recorder`
in-process, whose clock the test moves.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from compliance import Recorder, read_entries
from compliance._private import recorder as recorder_module
from tests.federation.tenants import Admin, Member, admin_of
from tests.support import Appliance, run_appliance, run_palisade, wait_for

ORG, OTHER, MODEL, REPLY = "acme", "globex", "echo", "the sealed answer"
CONFIG = (
    f'region = "eu-west"\n[[models]]\nengine = "scripted"\nid = "{MODEL}"\nreplies = ["{REPLY}"]\n'
)


@dataclass
class Site:
    appliance: Appliance
    admin: Admin
    members: dict[str, Member]

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(body) for body in read_entries(self.appliance.home / "audit.db")]

    def reads_of(self, request_id: str) -> list[dict[str, Any]]:
        return [
            entry
            for entry in self.entries()
            if entry.get("event") == "content_read"
            and entry["payload"] == {"request_id": request_id}
        ]

    def content(self, member: str, request_id: str) -> httpx.Response:
        caller = self.admin.as_member(self.members[member])
        return caller.call("GET", f"/admin/v1/audit/content/{request_id}")

    def cli(self, member: str, *args: str) -> Any:
        env = {"PALISADE_URL": self.appliance.url, "PALISADE_API_KEY": self.members[member].key}
        return run_palisade("audit", "content", *args, env=env)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_appliance(tmp_path_factory.mktemp("readback"), CONFIG) as appliance:
        admin = admin_of(appliance)
        for org, mode in ((ORG, "full"), (OTHER, "full")):
            body = {"name": org, "regions": ["eu-west"], "logging_mode": mode}
            admin.ok("POST", "/admin/v1/orgs", body)
        members = {
            role: admin.member(ORG, role, f"{role}@acme.example")
            for role in ("org_user", "org_admin", "org_auditor")
        }
        members["other_auditor"] = admin.member(OTHER, "org_auditor", "audit@globex.example")
        yield Site(appliance, admin, members)


def _client(site: Site) -> openai.OpenAI:
    return openai.OpenAI(base_url=site.appliance.v1, api_key=site.members["org_user"].key)


def _sealed(site: Site, request_id: str) -> httpx.Response:
    """The auditor's read once the content is sealed (a stream seals after its last event)."""
    return wait_for(
        lambda: answer if (answer := site.content("org_auditor", request_id)).is_success else None
    )


def test_read_back_is_what_was_sent_and_produced(site: Site) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is sealed? ünïcode ✓"},
    ]
    with _client(site) as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0
        )
    answer = _sealed(site, completion.id).json()
    assert answer["id"] == completion.id
    assert answer["org"] == ORG
    assert answer["node"]
    # The JSON the openai SDK sent, field for field: nothing added, nothing decoded away.
    sent = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0}
    assert answer["content"]["request"] == sent
    assert answer["content"]["response"] == completion.choices[0].message.content == REPLY


def test_a_streamed_answer_is_sealed_whole(site: Site) -> None:
    with _client(site) as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "stream it"}], stream=True
        )
        chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    answer = _sealed(site, chunks[0].id).json()
    assert answer["content"]["response"] == text == REPLY
    assert answer["content"]["request"]["stream"] is True


def test_every_read_is_an_audit_row(site: Site) -> None:
    with _client(site) as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "count my reads"}]
        )
    _sealed(site, completion.id)
    cli = site.cli("org_auditor", completion.id, "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["content"]["response"] == REPLY
    reads = site.reads_of(completion.id)
    assert len(reads) == 2  # the HTTP read and the CLI's, each recorded before it answered
    assert {read["actor"] for read in reads} == {site.members["org_auditor"].user_id}
    assert {read["org"] for read in reads} == {ORG}
    human = site.cli("org_auditor", completion.id)
    assert human.returncode == 0, human.stderr
    assert f"Request {completion.id} of org {ORG}" in human.stdout
    assert REPLY in human.stdout
    assert len(site.reads_of(completion.id)) == 3


def test_only_an_entitled_auditor_reads(site: Site) -> None:
    with _client(site) as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "not for everyone"}]
        )
    _sealed(site, completion.id)
    before = len(site.reads_of(completion.id))
    for member in ("org_user", "org_admin"):
        denied = site.content(member, completion.id)
        assert denied.status_code == 403, denied.text
        assert denied.json()["error"]["code"] == "permission_denied"
    denied = site.admin.call("GET", f"/admin/v1/audit/content/{completion.id}")
    assert denied.status_code == 403  # the system admin runs the node; it does not read
    # Another org's auditor cannot tell the request exists.
    hidden = site.content("other_auditor", completion.id)
    assert hidden.status_code == 404
    assert hidden.json()["error"]["code"] == "content_not_found"
    missing = site.content("org_auditor", "chatcmpl-never-was")
    assert missing.status_code == 404
    hidden_error, missing_error = hidden.json()["error"], missing.json()["error"]
    assert (hidden_error["code"], hidden_error["param"]) == (missing_error["code"], "request_id")
    assert len(site.reads_of(completion.id)) == before  # refused reads read nothing
    cli = site.cli("org_auditor", "chatcmpl-never-was")
    assert cli.returncode == 1
    assert cli.stderr.startswith("error: ")
    assert "content_not_found" in cli.stderr or "No sealed content" in cli.stderr


# --- retention, with an injected clock ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _read(recorder: Recorder, request_id: str) -> bytes | None:
    found = asyncio.run(recorder.read_content(request_id, "usr_auditor", visible=lambda _: True))
    return None if found is None else found.content


def _stored_ids(home: Path) -> set[str]:
    with sqlite3.connect(home / "content.db") as db:
        return {row[0] for row in db.execute("SELECT id FROM content")}


def _events(home: Path, event: str) -> list[dict[str, Any]]:
    entries = (json.loads(body) for body in read_entries(home / "audit.db"))
    return [entry for entry in entries if entry.get("event") == event]


def test_retention_purges_content_and_records_the_purge(tmp_path: Path) -> None:
    clock = Clock()
    recorder = Recorder(tmp_path, origin="node-a", retention_days=30, clock=clock)
    try:
        old = {"request": {"messages": [{"role": "user", "content": "old"}]}, "response": "o"}
        recorder.content("full", "req-old", ORG, old)
        recorder.content("full", "req-other", OTHER, old)
        clock.now += timedelta(days=29)
        recorder.content("full", "req-new", ORG, {"request": {}, "response": "new"})
        assert json.loads(_read(recorder, "req-old") or b"") == old  # within its retention
        assert _events(tmp_path, "content_purged") == []

        clock.now += timedelta(days=2)  # req-old and req-other are now 31 days old
        assert _read(recorder, "req-old") is None  # past retention: never read back
        recorder.purge_content()
        wait_for(lambda: _stored_ids(tmp_path) == {"req-new"})
        assert json.loads(_read(recorder, "req-new") or b"")["response"] == "new"
    finally:
        recorder.close()
    purges = {entry["org"]: entry for entry in _events(tmp_path, "content_purged")}
    assert set(purges) == {ORG, OTHER}
    assert purges[ORG]["payload"]["request_ids"] == ["req-old"]
    assert purges[OTHER]["payload"]["request_ids"] == ["req-other"]
    assert purges[ORG]["actor"] == "system"
    cutoff = datetime.fromisoformat(purges[ORG]["payload"]["sealed_before"])
    assert cutoff == clock.now - timedelta(days=30)
    reads = _events(tmp_path, "content_read")
    assert [read["payload"]["request_id"] for read in reads] == ["req-old", "req-new"]


def test_a_restart_purges_what_expired_while_it_was_down(tmp_path: Path) -> None:
    clock = Clock()
    recorder = Recorder(tmp_path, origin="node-a", retention_days=1, clock=clock)
    recorder.content("full", "req-1", ORG, {"request": {}, "response": "x"})
    recorder.close()
    clock.now += timedelta(days=2)
    recorder = Recorder(tmp_path, origin="node-a", retention_days=1, clock=clock)
    try:
        wait_for(lambda: _stored_ids(tmp_path) == set())
    finally:
        recorder.close()
    assert [e["payload"]["request_ids"] for e in _events(tmp_path, "content_purged")] == [["req-1"]]


def test_a_purge_is_recorded_once_and_only_when_something_expired(tmp_path: Path) -> None:
    clock = Clock()
    recorder = Recorder(tmp_path, origin="node-a", retention_days=1, clock=clock)
    try:
        recorder.content("full", "req-1", ORG, {"request": {}, "response": "x"})
        clock.now += timedelta(days=2)
        first = recorder.purge_content()
        again = recorder.purge_content()  # its purge may not be durable yet: not twice
        wait_for(lambda: _stored_ids(tmp_path) == set())
        after = recorder.purge_content()  # nothing left to purge: no event
    finally:
        recorder.close()
    assert first.ids_by_org == {ORG: ["req-1"]}
    assert again.ids_by_org == after.ids_by_org == {}
    assert len(_events(tmp_path, "content_purged")) == 1


def test_a_large_purge_is_recorded_in_bounded_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "_PURGE_EVENT_IDS", 2)  # 1000 in production
    clock = Clock()
    recorder = Recorder(tmp_path, origin="node-a", retention_days=1, clock=clock)
    ids = ["req-1", "req-2", "req-3"]
    try:
        for record_id in ids:
            recorder.content("full", record_id, ORG, {"request": {}, "response": "x"})
        clock.now += timedelta(days=2)
        recorder.purge_content()
        wait_for(lambda: _stored_ids(tmp_path) == set())
    finally:
        recorder.close()
    events = _events(tmp_path, "content_purged")
    assert [e["payload"]["request_ids"] for e in events] == [["req-1", "req-2"], ["req-3"]]
