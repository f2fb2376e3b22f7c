"""Region capture: no process without a certificate for eu-west gets eu-west traffic.

A real router and enrolled appliances (real processes, mTLS on 127.0.0.1). The impostors
speak the fleet protocol themselves: a node enrolled in us-east claiming eu-west (or
another node's id), a process with no certificate, one holding another node's
certificate but not its key, one with a revoked node's certificate and copied key. Then
200 requests with an eu-west key: every one is served by a certified eu-west node, by the
receipts and by every node's own counters. Revocation drops a node within 2 s.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from federation import ENCODER, Heartbeat, NodeIdentity, NodeModel, client_context
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, running_fleet, upstream_toml
from tests.support import run_palisade, wait_for

CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one two three"}]
EU_NODES = ("eu-1", "eu-2")
REQUESTS = 200


def impostor_heartbeat(
    node_id: str, region: str, url: str, device: Literal["cpu", "gpu", "rdu"] = "gpu"
) -> bytes:
    model = NodeModel(id=UPSTREAM_MODEL, device_class=device, context_length=2048, ready=True)
    beat = Heartbeat(
        node_id=node_id, region=region, url=url, version="x", models=[model], boot_id="impostor"
    )
    return ENCODER.encode(beat)


def send_heartbeat(fleet: Fleet, body: bytes, context: ssl.SSLContext) -> httpx.Response:
    with httpx.Client(verify=context, timeout=10) as client:
        return client.post(
            f"{fleet.fleet_url}/federation/v1/heartbeat",
            content=body,
            headers={"Content-Type": "application/json"},
        )


def credentials_of(fleet: Fleet, node_id: str) -> ssl.SSLContext:
    """A client context presenting `node_id`'s certificate with its (copied) key."""
    home = fleet.root / node_id
    return client_context(fleet.ca_path, home / "fleet" / "node.pem", home / "node.key")


def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def start_fleet(fleet: Fleet) -> None:
    for node_id, region in (("eu-1", "eu-west"), ("eu-2", "eu-west"), ("us-1", "us-east")):
        upstream = fleet.standin(node_id)
        fleet.start_member(node_id, region, upstream_toml(upstream, "gpu"))
    fleet.wait_joined("eu-1", "eu-2", "us-1")


def served_counts(fleet: Fleet) -> dict[str, float]:
    return {
        node_id: member.metric("palisade_requests_total", endpoint=CHAT, status="200")
        for node_id, member in fleet.members.items()
    }


def test_no_uncertified_process_captures_eu_west_traffic(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        start_fleet(fleet)
        trap = fleet.standin("trap")  # where every impostor asks to be sent requests
        claim_eu = impostor_heartbeat("us-1", "eu-west", trap.url)
        refused(
            send_heartbeat(fleet, claim_eu, credentials_of(fleet, "us-1")), 403, "region_mismatch"
        )
        as_eu_1 = impostor_heartbeat("eu-1", "eu-west", trap.url)
        refused(
            send_heartbeat(fleet, as_eu_1, credentials_of(fleet, "us-1")),
            403,
            "node_identity_mismatch",
        )
        anonymous = client_context(fleet.ca_path)
        refused(send_heartbeat(fleet, as_eu_1, anonymous), 401, "client_certificate_required")
        # eu-1's certificate without eu-1's key: TLS proves possession, so it cannot even be
        # offered (OpenSSL refuses to pair the certificate with another key).
        NodeIdentity.load_or_create(tmp_path / "thief")  # a key of its own, not eu-1's
        stolen = fleet.root / "eu-1" / "fleet" / "node.pem"
        with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
            client_context(fleet.ca_path, stolen, tmp_path / "thief" / "node.key")
        # A revoked eu-west node's certificate with its copied key.
        fleet.enroll("eu-old", "eu-west")
        revoke(fleet, "eu-old")
        copied = credentials_of(fleet, "eu-old")
        try:
            answer = send_heartbeat(
                fleet, impostor_heartbeat("eu-old", "eu-west", trap.url), copied
            )
            refused(answer, 403, "node_revoked")
        except httpx.TransportError:
            pass  # the CRL already refuses the handshake
        assert set(fleet.status()) == {"eu-1", "eu-2", "us-1"}

        key = fleet.org_key("acme", ["eu-west"])
        before = served_counts(fleet)
        client = openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0)
        receipts = []
        for _ in range(REQUESTS):
            reply = client.chat.completions.with_raw_response.create(
                model=UPSTREAM_MODEL, messages=MESSAGES, max_tokens=4
            )
            receipts.append((reply.headers["x-palisade-region"], reply.headers["x-palisade-node"]))
        assert {region for region, _ in receipts} == {"eu-west"}
        assert {node for _, node in receipts} <= set(EU_NODES)
        after = served_counts(fleet)
        served = {node: after[node] - before[node] for node in after}
        assert served["us-1"] == 0
        assert served["eu-1"] + served["eu-2"] == REQUESTS
        assert served["eu-1"] == sum(1 for _, node in receipts if node == "eu-1")
        assert trap.stats()["requests"] == {}  # no path of the trap was ever asked for


def revoke(fleet: Fleet, node_id: str) -> None:
    result = run_palisade(
        "fleet", "node", "revoke", node_id, "--url", fleet.router.url,
        env={"PALISADE_HOME": str(fleet.router.home)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_revoked_node_gets_no_requests_within_2_s_and_its_heartbeats_are_refused(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        start_fleet(fleet)
        key = fleet.org_key("acme", ["eu-west"])
        client = openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0)
        revoked_at = time.monotonic()
        revoke(fleet, "eu-2")
        # The router drops it as the revocation is answered; allow 2 s all the same.
        wait_for(lambda: "eu-2" not in fleet.status(), timeout=2)
        assert time.monotonic() - revoked_at < 2
        before = served_counts(fleet)
        for _ in range(50):
            reply = client.chat.completions.with_raw_response.create(
                model=UPSTREAM_MODEL, messages=MESSAGES, max_tokens=4
            )
            assert reply.headers["x-palisade-node"] == "eu-1"
        after = served_counts(fleet)
        assert after["eu-2"] == before["eu-2"]
        assert after["eu-1"] - before["eu-1"] == 50
        # Its heartbeats go on (it does not know): its open connection was cut as the CRL
        # loaded and a new one fails the handshake (TLS 1.3 shows the node only a read
        # error), so it never rejoins.
        member = fleet.members["eu-2"]
        wait_for(lambda: "cannot reach router" in member.log_text(), timeout=10)
        assert "eu-2" not in fleet.status()
        assert "eu-2" not in fleet.status()
