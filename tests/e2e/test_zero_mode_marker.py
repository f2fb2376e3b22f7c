"""An org logging in `zero`, served through a real router to two real appliances, leaves no
trace of what it sent or got: a marker string is in no file under the router's or any
node's home, and in none of their logs. An org logging in `full` leaves its content only
sealed, and its auditors read it back through the router from the node that sealed it.

The appliances run the scripted engine with no replies, so every answer echoes the request
(the marker goes out in the answer too). A `metadata` org's request id is the control: it is
found on disk at the router and at the node that served it, so the scan does look there.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from compliance import read_entries
from federation import REQUEST_ID_HEADER
from tests.e2e.fleet import Fleet, running_fleet, served_by
from tests.federation.tenants import Member
from tests.support import Server, run_palisade, wait_for

NODES = ("zero-a", "zero-b")
MODEL = "echo"
ECHO = f'[[models]]\nengine = "scripted"\nid = "{MODEL}"\n'


def _org(fleet: Fleet, name: str, mode: str) -> str:
    fleet.admin.ok(
        "POST", "/admin/v1/orgs", {"name": name, "regions": ["eu-west"], "logging_mode": mode}
    )
    return fleet.admin.member(name, "org_user", f"user@{name}.test").key


def _post(router: Server, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{router.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def _streamed(router: Server, key: str, body: dict[str, Any]) -> str:
    with httpx.stream(
        "POST",
        f"{router.url}/v1/chat/completions",
        json=body | {"stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def _send_marker(fleet: Fleet, key: str, marker: str) -> set[str]:
    """Chat (plain and streamed), a completion and a refused request, each carrying the
    marker; returns the nodes that served them."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": f"Repeat {marker}"}]}
    served: set[str] = set()
    for _ in range(40):  # until every node has served the org (the router spreads load)
        answer = _post(fleet.router, key, "/v1/chat/completions", chat)
        assert answer.status_code == 200, answer.text
        assert marker in answer.json()["choices"][0]["message"]["content"]
        served.add(served_by(answer)[1])
        if served == set(NODES):
            break
    assert marker in _streamed(fleet.router, key, chat)
    completion = _post(
        fleet.router, key, "/v1/completions", {"model": MODEL, "prompt": f"Say {marker}"}
    )
    assert completion.status_code == 200, completion.text
    assert marker in completion.json()["choices"][0]["text"]
    served.add(served_by(completion)[1])
    refused = _post(fleet.router, key, "/v1/chat/completions", chat | {"model": f"no-{marker}"})
    assert refused.status_code == 404, refused.text
    return served


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and needle in path.read_bytes()
    )


def _settled(fleet: Fleet, org: str) -> bool:
    budget = fleet.admin.ok("GET", f"/admin/v1/orgs/{org}/budget")
    return bool(budget["reserved_tokens"] == 0 and budget["used_tokens"] > 0)


def _read_back_through_router(fleet: Fleet, auditors: dict[str, Member], full_marker: str) -> str:
    """A `full` org's request, read back through the router from the node that sealed it:
    by its org's auditor with the CLI, by the fleet-wide auditor over HTTP; another org's
    auditor is told there is nothing. Returns the node."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": f"Keep {full_marker}"}]}
    answer = _post(fleet.router, auditors["user"].key, "/v1/chat/completions", chat)
    assert answer.status_code == 200, answer.text
    node, request_id = served_by(answer)[1], answer.json()["id"]
    env = {"PALISADE_URL": fleet.router.url, "PALISADE_API_KEY": auditors["org_auditor"].key}
    read = run_palisade("audit", "content", request_id, "--node", node, "--json", env=env)
    assert read.returncode == 0, read.stderr
    content = json.loads(read.stdout)["content"]
    assert content["request"]["messages"][0]["content"] == f"Keep {full_marker}"
    assert full_marker in content["response"]
    path = f"/admin/v1/fleet/nodes/{node}/audit/content/{request_id}"
    fleet_wide = fleet.admin.as_member(auditors["auditor"]).call("GET", path)
    assert fleet_wide.status_code == 200, fleet_wide.text
    assert fleet_wide.json()["content"] == content
    other = fleet.admin.as_member(auditors["other"]).call("GET", path)
    assert other.status_code == 404, other.text
    assert other.json()["error"]["code"] == "content_not_found"
    assert fleet.admin.call("GET", path).status_code == 403  # the system admin does not read
    return node


def _auditors(fleet: Fleet) -> dict[str, Member]:
    admin = fleet.admin
    invite = admin.ok("POST", "/admin/v1/invites", {"email": "a@audit.test", "role": "auditor"})
    accepted = httpx.post(
        f"{admin.url}/admin/v1/invites/accept", json={"token": invite["token"]}, timeout=30
    )
    assert accepted.status_code == 201, accepted.text
    data = accepted.json()
    return {
        "user": admin.member("sealed", "org_user", "writer@sealed.test"),
        "org_auditor": admin.member("sealed", "org_auditor", "audit@sealed.test"),
        "other": admin.member("loud", "org_auditor", "audit@loud.test"),
        "auditor": Member(data["user"]["id"], data["key"]["key"], "", None, "auditor"),
    }


def _reads_recorded(home: Path, actor: str) -> int:
    entries = (json.loads(body) for body in read_entries(home / "audit.db"))
    return sum(1 for e in entries if e.get("event") == "content_read" and e["actor"] == actor)


@pytest.mark.slow
def test_zero_leaves_no_trace_and_full_only_content_sealed_for_its_auditors(
    tmp_path: Path,
) -> None:
    marker = f"ZERO-MARKER-{uuid.uuid4().hex}"
    full_marker = f"FULL-MARKER-{uuid.uuid4().hex}"
    with running_fleet(tmp_path) as fleet:
        for node in NODES:
            fleet.start_member(node, "eu-west", ECHO)
        fleet.wait_joined(*NODES)
        zero_key = _org(fleet, "quiet", "zero")
        control_key = _org(fleet, "loud", "metadata")
        _org(fleet, "sealed", "full")
        auditors = _auditors(fleet)

        served = _send_marker(fleet, zero_key, marker)
        control = _post(
            fleet.router,
            control_key,
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "on the record"}]},
        )
        assert control.status_code == 200
        control_node = served_by(control)[1]
        sealing_node = _read_back_through_router(fleet, auditors, full_marker)
        wait_for(lambda: _settled(fleet, "quiet") and _settled(fleet, "loud"))
        servers = {"router": fleet.router, **fleet.members}
        # Stop every process (their journals and logs flushed), then look.
        for server in servers.values():
            server.stop()
        logs = {name: server.log_text() for name, server in servers.items()}

    assert served == set(NODES)
    for needle in (marker, full_marker):  # `full` content is only ever on disk sealed
        assert _files_containing(tmp_path, needle.encode()) == []
        assert [name for name, text in logs.items() if needle in text] == []
    # The reads are on record where the content was sealed, under each reader's own id.
    node_home = tmp_path / sealing_node
    assert _reads_recorded(node_home, auditors["org_auditor"].user_id) == 1
    assert _reads_recorded(node_home, auditors["auditor"].user_id) == 1
    # The control: the metadata org's request is on record at the router (under the
    # router's request id) and at the node that served it (under the answer's id).
    at_router = _files_containing(tmp_path, control.headers[REQUEST_ID_HEADER].encode())
    assert any(path.startswith("router/") for path in at_router), at_router
    at_node = _files_containing(tmp_path, control.json()["id"].encode())
    assert any(path.startswith(f"{control_node}/") for path in at_node), at_node
