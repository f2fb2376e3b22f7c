"""Signed policy snapshots across a real fleet: a router and three enrolled appliances
(real processes, mTLS on every fleet hop, HTTPS to the appliances).

A key revoked at the router is refused by every appliance, asked directly with the key,
within 2 s at the 99th percentile over 50 trials (measured and printed). A snapshot with a
bad signature or a lower version offered to a running appliance is refused, and the one in
force stays: on disk, and in what the appliance accepts and refuses.
"""

from __future__ import annotations

import base64
import json
import math
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from cryptography import x509

from federation import NodeIdentity, PolicySnapshot, client_context, sign_policy
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, running_fleet, upstream_toml
from tests.federation.tenants import Admin
from tests.support import Server, wait_for

MEMBERS = {"eu-1": "eu-west", "eu-2": "eu-west", "us-1": "us-east"}
TRIALS = 50
DEADLINE_S = 2.0


def call(member: Server, fleet: Fleet, key: str, method: str = "GET", **kwargs: Any) -> int:
    """A request straight to `member` with `key` (not through the router)."""
    path = "/v1/chat/completions" if method == "POST" else "/v1/models"
    response = httpx.request(
        method,
        f"{member.url}{path}",
        headers={"Authorization": f"Bearer {key}"},
        verify=fleet.verify,
        timeout=10,
        **kwargs,
    )
    return response.status_code


def snapshot_of(member: Server) -> tuple[bytes, dict[str, Any]]:
    """The signed snapshot in force on `member` (its file) and its decoded payload."""
    blob = (member.home / "fleet" / "policy.json").read_bytes()
    payload: dict[str, Any] = json.loads(base64.b64decode(json.loads(blob)["payload"]))
    return blob, payload


def offer(member: Server, fleet: Fleet, blob: bytes) -> httpx.Response:
    """Offer `blob` to `member` as a fleet peer would: presenting another member's certificate."""
    peer = next(other for other in fleet.members.values() if other is not member)
    as_peer = client_context(
        fleet.ca_path, peer.home / "fleet" / "node.pem", peer.home / "node.key"
    )
    return httpx.post(
        f"{member.url}/federation/v1/policy", content=blob, verify=as_peer, timeout=10
    )


def until_everywhere(
    fleet: Fleet, pool: ThreadPoolExecutor, key: str, status: int, limit_s: float
) -> float:
    """Seconds until every member answers `key` with `status` (each polled on its own
    thread, every 5 ms), or TimeoutError."""
    started = time.monotonic()

    def one(member: Server) -> float:
        wait_for(lambda: call(member, fleet, key) == status, timeout=limit_s, interval=0.005)
        return time.monotonic() - started

    return max(pool.map(one, fleet.members.values()))


@dataclass
class Enrolled:
    fleet: Fleet
    pool: ThreadPoolExecutor
    owner: Admin  # acme's org admin, at the router


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Enrolled]:
    """One fleet for this module's tests: enrolling three nodes takes most of half a minute."""
    root = tmp_path_factory.mktemp("policy")
    with running_fleet(root) as fleet, ThreadPoolExecutor(len(MEMBERS)) as pool:
        standin = fleet.standin("upstream")
        for node, region in MEMBERS.items():
            fleet.start_member(node, region, upstream_toml(standin, "cpu"))
        fleet.wait_joined(*MEMBERS)
        fleet.admin.create_org("acme", ["eu-west", "us-east"])
        owner = fleet.admin.as_member(fleet.admin.member("acme", "org_admin", "o@acme.test"))
        yield Enrolled(fleet, pool, owner)


def test_a_revoked_key_is_refused_by_every_appliance_within_2_s_p99(enrolled: Enrolled) -> None:
    fleet, pool, owner = enrolled.fleet, enrolled.pool, enrolled.owner
    delays = []
    for trial in range(TRIALS):
        key, key_id = make_key(owner, f"trial-{trial}")
        until_everywhere(fleet, pool, key, 200, limit_s=10)  # every node knows the key
        started = time.monotonic()
        owner.ok("DELETE", f"/admin/v1/keys/{key_id}")
        delays.append(
            time.monotonic() - started + until_everywhere(fleet, pool, key, 401, limit_s=10)
        )

    delays.sort()
    p99 = delays[math.ceil(0.99 * len(delays)) - 1]
    print(  # noqa: T201 - the acceptance figure, for the report
        f"\nkey revocation refused by all {len(MEMBERS)} appliances: median "
        f"{statistics.median(delays) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max "
        f"{delays[-1] * 1000:.0f} ms over {len(delays)} trials"
    )
    assert p99 < DEADLINE_S
    # The last revoked key, on a real inference request: refused by its key, on every node.
    body = {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for member in fleet.members.values():
        assert call(member, fleet, key, "POST", json=body) == 401


def test_a_forged_or_older_snapshot_is_refused_and_the_one_in_force_stays(
    enrolled: Enrolled, tmp_path: Path
) -> None:
    fleet, pool, owner = enrolled.fleet, enrolled.pool, enrolled.owner
    kept = make_key(owner, "kept")
    doomed = make_key(owner, "doomed")
    until_everywhere(fleet, pool, kept[0], 200, limit_s=10)
    until_everywhere(fleet, pool, doomed[0], 200, limit_s=10)
    member = fleet.members["eu-1"]
    older, _ = snapshot_of(member)  # still grants `doomed`
    owner.ok("DELETE", f"/admin/v1/keys/{doomed[1]}")
    until_everywhere(fleet, pool, doomed[0], 401, limit_s=10)
    in_force, payload = snapshot_of(member)

    # A stranger (no fleet certificate) may not offer anything, not even a genuine snapshot.
    stranger = httpx.post(
        f"{member.url}/federation/v1/policy", content=in_force, verify=fleet.verify, timeout=10
    )
    assert stranger.status_code == 401
    assert stranger.json()["error"]["code"] == "client_certificate_required"
    # A lower version, genuinely signed by the router: no rollback.
    refused = offer(member, fleet, older)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "policy_rollback"
    # The same version again: not newer either.
    assert offer(member, fleet, in_force).json()["error"]["code"] == "policy_rollback"
    # The current snapshot with the key un-revoked and a version far ahead: the
    # signature no longer matches.
    tampered = json.loads(in_force)
    payload_forged = dict(payload, version=payload["version"] + 1000)
    for entry in payload_forged["keys"]:
        entry["revoked"] = False
    tampered["payload"] = base64.b64encode(json.dumps(payload_forged).encode()).decode()
    refused = offer(member, fleet, json.dumps(tampered).encode())
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "policy_signature_invalid"
    # A well-formed snapshot signed by another key (not the router pinned at enrollment).
    impostor = NodeIdentity.load_or_create(tmp_path / "impostor")
    forged = sign_policy(impostor, _decoded(payload_forged))
    refused = offer(member, fleet, forged)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "policy_signature_invalid"

    # The snapshot in force is unchanged, and so is what it grants.
    assert snapshot_of(member)[0] == in_force
    assert call(member, fleet, doomed[0]) == 401
    assert call(member, fleet, kept[0]) == 200
    # The router's next snapshot is still taken (a newer version, properly signed).
    newer = make_key(owner, "newer")
    until_everywhere(fleet, pool, newer[0], 200, limit_s=10)
    assert snapshot_of(member)[1]["version"] > payload["version"]


def test_a_revoked_node_is_refused_by_its_peers_through_the_snapshots_crl(
    enrolled: Enrolled,
) -> None:
    """Last in this module: it revokes us-1. The CRL travels in the next snapshot, each
    peer writes it to fleet/crl.pem and reloads its listener's TLS context with it."""
    fleet = enrolled.fleet
    revoked, peers = fleet.members["us-1"], [fleet.members["eu-1"], fleet.members["eu-2"]]
    certificate = revoked.home / "fleet" / "node.pem"
    serial = x509.load_pem_x509_certificate(certificate.read_bytes()).serial_number
    as_revoked = client_context(fleet.ca_path, certificate, revoked.home / "node.key")

    def greets(peer: Server) -> bool:
        """Whether a new TLS connection presenting us-1's certificate is served."""
        try:
            response = httpx.get(f"{peer.url}/healthz", verify=as_revoked, timeout=5)
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            return False
        return response.status_code == 200

    assert all(greets(peer) for peer in peers)
    started = time.monotonic()
    fleet.admin.ok("POST", "/admin/v1/fleet/nodes/us-1/revoke")
    for peer in peers:
        wait_for(lambda peer=peer: not greets(peer), timeout=10, interval=0.01)  # type: ignore[misc]
    elapsed = time.monotonic() - started
    print(f"\nnode revocation refused by both peers after {elapsed * 1000:.0f} ms")  # noqa: T201
    router_crl = (fleet.router.home / "fleet" / "crl.pem").read_bytes()
    for peer in peers:
        assert serial in snapshot_of(peer)[1]["revoked_serials"]
        assert (peer.home / "fleet" / "crl.pem").read_bytes() == router_crl
    assert elapsed < DEADLINE_S


def make_key(owner: Admin, name: str) -> tuple[str, str]:
    created = owner.ok("POST", "/admin/v1/keys", {"name": name})
    return created["key"], created["info"]["id"]


def _decoded(payload: dict[str, Any]) -> PolicySnapshot:
    return msgspec.json.decode(json.dumps(payload).encode(), type=PolicySnapshot)
