"""Enrollment end to end: a real router process, `palisade fleet token create`,
`palisade node init` and `palisade node enroll` as real processes.

A valid token enrolls once. The same token again, an expired token, a token for another
region, a token signed by another router, a CSR that does not verify, another key for an
enrolled node id, a CA that is not the pinned one and a tampered certificate are each
refused with a clear error and a stable code, and the node's state stays as it was (and,
where the router refused, the token keeps its use). Then renewal over mTLS and revocation.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federation import (
    NodeIdentity,
    NodeState,
    client_context,
    identity_of,
    load_pem_certificate,
    make_csr,
    raw_public_key,
    read_token,
    router_dns_name,
    server_context,
    sign_token,
)
from router._private.ca import FleetCA
from tests.e2e.fleet import Fleet, running_fleet
from tests.federation.forgery import csr_with_signature
from tests.support import run_palisade, wait_for


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("enrollment")) as running:
        yield running


def _node(root: Path, name: str) -> Path:
    return root / name


def _palisade(home: Path, *args: str) -> Any:
    return run_palisade(*args, env={"PALISADE_HOME": str(home)})


def _init(home: Path, node_id: str, region: str = "eu", *flags: str) -> None:
    result = _palisade(
        home,
        "node",
        "init",
        "--region",
        region,
        "--node-id",
        node_id,
        "--host",
        "127.0.0.1",
        *flags,
    )
    assert result.returncode == 0, result.stderr


def _files(home: Path) -> dict[str, bytes]:
    """The node's whole state, to show a refusal changed nothing."""
    return {
        str(path.relative_to(home)): path.read_bytes()
        for path in sorted(home.rglob("*"))
        if path.is_file()
    }


def _refused(
    fleet: Fleet, home: Path, token: str, code: str, *flags: str, router: str | None = None
) -> str:
    before = _files(home)
    result = _palisade(
        home, "node", "enroll", "--router", router or fleet.fleet_url, "--token", token, *flags
    )
    assert result.returncode == 1, result.stdout
    assert f"({code})" in result.stderr, result.stderr
    assert token not in result.stderr
    assert _files(home) == before
    state = NodeState.load(home)
    assert state is not None
    assert state.state == "pending"
    message: str = result.stderr
    return message


def _enroll(fleet: Fleet, home: Path, token: str) -> None:
    result = _palisade(home, "node", "enroll", "--router", fleet.fleet_url, "--token", token)
    assert result.returncode == 0, result.stderr
    assert "enrolled in fleet" in result.stdout


def _certificate(home: Path) -> x509.Certificate:
    return load_pem_certificate((home / "fleet" / "node.pem").read_bytes())


def test_a_valid_token_enrolls_once(fleet: Fleet, tmp_path: Path) -> None:
    home, second = _node(tmp_path, "first"), _node(tmp_path, "second")
    _init(home, "edge-first", "eu", "--device-class", "cpu")
    token = fleet.token("eu")
    _enroll(fleet, home, token)

    cert = _certificate(home)
    holder = identity_of(cert)
    assert (holder.node_id, holder.region, holder.device_class, holder.role) == (
        "edge-first",
        "eu",
        "cpu",
        "node",
    )
    assert raw_public_key(cert) == NodeIdentity.load_or_create(home).public_key
    cert.verify_directly_issued_by(load_pem_certificate(fleet.ca_path.read_bytes()))
    state = NodeState.load(home)
    assert state is not None
    assert state.state == "enrolled"
    assert state.ca_fingerprint == read_token(token).ca_fingerprint
    for name in ("node.toml", "fleet/ca.pem", "fleet/node.pem", "fleet/crl.pem"):
        assert (home / name).stat().st_mode & 0o777 == 0o600
    status = json.loads(_palisade(home, "node", "status", "--json").stdout)
    assert status["certificate"]["serial"] == f"{holder.serial:x}"
    assert status["certificate"]["revoked"] is False

    _init(second, "edge-second")
    message = _refused(fleet, second, token, "enrollment_token_used")
    assert "already been used" in message
    listed = {node["node_id"] for node in fleet.admin.ok("GET", "/admin/v1/fleet/nodes")["data"]}
    assert "edge-first" in listed
    assert "edge-second" not in listed

    audit = fleet.admin.call("GET", "/admin/v1/audit").text
    token_id = read_token(token).id
    assert '"fleet_token_created"' in audit
    assert '"fleet_node_enrolled"' in audit
    assert token_id in audit
    assert token not in audit  # the audit log knows the token by its id only


def test_an_expired_token_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    home = _node(tmp_path, "late")
    _init(home, "edge-late")
    token = fleet.token("eu", None, "--ttl", "1s")
    expires_at = read_token(token).expires_at
    wait_for(lambda: time.time() > expires_at + 0.05, timeout=5)
    assert "expired" in _refused(fleet, home, token, "enrollment_token_expired")


def test_a_token_for_another_region_is_refused_and_keeps_its_use(
    fleet: Fleet, tmp_path: Path
) -> None:
    home = _node(tmp_path, "wrong-region")
    _init(home, "edge-wrong-region", "eu")
    token = fleet.token("us")
    message = _refused(fleet, home, token, "enrollment_region_mismatch")
    assert "`us`" in message
    assert "`eu`" in message

    right = _node(tmp_path, "right-region")
    _init(right, "edge-right-region", "us")
    _enroll(fleet, right, token)


def test_a_token_for_another_node_id_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    home = _node(tmp_path, "impostor")
    _init(home, "edge-impostor")
    _refused(fleet, home, fleet.token("eu", "edge-expected"), "enrollment_node_mismatch")


def test_a_token_signed_by_another_router_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    home = _node(tmp_path, "forged")
    _init(home, "edge-forged")
    genuine = read_token(fleet.token("eu"))
    other_router = NodeIdentity.load_or_create(tmp_path / "other-router")
    forged = sign_token(other_router, genuine)  # this fleet's claims, another router's key
    assert "not issued by this router" in _refused(fleet, home, forged, "invalid_enrollment_token")


def test_a_csr_that_does_not_verify_is_refused_and_the_token_kept(
    fleet: Fleet, tmp_path: Path
) -> None:
    home = _node(tmp_path, "honest")
    _init(home, "edge-honest")
    token = fleet.token("eu")
    honest = x509.load_pem_x509_csr(make_csr(NodeIdentity.load_or_create(home), "edge-honest", []))
    thief = x509.load_pem_x509_csr(
        make_csr(NodeIdentity.load_or_create(tmp_path / "thief"), "edge-honest", [])
    )
    forged = csr_with_signature(honest.tbs_certrequest_bytes, thief.signature)
    body = {"token": token, "csr": forged, "node_id": "edge-honest", "region": "eu"}
    answer = _post_enroll(fleet, body)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_csr"
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}

    _enroll(fleet, home, token)  # the refused request took nothing


def test_another_key_for_an_enrolled_node_id_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    original, usurper = _node(tmp_path, "original"), _node(tmp_path, "usurper")
    _init(original, "edge-taken")
    _enroll(fleet, original, fleet.token("eu"))
    _init(usurper, "edge-taken")
    message = _refused(fleet, usurper, fleet.token("eu"), "node_key_mismatch")
    assert "already enrolled with another key" in message


def test_bad_enrollment_bodies_get_openai_errors(fleet: Fleet) -> None:
    for body, code in (
        (b"{not json", "invalid_json"),
        (b'{"token": "x"}', "missing_required_parameter"),
        (b'{"token": "x", "csr": "y", "node_id": "n", "region": "r", "extra": 1}', None),
    ):
        answer = _post_enroll(fleet, body)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        if code is not None:
            assert error["code"] == code


def test_bad_monitor_requests_get_openai_errors(fleet: Fleet, tmp_path: Path) -> None:
    csr = make_csr(NodeIdentity.load_or_create(tmp_path / "scraper"), "x", []).decode()
    for body, code in (
        ({"name": "prometheus", "csr": "not a request"}, "invalid_csr"),
        ({"name": "Prometheus/..", "csr": csr}, None),
        ({"name": "prometheus", "csr": csr, "days": 366}, None),
        ({"name": "prometheus", "csr": csr, "days": 0}, None),
    ):
        answer = fleet.admin.call("POST", "/admin/v1/fleet/monitors", body)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        if code is not None:
            assert error["code"] == code
    unknown = fleet.admin.call("POST", "/admin/v1/fleet/monitors/nobody/revoke")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "monitor_not_found")
    assert fleet.admin.ok("GET", "/admin/v1/fleet/monitors")["data"] == []


def test_enroll_refuses_what_it_can_check_itself(fleet: Fleet, tmp_path: Path) -> None:
    home = _node(tmp_path, "local-checks")
    uninitialised = _palisade(home, "node", "enroll", "--token", fleet.token("eu"))
    assert uninitialised.returncode == 1
    assert "(node_not_initialised)" in uninitialised.stderr
    _init(home, "edge-local-checks")
    _refused(fleet, home, "pet1.not-a-token", "invalid_enrollment_token")
    _refused(fleet, home, fleet.token("eu"), "unreachable", router="https://127.0.0.1:1")


def test_a_ca_other_than_the_pinned_one_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    home = _node(tmp_path, "pinned")
    _init(home, "edge-pinned")
    token = fleet.token("eu")
    wrong = "sha256:" + "0" * 64
    assert "pins" in _refused(
        fleet, home, token, "ca_fingerprint_mismatch", "--ca-fingerprint", wrong
    )

    impostor_ca = FleetCA.load_or_create(tmp_path / "other-router-home").pem
    with _hostile_router(fleet, ca_pem=impostor_ca) as url:
        message = _refused(fleet, home, token, "ca_fingerprint_mismatch", router=url)
    assert "not the pinned" in message
    _enroll(fleet, home, token)


def _flip_signature_bit(pem: str) -> str:
    der = bytearray(load_pem_certificate(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    cert = x509.load_der_x509_certificate(bytes(der))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _for_another_key(fleet: Fleet, tmp_path: Path) -> Callable[[str], str]:
    ca = FleetCA.load_or_create(fleet.router.home)
    other = NodeIdentity.load_or_create(tmp_path / "someone-else")

    def swap(pem: str) -> str:
        holder = identity_of(load_pem_certificate(pem.encode()))
        csr = make_csr(other, holder.node_id, [])
        cert = ca.issue_node(csr, holder.node_id, holder.region or "", holder.device_class)
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    return swap


@pytest.mark.parametrize("tamper", ["signature", "another_key"])
def test_a_tampered_certificate_is_refused(fleet: Fleet, tmp_path: Path, tamper: str) -> None:
    home = _node(tmp_path, f"victim-{tamper}")
    _init(home, f"edge-victim-{tamper}")
    change = _flip_signature_bit if tamper == "signature" else _for_another_key(fleet, tmp_path)
    with _hostile_router(fleet, tamper=change) as url:
        message = _refused(
            fleet, home, fleet.token("eu"), "invalid_enrollment_response", router=url
        )
    assert "Nothing was written" in message


def test_renewal_over_mtls_then_revocation(fleet: Fleet, tmp_path: Path) -> None:
    home = _node(tmp_path, "renewed")
    _init(home, "edge-renewed")
    _enroll(fleet, home, fleet.token("eu"))
    first = identity_of(_certificate(home))

    renewed = _renew(fleet, home)
    assert renewed.status_code == 200, renewed.text
    fresh = identity_of(load_pem_certificate(renewed.json()["certificate"].encode()))
    assert fresh.serial != first.serial
    assert (fresh.node_id, fresh.region) == ("edge-renewed", "eu")

    revoked = _palisade(
        fleet.router.home, "fleet", "node", "revoke", "edge-renewed", "--url", fleet.router.url
    )
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in revoked.stdout
    listed = _palisade(fleet.router.home, "fleet", "node", "list", "--url", fleet.router.url)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("edge-renewed "))
    assert " revoked " in row
    crl = x509.load_pem_x509_crl((fleet.router.home / "fleet" / "crl.pem").read_bytes())
    assert {first.serial, fresh.serial} <= {entry.serial_number for entry in crl}

    # The fleet listener refuses the revoked certificate from the next handshake on.
    with pytest.raises((httpx.TransportError, ssl.SSLError)):
        _renew(fleet, home)


def test_token_create_prints_what_the_node_operator_needs(fleet: Fleet) -> None:
    env_home = fleet.router.home
    url = ("--url", fleet.router.url)
    created = _palisade(
        env_home, "fleet", "token", "create", "--region", "eu", "--ttl", "15m", *url
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.splitlines()[1].strip()
    claims = read_token(token)
    assert claims.region == "eu"
    assert claims.expires_at - time.time() == pytest.approx(900, abs=30)
    assert f"Fleet CA fingerprint: {claims.ca_fingerprint}" in created.stdout
    assert f"palisade node enroll --router {fleet.fleet_url} --token {token}" in created.stdout
    assert token not in fleet.router.log_text()  # shown to the operator, never logged

    for flags, message in (
        (("--ttl", "soon"), "--ttl must be a positive duration"),
        (("--uses", "0"), "uses"),
        (("--device-class", "tpu"), "device_class"),
    ):
        refused = _palisade(env_home, "fleet", "token", "create", "--region", "eu", *flags, *url)
        assert refused.returncode == 1
        assert message in refused.stderr


def test_fleet_admin_routes_need_a_system_admin(fleet: Fleet) -> None:
    admin = fleet.admin
    admin.create_org("tenant-x", ["eu"])
    member = admin.member("tenant-x", "org_admin", "owner@tenant-x.test")
    as_member = admin.as_member(member)
    for method, path, body in (
        ("POST", "/admin/v1/fleet/tokens", {"region": "eu"}),
        ("GET", "/admin/v1/fleet/nodes", None),
        ("POST", "/admin/v1/fleet/nodes/edge-first/revoke", None),
        ("POST", "/admin/v1/fleet/monitors", {"name": "prometheus", "csr": "x"}),
        ("GET", "/admin/v1/fleet/monitors", None),
        ("POST", "/admin/v1/fleet/monitors/prometheus/revoke", None),
    ):
        answer = as_member.call(method, path, body)
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["code"] == "permission_denied", answer.text
    assert httpx.get(f"{fleet.router.url}/admin/v1/fleet/nodes", timeout=10).status_code == 401
    assert httpx.get(f"{fleet.router.url}/admin/v1/fleet/monitors", timeout=10).status_code == 401


def test_node_init_is_idempotent_and_refuses_conflicts(tmp_path: Path) -> None:
    home = _node(tmp_path, "idempotent")
    _init(home, "edge-same", "eu")
    before = _files(home)
    again = _palisade(
        home, "node", "init", "--region", "eu", "--node-id", "edge-same", "--host", "127.0.0.1"
    )
    assert again.returncode == 0
    assert "nothing changed" in again.stdout
    assert _files(home) == before
    conflict = _palisade(home, "node", "init", "--region", "us")
    assert conflict.returncode == 1
    assert "(node_already_initialised)" in conflict.stderr
    assert _files(home) == before
    bad = _palisade(home, "node", "init", "--region", "eu", "--device-class", "tpu")
    assert bad.returncode == 1
    assert "(invalid_value)" in bad.stderr


# --- helpers --------------------------------------------------------------------------------


def _post_enroll(fleet: Fleet, body: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(verify=_pinned(fleet), timeout=30) as client:
        return client.post(
            f"{fleet.fleet_url}/federation/v1/enroll",
            content=content,
            headers={"content-type": "application/json"},
        )


def _pinned(fleet: Fleet, home: Path | None = None) -> ssl.SSLContext:
    ctx = client_context(
        fleet.ca_path,
        home / "fleet" / "node.pem" if home else None,
        home / "node.key" if home else None,
    )
    ctx.check_hostname = False  # the fleet listener's certificate names 127.0.0.1 too
    return ctx


def _renew(fleet: Fleet, home: Path) -> httpx.Response:
    csr = make_csr(NodeIdentity.load_or_create(home), "edge-renewed", []).decode()
    with httpx.Client(verify=_pinned(fleet, home), timeout=30) as client:
        return client.post(f"{fleet.fleet_url}/federation/v1/renew", json={"csr": csr})


@contextmanager
def _hostile_router(
    fleet: Fleet, *, ca_pem: bytes | None = None, tamper: Callable[[str], str] | None = None
) -> Iterator[str]:
    """Someone in the path between node and router: a TLS server with the router's own
    certificate and key (what an attacker who stole them would have) that serves `ca_pem`
    as the CA, and relays enrollments to the real router with the certificate in the answer
    passed through `tamper`."""
    home = fleet.router.home
    real = fleet.fleet_url
    router_id = identity_of(load_pem_certificate((home / "fleet" / "router.pem").read_bytes()))
    served_ca = ca_pem if ca_pem is not None else fleet.ca_path.read_bytes()

    class Relay(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(200, served_ca, "application/x-pem-file")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            with httpx.Client(verify=_pinned(fleet), timeout=30) as client:
                upstream = client.post(
                    f"{real}{self.path}",
                    content=body,
                    headers={"content-type": "application/json"},
                    extensions={"sni_hostname": router_dns_name(router_id.node_id)},
                )
            payload = upstream.json()
            if upstream.status_code == 200 and tamper is not None:
                payload["certificate"] = tamper(payload["certificate"])
            self._answer(upstream.status_code, json.dumps(payload).encode(), "application/json")

        def _answer(self, status: int, body: bytes, media: str) -> None:
            self.send_response(status)
            self.send_header("content-type", media)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            return  # no per-request line on stderr

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    tls = server_context(
        home / "fleet" / "router.pem", home / "node.key", None, None, client_certs=False
    )
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
