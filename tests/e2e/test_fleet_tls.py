"""TLS on every hop, failing closed: the official `openai` SDK over HTTPS to the router, a
client that does not trust the fleet CA, a node certificate from another CA, a node
answering with another node's certificate. Real processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import certifi
import httpx
import httpx2
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from openai.types.chat import ChatCompletionMessageParam

from federation import (
    JOIN_SECRET_ENV,
    NodeCredentials,
    NodeIdentity,
    NodeState,
    client_context,
    load_pem_certificate,
    make_csr,
    write_private,
)
from router._private.ca import FleetCA
from router._private.registry import NodeRegistry
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, running_fleet, upstream_toml
from tests.e2e.test_region_capture import impostor_heartbeat, send_heartbeat
from tests.support import run_palisade, start_server, wait_for, write_config

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one two three"}]
CHAT = "/v1/chat/completions"
URL = "https://127.0.0.1:9"  # never reached: every heartbeat below is refused


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_the_openai_sdk_talks_https_to_the_router_and_a_client_without_the_ca_fails(
    tmp_path: Path,
) -> None:
    # The fleet CA exists before the router's first start, so its public certificate can be
    # issued by it (the router loads the same CA).
    ca = FleetCA.load_or_create(tmp_path / "router")
    public = NodeIdentity.load_or_create(tmp_path / "public")
    cert_path = tmp_path / "public" / "router-https.pem"
    write_private(cert_path, _pem(ca.issue_router(public, "router", ["127.0.0.1"])))
    ca_path = tmp_path / "router" / "fleet" / "ca.pem"
    tls_flags = ("--tls-cert", str(cert_path), "--tls-key", str(tmp_path / "public" / "node.key"))
    with running_fleet(tmp_path, *tls_flags) as fleet:
        assert fleet.router.url.startswith("https://127.0.0.1:")
        upstream = fleet.standin("eu-1")
        fleet.start_member("eu-1", "eu-west", upstream_toml(upstream, "gpu"))
        fleet.wait_joined("eu-1")
        key = fleet.org_key("acme", ["eu-west"])
        # The SDK's own httpx (httpx2), trusting the fleet CA; then only the public roots.
        trusting = httpx2.Client(verify=ssl.create_default_context(cafile=str(ca_path)))
        public_roots = httpx2.Client(verify=ssl.create_default_context(cafile=certifi.where()))
        with (
            openai.OpenAI(
                base_url=fleet.router.v1, api_key=key, max_retries=0, http_client=trusting
            ) as client,
            openai.OpenAI(
                base_url=fleet.router.v1, api_key=key, max_retries=0, http_client=public_roots
            ) as stranger,
        ):
            reply = client.chat.completions.with_raw_response.create(
                model=UPSTREAM_MODEL, messages=MESSAGES, max_tokens=4
            )
            assert reply.headers["x-palisade-node"] == "eu-1"
            assert reply.parse().choices[0].message.content
            with pytest.raises(openai.APIConnectionError):
                stranger.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES)
        with pytest.raises(httpx.TransportError):  # nor plain HTTP on the HTTPS port
            httpx.get(fleet.router.url.replace("https:", "http:") + "/healthz", timeout=5)


def rogue_home(fleet: Fleet, node_id: str) -> Path:
    """A node home that looks enrolled in `fleet` (its fleet URL, router, CA pinned) but
    whose certificate comes from another CA."""
    rogue_ca = FleetCA.load_or_create(fleet.root / "rogue-router")
    home = fleet.root / node_id
    identity = NodeIdentity.load_or_create(home)
    cert = rogue_ca.issue_node(make_csr(identity, node_id, ["127.0.0.1"]), node_id, "eu-west", None)
    write_private(home / "fleet" / "node.pem", _pem(cert))
    write_private(home / "fleet" / "ca.pem", fleet.ca_path.read_text())
    write_private(home / "fleet" / "crl.pem", (fleet.router.home / "fleet" / "crl.pem").read_text())
    router = NodeIdentity.load_or_create(fleet.router.home)
    NodeState(
        node_id=node_id,
        region="eu-west",
        hosts=["127.0.0.1"],
        state="enrolled",
        fleet_id=rogue_ca.fleet_id,
        fleet_url=fleet.fleet_url,
        router_id="router",
        router_public_key=router.public_key.hex(),
    ).save(home)
    return home


def test_an_appliance_with_a_certificate_from_another_ca_cannot_heartbeat(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        upstream = fleet.standin("rogue")
        home = rogue_home(fleet, "eu-rogue")
        rogue = start_server("appliance", home, *write_config(home, upstream_toml(upstream, "gpu")))
        try:
            wait_for(lambda: "cannot reach router" in rogue.log_text(), timeout=30)
            assert fleet.status() == {}
        finally:
            rogue.stop()


@contextmanager
def heartbeating(fleet: Fleet, node_id: str, url: str) -> Iterator[None]:
    """Heartbeat as `node_id` (its real certificate and key) advertising `url`."""
    home = fleet.root / node_id
    context = client_context(fleet.ca_path, home / "fleet" / "node.pem", home / "node.key")
    body = impostor_heartbeat(node_id, "eu-west", url)
    stop = threading.Event()
    answers: list[int] = []

    def run() -> None:
        with httpx.Client(verify=context, timeout=5) as client:
            while not stop.is_set():
                answer = client.post(f"{fleet.fleet_url}/federation/v1/heartbeat", content=body)
                answers.append(answer.status_code)
                stop.wait(0.3)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: answers and answers[-1] == 200, timeout=10)
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def test_the_router_never_forwards_to_a_node_answering_with_another_nodes_certificate(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        upstream = fleet.standin("eu-1")
        member = fleet.start_member("eu-1", "eu-west", upstream_toml(upstream, "gpu"))
        fleet.wait_joined("eu-1")
        fleet.enroll("eu-2", "eu-west")
        # eu-2 (certified) advertises eu-1's address: whatever answers there must prove to
        # be eu-2, and eu-1's certificate does not.
        with heartbeating(fleet, "eu-2", member.url):
            key = fleet.org_key("acme", ["eu-west"])
            client = openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0)
            before = member.metric("palisade_requests_total", endpoint=CHAT, status="200")
            nodes = [
                client.chat.completions.with_raw_response.create(
                    model=UPSTREAM_MODEL, messages=MESSAGES, max_tokens=4
                ).headers["x-palisade-node"]
                for _ in range(30)
            ]
            fleet.wait_state("ejected", "eu-2", timeout=10)
        assert nodes == ["eu-1"] * 30
        served = member.metric("palisade_requests_total", endpoint=CHAT, status="200") - before
        assert served == 30
        for status in ("401", "403"):  # nothing for eu-2 ever reached eu-1's HTTP layer
            assert member.metric("palisade_requests_total", endpoint=CHAT, status=status) == 0
        router = fleet.router
        assert router.metric("palisade_router_attempts_total", node="eu-2", outcome="ok") == 0


def test_a_node_renews_its_certificate_with_a_third_of_its_life_left(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        home = fleet.enroll("eu-1", "eu-west")
        credentials = NodeCredentials.load(home)
        # The router's registry issued eu-1's current certificate 21 of its 30 days ago.
        router_home = fleet.router.home
        earlier = FleetCA.load_or_create(router_home, clock=lambda: time.time() - 21 * 86400)
        registry = NodeRegistry(
            router_home, earlier, NodeIdentity.load_or_create(router_home), "router"
        )
        csr = make_csr(NodeIdentity.load_or_create(home), "eu-1", ["127.0.0.1"])
        aged = registry.renew(credentials.identity(), csr.decode())
        write_private(credentials.cert_path, aged.certificate)

        upstream = fleet.standin("eu-1")
        member = fleet.start_member("eu-1", "eu-west", upstream_toml(upstream, "gpu"))
        wait_for(lambda: "certificate renewed" in member.log_text(), timeout=30)
        renewed = credentials.identity()
        assert renewed.serial != aged.serial
        assert renewed.not_after > aged.not_after + 20 * 86400
        assert (renewed.node_id, renewed.region) == ("eu-1", "eu-west")
        fleet.wait_joined("eu-1")
        key = fleet.org_key("acme", ["eu-west"])
        with openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0) as client:
            reply = client.chat.completions.with_raw_response.create(
                model=UPSTREAM_MODEL, messages=MESSAGES, max_tokens=4
            )
        assert reply.headers["x-palisade-node"] == "eu-1"
        # New connections to the node present the renewed certificate.
        with httpx.Client(verify=fleet.verify) as client:
            answer = client.get(f"{member.url}/healthz")
            assert answer.status_code == 200
            peer = answer.extensions["network_stream"].get_extra_info("ssl_object")
            served = load_pem_certificate(ssl.DER_cert_to_PEM_cert(peer.getpeercert(True)).encode())
        assert served.serial_number == renewed.serial


def test_the_lab_switch_joins_plain_http_nodes_and_says_it_is_insecure(tmp_path: Path) -> None:
    lab = {JOIN_SECRET_ENV: "lab-only-secret-0123456789"}
    router = start_server("router", tmp_path / "router", env=lab)
    try:
        router.wait_ready(30)
        fleet = Fleet(tmp_path, router, contextlib.ExitStack())
        with fleet.stack:
            upstream = fleet.standin("lab-1")
            home = tmp_path / "lab-1"
            member = start_server(
                "appliance", home, *write_config(home, upstream_toml(upstream, "gpu")),
                "--router", router.url, "--region", "eu-west", "--node-id", "lab-1", env=lab,
            )  # fmt: skip
            fleet.stack.callback(member.stop)
            fleet.members["lab-1"] = member
            fleet.wait_joined("lab-1")
            assert member.url.startswith("http://")
            assert fleet.status()["lab-1"]["url"] == member.url
            for server in (router, member):
                assert "LAB MODE (PALISADE_LAB_JOIN_SECRET is set)" in server.log_text()
            key = fleet.org_key("acme", ["eu-west"])
            with openai.OpenAI(base_url=router.v1, api_key=key, max_retries=0) as client:
                reply = client.chat.completions.with_raw_response.create(
                    model=UPSTREAM_MODEL, messages=MESSAGES, max_tokens=4
                )
            assert reply.headers["x-palisade-node"] == "lab-1"
    finally:
        router.stop()


def test_an_enrolled_node_refuses_flags_and_device_classes_its_certificate_does_not_name(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        home = fleet.enroll("eu-1", "eu-west", device_class="gpu")
        upstream = fleet.standin("eu-1")
        env = {"PALISADE_HOME": str(home)}
        gpu = write_config(home, upstream_toml(upstream, "gpu"))
        cpu = write_config(home, upstream_toml(upstream, "cpu"), "cpu.toml")
        cases = {
            "--region us-east disagrees with this node's certificate (eu-west)": [
                *gpu, "--region", "us-east",
            ],
            "--node-id eu-9 disagrees with this node's certificate (eu-1)": [
                *gpu, "--node-id", "eu-9",
            ],
            "declares device_class = 'cpu', but this node is certified for 'gpu' only": cpu,
        }  # fmt: skip
        for message, args in cases.items():
            refused = run_palisade("appliance", "serve", "--port", "0", *args, env=env)
            assert refused.returncode == 1, message
            assert message in refused.stderr
        # The router refuses the same claims in a heartbeat, whoever sends it.
        as_eu_1 = client_context(fleet.ca_path, home / "fleet" / "node.pem", home / "node.key")
        as_router = client_context(
            fleet.ca_path,
            fleet.router.home / "fleet" / "router.pem",
            fleet.router.home / "node.key",
        )
        beats = {
            "device_class_mismatch": (impostor_heartbeat("eu-1", "eu-west", URL, "cpu"), as_eu_1),
            "node_identity_mismatch": (impostor_heartbeat("eu-1", "eu-west", URL), as_router),
        }
        for code, (body, context) in beats.items():
            answer = send_heartbeat(fleet, body, context)
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"]["code"] == code
        assert fleet.status() == {}
