"""Logging modes on a real appliance (zero-logging canary), and the audit export routes."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from compliance import read_entries, verify_export
from compliance._private.vault import ContentVault, load_or_create_content_key
from federation import NodeIdentity
from tests.conftest import MODEL
from tests.federation.tenants import (
    BACKENDS,
    Admin,
    Member,
    admin_of,
    policy_database,
    secured_appliance,
)
from tests.support import Appliance, model_toml, run_appliance, run_palisade, wait_for


@dataclass
class Node:
    appliance: Appliance
    admin: Admin
    members: dict[str, Member]

    def entries(self) -> list[dict[str, object]]:
        return [json.loads(body) for body in read_entries(self.appliance.home / "audit.db")]


@pytest.fixture(scope="module", params=BACKENDS)
def node(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Node]:
    """On each policy store: SQLite and PostgreSQL (usage rows and counters live there)."""
    database = policy_database(request, request.param)
    home = tmp_path_factory.mktemp(f"modes-{request.param}")
    with secured_appliance(home, "eu-west", database) as appliance:
        admin = admin_of(appliance)
        members = {}
        for mode in ("zero", "metadata", "full"):
            admin.ok(
                "POST",
                "/admin/v1/orgs",
                {"name": f"org-{mode}", "regions": ["eu-west"], "logging_mode": mode},
            )
            members[mode] = admin.member(f"org-{mode}", "org_admin", f"{mode}@example.eu")
        yield Node(appliance, admin, members)


def send_marker(node: Node, mode: str) -> tuple[str, list[str]]:
    """Send a unique marker in a streamed and a plain request; returns it and the reply ids."""
    marker = f"CANARY-{uuid.uuid4().hex}"
    headers = {"Authorization": f"Bearer {node.members[mode].key}"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Repeat: {marker}"}],
        "max_tokens": 4,
    }
    plain = httpx.post(
        f"{node.appliance.v1}/chat/completions", json=body, headers=headers, timeout=60
    )
    assert plain.status_code == 200
    with httpx.stream(
        "POST",
        f"{node.appliance.v1}/chat/completions",
        json=body | {"stream": True},
        headers=headers,
        timeout=60,
    ) as streamed:
        lines = [line for line in streamed.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0].removeprefix("data: "))
    return marker, [plain.json()["id"], first["id"]]


def files_containing(home: Path, needle: bytes) -> list[str]:
    return [str(p) for p in home.rglob("*") if p.is_file() and needle in p.read_bytes()]


def settled(node: Node, org: str) -> bool:
    budget = node.admin.ok("GET", f"/admin/v1/orgs/{org}/budget")
    return bool(budget["reserved_tokens"] == 0 and budget["used_tokens"] > 0)


@pytest.mark.parametrize("mode", ["zero", "metadata"])
def test_marker_is_never_stored_or_logged(node: Node, mode: str) -> None:
    marker, ids = send_marker(node, mode)
    org = f"org-{mode}"
    wait_for(lambda: settled(node, org))
    if mode == "metadata":
        wait_for(lambda: {e.get("id") for e in node.entries()} >= set(ids))
    assert files_containing(node.appliance.home, marker.encode()) == []
    assert marker not in node.appliance.log_text()
    requests = [e for e in node.entries() if e.get("kind") == "request" and e.get("org") == org]
    usage_rows = node.admin.ok("GET", "/admin/v1/usage/records", org=org)["data"]
    if mode == "zero":
        assert requests == []  # no per-request rows at all
        assert usage_rows == []
        assert node.admin.ok("GET", f"/admin/v1/orgs/{org}/budget")["used_tokens"] > 0
    else:
        assert {r["id"] for r in requests} >= set(ids)
        assert all(set(r) >= {"input_tokens", "output_tokens", "status", "model"} for r in requests)
        assert len(usage_rows) >= 2


def test_full_mode_stores_content_only_encrypted(node: Node) -> None:
    marker, ids = send_marker(node, "full")
    home = node.appliance.home
    vault = ContentVault(
        home / "content.db", load_or_create_content_key(home), retention=timedelta(days=30)
    )
    try:
        opened = wait_for(
            lambda: [vault.open(i) for i in ids] if all(vault.open(i) for i in ids) else None
        )
    finally:
        vault.close()
    assert all(marker.encode() in content for content in opened if content)
    assert files_containing(home, marker.encode()) == []
    assert marker not in node.appliance.log_text()


def test_org_admin_exports_own_org_and_it_verifies_offline(node: Node) -> None:
    send_marker(node, "metadata")
    public_key = NodeIdentity.load_or_create(node.appliance.home).public_key
    own = node.admin.as_member(node.members["metadata"]).call(
        "GET", "/admin/v1/audit/export", org="org-metadata"
    )
    assert own.status_code == 200
    report = verify_export(own.content, trusted_key=public_key)
    assert report.ok, report.problem
    orgs = {json.loads(e["entry"]).get("org") for e in own.json()["export"]["entries"]}
    assert orgs == {"org-metadata"}
    other = node.admin.as_member(node.members["metadata"]).call(
        "GET", "/admin/v1/audit/export", org="org-full"
    )
    assert other.status_code == 403
    everything = node.admin.call("GET", "/admin/v1/audit/export")
    assert verify_export(everything.content, trusted_key=public_key).ok


def test_residency_report_names_regions_and_nodes(node: Node) -> None:
    send_marker(node, "metadata")
    response = node.admin.as_member(node.members["metadata"]).call(
        "GET", "/admin/v1/audit/residency", org="org-metadata"
    )
    assert response.status_code == 200
    document = response.json()["export"]
    assert document["format"] == "palisade-residency-report/1"
    assert [r["region"] for r in document["regions"]] == ["eu-west"]
    assert [n["node"] for n in document["nodes"]] == ["appliance-local"]
    assert document["regions"][0]["requests"] >= 2


def test_cli_export_then_offline_verify(node: Node, tmp_path: Path) -> None:
    send_marker(node, "metadata")
    out = tmp_path / "org-metadata.audit.json"
    member = node.members["metadata"]
    env = os.environ | {"PALISADE_URL": node.appliance.url, "PALISADE_API_KEY": member.key}
    exported = run_palisade("audit", "export", "--out", str(out), "--org", "org-metadata", env=env)
    assert exported.returncode == 0, exported.stderr
    offline = os.environ | {"PALISADE_URL": "http://127.0.0.1:9"}
    verified = run_palisade(
        "audit",
        "verify",
        str(out),
        "--trusted-key",
        f"@{node.appliance.home / 'node.pub'}",
        "--json",
        env=offline,
    )
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True


def test_node_floor_makes_every_org_stricter(tmp_path: Path) -> None:
    config = 'region = "eu-west"\nlogging_floor = "zero"\n' + model_toml()
    with run_appliance(tmp_path, config) as appliance:
        admin = admin_of(appliance)
        admin.ok(
            "POST",
            "/admin/v1/orgs",
            {"name": "chatty", "regions": ["eu-west"], "logging_mode": "full"},
        )
        member = admin.member("chatty", "org_user", "chatty@example.eu")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        headers = {"Authorization": f"Bearer {member.key}"}
        assert (
            httpx.post(
                f"{appliance.v1}/chat/completions", json=body, headers=headers, timeout=60
            ).status_code
            == 200
        )
        wait_for(lambda: admin.ok("GET", "/admin/v1/orgs/chatty/budget")["used_tokens"] > 0)
        assert admin.ok("GET", "/admin/v1/usage/records", org="chatty")["data"] == []
        entries = [json.loads(b) for b in read_entries(appliance.home / "audit.db")]
        assert [e for e in entries if e.get("kind") == "request"] == []
        assert (
            not (appliance.home / "content.db").exists()
            or b"hi" not in (appliance.home / "content.db").read_bytes()
        )
