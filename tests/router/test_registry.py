"""The router's node registry and fleet CA without sockets: every enrollment refusal has its
stable code and leaves the registry unchanged; renewal and revocation; an injected clock."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from federation import (
    APIError,
    EnrollRequest,
    NodeIdentity,
    TokenClaims,
    identity_of,
    load_pem_certificate,
    make_csr,
    raw_public_key,
    read_token,
    sign_token,
)
from router._private.ca import FleetCA
from router._private.registry import NodeRegistry
from tests.federation.forgery import ca_signed, csr_with_signature

FLEET_URL = "https://127.0.0.1:9443"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Router:
    home: Path
    clock: Clock
    registry: NodeRegistry

    def token(
        self,
        region: str = "eu",
        *,
        node_id: str | None = None,
        device_class: str | None = None,
        ttl_s: float = 3600,
        uses: int = 1,
    ) -> str:
        created = self.registry.create_token(
            region=region,
            fleet_url=FLEET_URL,
            created_by="admin",
            node_id=node_id,
            device_class=device_class,
            ttl_s=ttl_s,
            uses=uses,
        )
        return created.token

    def snapshot(self) -> tuple[object, ...]:
        """Everything enrollment could change: every table and the CRL."""
        with sqlite3.connect(self.registry.path) as db:
            tables = tuple(
                tuple(db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall())  # noqa: S608
                for table in ("tokens", "nodes", "certificates", "counters", "monitors")
            )
        crl = self.registry.crl_path.read_bytes() if self.registry.crl_path.exists() else b""
        return (*tables, crl)


def _router(home: Path, clock: Clock | None = None) -> Router:
    clock = clock or Clock()
    ca = FleetCA.load_or_create(home, clock, sleep=lambda _s: None)
    registry = NodeRegistry(home, ca, NodeIdentity.load_or_create(home), "router-1", clock)
    return Router(home, clock, registry)


@pytest.fixture
def router(tmp_path: Path) -> Router:
    return _router(tmp_path / "router")


def _node(tmp_path: Path, name: str = "node") -> NodeIdentity:
    return NodeIdentity.load_or_create(tmp_path / name)


def _request(
    token: str,
    identity: NodeIdentity,
    node_id: str = "edge-1",
    region: str = "eu",
    device_class: str | None = None,
) -> EnrollRequest:
    csr = make_csr(identity, node_id, []).decode("ascii")
    return EnrollRequest(
        token=token,
        csr=csr,
        node_id=node_id,
        region=region,
        device_class=device_class,  # type: ignore[arg-type]
    )


def _refused(router: Router, request: EnrollRequest, code: str, status: int) -> APIError:
    before = router.snapshot()
    with pytest.raises(APIError) as refused:
        router.registry.enroll(request)
    assert (refused.value.code, refused.value.status_code) == (code, status)
    assert router.snapshot() == before
    return refused.value


def test_a_valid_token_enrolls_once(router: Router, tmp_path: Path) -> None:
    node = _node(tmp_path)
    token = router.token(device_class="gpu", node_id="edge-1")
    answer = router.registry.enroll(_request(token, node, device_class="gpu"))

    cert = load_pem_certificate(answer.certificate.encode())
    holder = identity_of(cert)
    assert (holder.node_id, holder.region, holder.device_class, holder.role) == (
        "edge-1",
        "eu",
        "gpu",
        "node",
    )
    assert raw_public_key(cert) == node.public_key
    cert.verify_directly_issued_by(router.registry.ca.certificate)
    assert answer.router_public_key == router.registry.identity.public_key.hex()
    assert answer.crl.startswith("-----BEGIN X509 CRL-----")
    assert [row.node_id for row in router.registry.nodes()] == ["edge-1"]

    refusal = _refused(router, _request(token, node), "enrollment_token_used", 401)
    assert "already been used" in refusal.message


def test_a_token_allows_as_many_nodes_as_its_uses(router: Router, tmp_path: Path) -> None:
    token = router.token(uses=2)
    router.registry.enroll(_request(token, _node(tmp_path, "a"), node_id="a"))
    router.registry.enroll(_request(token, _node(tmp_path, "b"), node_id="b"))
    _refused(
        router, _request(token, _node(tmp_path, "c"), node_id="c"), "enrollment_token_used", 401
    )


def test_an_expired_token_is_refused(router: Router, tmp_path: Path) -> None:
    token = router.token(ttl_s=60)
    router.clock.now += 60
    _refused(router, _request(token, _node(tmp_path)), "enrollment_token_expired", 401)


def test_a_token_for_another_region_node_or_device_class_is_refused(
    router: Router, tmp_path: Path
) -> None:
    node = _node(tmp_path)
    refusal = _refused(
        router, _request(router.token("us"), node), "enrollment_region_mismatch", 403
    )
    assert "`us`" in refusal.message
    assert "`eu`" in refusal.message
    pinned = router.token(node_id="edge-7")
    _refused(router, _request(pinned, node), "enrollment_node_mismatch", 403)
    gpu_only = router.token(device_class="gpu")
    _refused(router, _request(gpu_only, node, device_class="cpu"), "enrollment_node_mismatch", 403)
    _refused(router, _request(gpu_only, node), "enrollment_node_mismatch", 403)


def test_tokens_this_router_did_not_issue_are_refused(router: Router, tmp_path: Path) -> None:
    other = _router(tmp_path / "other-router")
    node = _node(tmp_path)
    _refused(router, _request(other.token(), node), "invalid_enrollment_token", 401)

    # Signed with this router's key but never recorded in its registry.
    forged = TokenClaims(
        id="0" * 16,
        fleet_id=router.registry.ca.fleet_id,
        router_id="router-1",
        region="eu",
        expires_at=router.clock.now + 60,
        uses=1,
        ca_fingerprint=router.registry.ca.fingerprint,
        fleet_url=FLEET_URL,
    )
    unknown = sign_token(router.registry.identity, forged)
    refusal = _refused(router, _request(unknown, node), "invalid_enrollment_token", 401)
    assert "no record" in refusal.message

    token = router.token()
    prefix, claims, signature = token.split(".")
    tampered = f"{prefix}.{claims[:-2]}{'A' if claims[-2] != 'A' else 'B'}{claims[-1]}.{signature}"
    for bad in (tampered, "pet1.garbage", "not-a-token", token[:-4]):
        refusal = _refused(router, _request(bad, node), "invalid_enrollment_token", 401)
        assert bad not in refusal.message  # never echoed back


def test_a_csr_that_does_not_verify_is_refused(router: Router, tmp_path: Path) -> None:
    token = router.token()
    request = _request(token, _node(tmp_path))
    csr = x509.load_pem_x509_csr(request.csr.encode())
    other = x509.load_pem_x509_csr(make_csr(_node(tmp_path, "other"), "edge-1", []))
    # The first node's request body with the other key's signature.
    body = csr.tbs_certrequest_bytes
    forged = csr_with_signature(body, other.signature)
    assert not x509.load_pem_x509_csr(forged.encode()).is_signature_valid
    request.csr = forged
    _refused(router, request, "invalid_csr", 400)
    request.csr = "-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"
    _refused(router, request, "invalid_csr", 400)
    assert router.registry.uses_left(_token_id(token)) == 1


def _token_id(token: str) -> str:
    return read_token(token).id


def test_a_node_id_enrolled_with_another_key_is_refused_until_revoked(
    router: Router, tmp_path: Path
) -> None:
    first, second = _node(tmp_path, "first"), _node(tmp_path, "second")
    router.registry.enroll(_request(router.token(), first))
    _refused(router, _request(router.token(), second), "node_key_mismatch", 409)

    # Reinstall with the same key and a fresh token: allowed, a new certificate.
    again = router.registry.enroll(_request(router.token(), first))
    assert router.registry.nodes()[0].serial == str(again.serial)

    router.registry.revoke("edge-1")
    replaced = router.registry.enroll(_request(router.token(), second))
    assert raw_public_key(load_pem_certificate(replaced.certificate.encode())) == second.public_key
    assert router.registry.nodes()[0].revoked_at is None


def test_renewal_keeps_the_key_and_identity(router: Router, tmp_path: Path) -> None:
    node = _node(tmp_path)
    first = router.registry.enroll(
        _request(router.token(device_class="cpu"), node, device_class="cpu")
    )
    peer = identity_of(load_pem_certificate(first.certificate.encode()))
    router.clock.now += 20 * 86400

    renewed = router.registry.renew(peer, make_csr(node, "edge-1", ["10.1.2.3"]).decode())
    fresh = identity_of(load_pem_certificate(renewed.certificate.encode()))
    assert fresh.serial != peer.serial
    assert (fresh.node_id, fresh.region, fresh.device_class) == ("edge-1", "eu", "cpu")
    assert fresh.not_after == pytest.approx(router.clock.now + 30 * 86400, abs=1)
    row = router.registry.node("edge-1")
    assert (row.serial, row.not_after) == (str(fresh.serial), fresh.not_after)
    assert row.enrolled_at == router.clock.now - 20 * 86400  # renewal is not enrollment
    assert router.registry.revoked_serials() == set()

    with pytest.raises(APIError) as other_key:
        router.registry.renew(fresh, make_csr(_node(tmp_path, "x"), "edge-1", []).decode())
    assert other_key.value.code == "node_key_mismatch"

    router.registry.revoke("edge-1")
    with pytest.raises(APIError) as revoked:
        router.registry.renew(fresh, make_csr(node, "edge-1", []).decode())
    assert (revoked.value.code, revoked.value.status_code) == ("node_revoked", 403)


def test_a_node_enrolled_before_the_urns_renews_to_them(router: Router, tmp_path: Path) -> None:
    """What an older router issued (the same serial, region and device class as subject
    OIDs, which Go cannot parse) renews into a certificate carrying them as URNs."""
    node = _node(tmp_path)
    first = router.registry.enroll(_request(router.token(), node, device_class="gpu"))
    issued = load_pem_certificate(first.certificate.encode())
    legacy = ca_signed(
        router.home,
        [
            *((a.oid, str(a.value)) for a in issued.subject),
            (ObjectIdentifier("2.25.310613956484810803564186195976021482477"), "eu"),
            (ObjectIdentifier("2.25.288518122563068208789969010568663243962"), "gpu"),
        ],
        [x509.DNSName("edge-1.node.palisade.internal")],
        public_key=node.private_key.public_key(),
        serial=issued.serial_number,
    )
    assert (
        legacy.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
        == []
    )

    renewed = router.registry.renew(identity_of(legacy), make_csr(node, "edge-1", []).decode())
    cert = load_pem_certificate(renewed.certificate.encode())
    assert (renewed.region, renewed.device_class) == ("eu", "gpu")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:palisade:region:eu",
        "urn:palisade:device-class:gpu",
    ]
    assert all(attribute.oid.dotted_string.startswith("2.5.4.") for attribute in cert.subject)


def test_revocation_lists_every_serial_in_a_newer_crl(router: Router, tmp_path: Path) -> None:
    node = _node(tmp_path)
    first = router.registry.enroll(_request(router.token(), node))
    peer = identity_of(load_pem_certificate(first.certificate.encode()))
    second = router.registry.renew(peer, make_csr(node, "edge-1", []).decode())
    router.registry.enroll(_request(router.token(), _node(tmp_path, "b"), node_id="other"))
    empty = x509.load_pem_x509_crl(router.registry.current_crl())
    assert list(empty) == []

    router.clock.now += 5
    serials = router.registry.revoke("edge-1")
    assert set(serials) == {first.serial, second.serial}
    crl = x509.load_pem_x509_crl(router.registry.crl_path.read_bytes())
    assert {entry.serial_number for entry in crl} == {first.serial, second.serial}
    crl.is_signature_valid(router.registry.ca.certificate.public_key())  # type: ignore[arg-type]
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    old = empty.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > old
    assert crl.last_update_utc > empty.last_update_utc
    assert router.registry.revoked_serials() == {first.serial, second.serial}
    revoked = {row.node_id: row.revoked_at for row in router.registry.nodes()}
    assert revoked == {"edge-1": router.clock.now, "other": None}

    before = router.snapshot()
    assert set(router.registry.revoke("edge-1")) == set(serials)
    assert router.snapshot() == before
    with pytest.raises(APIError) as unknown:
        router.registry.revoke("nobody")
    assert (unknown.value.code, unknown.value.status_code) == ("node_not_found", 404)


def test_two_nodes_racing_for_a_one_use_token_one_wins(router: Router, tmp_path: Path) -> None:
    token = router.token()
    requests = [_request(token, _node(tmp_path, f"n{i}"), node_id=f"n{i}") for i in range(6)]
    outcomes: list[str] = []
    start = threading.Barrier(len(requests))

    def attempt(request: EnrollRequest) -> None:
        start.wait()
        try:
            router.registry.enroll(request)
            outcomes.append("enrolled")
        except APIError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=attempt, args=(request,)) for request in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["enrolled"] + ["enrollment_token_used"] * 5
    assert len(router.registry.nodes()) == 1


def test_monitor_certificates_are_recorded_renewed_and_revoked_on_the_crl(
    router: Router, tmp_path: Path
) -> None:
    """Monitor certificates share the CRL with nodes but not their names: revoking node
    `prometheus` leaves monitor `prometheus` valid, and the other way round."""
    scraper = _node(tmp_path, "scraper")
    node = router.registry.enroll(_request(router.token(), _node(tmp_path), node_id="prometheus"))
    first = router.registry.add_monitor(
        router.registry.draft_monitor(
            make_csr(scraper, "x", ["10.0.0.1"]).decode(), "prometheus", 90
        ),
        "admin-user",
    )
    cert = load_pem_certificate(first.certificate.encode())
    holder = identity_of(cert)
    assert (holder.node_id, holder.role, holder.region) == ("prometheus", "monitor", None)
    with pytest.raises(x509.ExtensionNotFound):  # the request's host names are not taken
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert holder.not_after == pytest.approx(router.clock.now + 90 * 86400, abs=1)
    assert raw_public_key(cert) == scraper.public_key
    assert first.ca == router.registry.ca.pem.decode()
    assert (first.monitor.state, first.monitor.issued_by) == ("valid", "admin-user")

    router.clock.now += 80 * 86400
    renewed = router.registry.add_monitor(
        router.registry.draft_monitor(make_csr(scraper, "x", []).decode(), "prometheus", 30), "b"
    )
    assert [row.serial for row in router.registry.monitors()] == [
        first.monitor.serial,
        renewed.monitor.serial,
    ]
    router.registry.revoke("prometheus")  # the node
    assert router.registry.revoked_serials() == {node.serial}
    assert {row.state for row in router.registry.monitors("prometheus")} == {"valid"}

    serials = router.registry.revoke_monitor("prometheus")
    both = {int(first.monitor.serial), int(renewed.monitor.serial)}
    assert set(serials) == both
    crl = x509.load_pem_x509_crl(router.registry.crl_path.read_bytes())
    assert {entry.serial_number for entry in crl} == {node.serial, *both}
    assert router.registry.revoked_serials() == {node.serial, *both}
    assert {row.revoked_at for row in router.registry.monitors()} == {router.clock.now}

    before = router.snapshot()
    assert set(router.registry.revoke_monitor("prometheus")) == both
    assert router.snapshot() == before
    for call in (router.registry.revoke_monitor, router.registry.monitors):
        with pytest.raises(APIError) as unknown:
            call("grafana")
        assert (unknown.value.code, unknown.value.status_code) == ("monitor_not_found", 404)
    with pytest.raises(APIError) as bad:
        router.registry.draft_monitor("not a request", "grafana", 90)
    assert bad.value.code == "invalid_csr"
    assert router.snapshot() == before


def test_registry_files_are_private(router: Router) -> None:
    assert router.registry.path.stat().st_mode & 0o777 == 0o600
    assert (router.home / "fleet").stat().st_mode & 0o777 == 0o700
