"""Fleet x509: identities round-trip through certificates, requests are checked, a CRL added
to a live TLS context is honoured on the next handshake (real sockets on 127.0.0.1).
Certificates a tricked CA would sign (two regions, a region in two places, unknown or
malformed `urn:palisade:` names) are refused; an older release's OIDs are still read."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from federation import (
    APIError,
    ConfigError,
    NodeCredentials,
    NodeIdentity,
    NodeState,
    PeerIdentity,
    client_context,
    fingerprint,
    host_problem,
    identity_of,
    load_pem_certificate,
    make_csr,
    node_dns_name,
    peer_identity,
    raw_public_key,
    reload_crl,
    requested_hosts,
    router_dns_name,
    server_context,
    write_private,
)
from router._private.ca import FleetCA
from tests.federation.forgery import ca_signed

# What releases before the URNs wrote into node subjects (still read, never issued).
LEGACY_REGION = ObjectIdentifier("2.25.310613956484810803564186195976021482477")
LEGACY_DEVICE_CLASS = ObjectIdentifier("2.25.288518122563068208789969010568663243962")


class Clock:
    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _enrolled(home: Path, ca: FleetCA, node_id: str, region: str = "eu") -> x509.Certificate:
    identity = NodeIdentity.load_or_create(home)
    cert = ca.issue_node(make_csr(identity, node_id, ["127.0.0.1"]), node_id, region, "cpu")
    write_private(home / "node.pem", _pem(cert))
    return cert


def test_node_certificate_round_trips_its_identity(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "router")
    identity = NodeIdentity.load_or_create(tmp_path / "node")
    csr = make_csr(identity, "edge-1", ["edge-1.example", "10.0.0.7"])
    cert = ca.issue_node(csr, "edge-1", "eu-west", "gpu")

    peer = identity_of(load_pem_certificate(_pem(cert)))
    assert peer == PeerIdentity(
        node_id="edge-1",
        role="node",
        fleet_id=ca.fleet_id,
        region="eu-west",
        device_class="gpu",
        serial=cert.serial_number,
        fingerprint=fingerprint(cert),
        not_after=cert.not_valid_after_utc.timestamp(),
    )
    assert ca.fleet_id.startswith("fleet-")
    assert raw_public_key(cert) == identity.public_key
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [node_dns_name("edge-1"), "edge-1.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:palisade:region:eu-west",
        "urn:palisade:device-class:gpu",
    ]
    standard = {NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME}
    assert {attribute.oid for attribute in cert.subject} == standard
    cert.verify_directly_issued_by(ca.certificate)


def test_router_certificate_has_role_router_and_no_region(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    router = NodeIdentity.load_or_create(tmp_path)
    peer = identity_of(ca.issue_router(router, "router-1", ["127.0.0.1"]))
    assert (peer.node_id, peer.role, peer.region, peer.device_class) == (
        "router-1",
        "router",
        None,
        None,
    )
    assert router_dns_name("router-1") == "router-1.router.palisade.internal"


def _subject(ca: FleetCA, role: str = "node") -> list[tuple[ObjectIdentifier, str]]:
    return [
        (NameOID.COMMON_NAME, "edge-1"),
        (NameOID.ORGANIZATION_NAME, ca.fleet_id),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, role),
    ]


def _urns(*values: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(value) for value in values]


REGION_EU, REGION_US = "urn:palisade:region:eu", "urn:palisade:region:us"


@pytest.mark.parametrize(
    ("role", "extra", "names", "reason"),
    [
        ("node", [], _urns(REGION_EU, REGION_US), "2 values for its region"),
        ("node", [], _urns(REGION_EU, REGION_EU), "2 values for its region"),
        ("node", [], _urns(REGION_EU, "URN:Palisade:Region:us"), "2 values for its region"),
        (
            "node",
            [],
            _urns(REGION_EU, "urn:palisade:device-class:cpu", "urn:palisade:device-class:gpu"),
            "2 values for its device class",
        ),
        ("node", [(LEGACY_REGION, "eu")], _urns(REGION_EU), "both as a URI and as an OID"),
        ("node", [(LEGACY_DEVICE_CLASS, "gpu")], _urns(REGION_EU), "both as a URI and as an OID"),
        ("node", [(LEGACY_REGION, "eu"), (LEGACY_REGION, "us")], [], "2 values for its region"),
        ("node", [], _urns(REGION_EU, "urn:palisade:zone:a"), "not a fleet name"),
        ("node", [], _urns(REGION_EU, "urn:palisade:region"), "not a fleet name"),
        ("node", [], _urns("urn:palisade:region:EU West"), "not a region name"),
        ("node", [], _urns("urn:palisade:region:"), "not a region name"),
        ("node", [], _urns("urn:palisade:region:eu/../us"), "not a region name"),
        ("node", [], _urns(REGION_EU, "urn:palisade:device-class:tpu"), "not a device class"),
        ("node", [(LEGACY_REGION, "eu\nus")], [], "not a region name"),
        ("node", [], [], "must name one region"),
        ("node", [], _urns("urn:palisade:device-class:cpu"), "must name one region"),
        ("router", [], _urns(REGION_EU), "names no region"),
        ("monitor", [(LEGACY_REGION, "eu")], [], "names no region"),
        ("node", [(NameOID.COMMON_NAME, "edge-2")], _urns(REGION_EU), "2.5.4.3 twice"),
    ],
)
def test_identity_of_refuses_what_a_tricked_ca_could_sign(
    tmp_path: Path,
    role: str,
    extra: list[tuple[ObjectIdentifier, str]],
    names: list[x509.GeneralName],
    reason: str,
) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    cert = ca_signed(tmp_path, [*_subject(ca, role), *extra], names)
    with pytest.raises(ValueError, match=reason):
        identity_of(cert)


def test_a_certificate_from_before_the_urns_is_read_until_it_is_renewed(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    legacy = [(LEGACY_REGION, "eu-west"), (LEGACY_DEVICE_CLASS, "rdu")]
    hosts: list[x509.GeneralName] = [x509.DNSName(node_dns_name("edge-1"))]
    peer = identity_of(ca_signed(tmp_path, [*_subject(ca), *legacy], hosts))
    assert (peer.node_id, peer.role, peer.region, peer.device_class) == (
        "edge-1",
        "node",
        "eu-west",
        "rdu",
    )
    assert identity_of(ca_signed(tmp_path, [*_subject(ca), legacy[0]], [])).device_class is None
    # URIs outside `urn:palisade:` (another scheme's) are not the fleet's to judge.
    other = _urns("spiffe://example.org/workload", REGION_EU)
    assert identity_of(ca_signed(tmp_path, _subject(ca), other)).region == "eu"


def test_a_client_certificate_without_a_fleet_identity_is_none_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    hostile = ca_signed(tmp_path, _subject(ca), _urns(REGION_EU, REGION_US))
    scope = {"extensions": {"tls": {"client_cert_chain": [_pem(hostile).decode("ascii")]}}}
    with caplog.at_level(logging.WARNING, logger="palisade.serving"):
        assert peer_identity(scope) is None
    assert "2 values for its region" in caplog.text


def test_monitor_certificate_is_a_client_certificate_without_a_region(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    cert = ca.issue_monitor(Ed25519PrivateKey.generate().public_key(), "prometheus")
    peer = identity_of(cert)
    assert (peer.node_id, peer.role, peer.region, peer.fleet_id) == (
        "prometheus",
        "monitor",
        None,
        ca.fleet_id,
    )
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(ca.certificate)


def test_csr_may_not_ask_for_fleet_urns_or_other_name_types(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    identity = NodeIdentity.load_or_create(tmp_path)
    for name in (REGION_US, "https://example.org/"):
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n")]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(name)]),
                critical=False,
            )
            .sign(identity.private_key, algorithm=None)
            .public_bytes(serialization.Encoding.PEM)
        )
        with pytest.raises(APIError) as refused:
            ca.issue_node(csr, "n", "eu", None)
        assert refused.value.code == "invalid_csr"
        assert name in refused.value.message
        assert "only DNS names and IP addresses" in refused.value.message


def test_ca_is_created_once_private_and_reloaded(tmp_path: Path) -> None:
    first = FleetCA.load_or_create(tmp_path)
    again = FleetCA.load_or_create(tmp_path)
    assert (again.fingerprint, again.fleet_id) == (first.fingerprint, first.fleet_id)
    assert first.fingerprint.startswith("sha256:")
    assert len(first.fingerprint) == len("sha256:") + 64
    for name in ("ca.key", "ca.pem", "fleet.id"):
        assert (tmp_path / "fleet" / name).stat().st_mode & 0o777 == 0o600
    constraints = first.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)


def test_csr_takes_only_key_and_hosts_the_ca_writes_the_subject(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    identity = NodeIdentity.load_or_create(tmp_path)
    csr_pem = make_csr(identity, "asks-to-be-someone-else", ["a.example"])
    assert requested_hosts(x509.load_pem_x509_csr(csr_pem)) == ["a.example"]
    cert = ca.issue_node(csr_pem, "edge-2", "us", None)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-2"
    assert identity_of(cert).device_class is None


def test_csr_with_a_bad_signature_is_refused(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    good = x509.load_pem_x509_csr(make_csr(NodeIdentity.load_or_create(tmp_path), "n", []))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte belongs to the signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(APIError) as refused:
        ca.issue_node(forged, "n", "eu", None)
    assert refused.value.code == "invalid_csr"
    with pytest.raises(APIError) as garbage:
        ca.issue_node(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "n", "eu", None)
    assert garbage.value.code == "invalid_csr"


@pytest.mark.parametrize(
    "host",
    [
        "router-1.router.palisade.internal",
        "Other.Node.Palisade.Internal.",
        "*.example",
        "two words",
        "-dash.example",
    ],
)
def test_csr_may_not_ask_for_fleet_names_or_wildcards(tmp_path: Path, host: str) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    csr = make_csr(NodeIdentity.load_or_create(tmp_path), "n", ["ok.example", host])
    with pytest.raises(APIError) as refused:
        ca.issue_node(csr, "n", "eu", None)
    assert refused.value.code == "invalid_csr"
    assert host in refused.value.message
    assert host_problem("edge-1.example.com") is None
    assert host_problem("fd00::7") is None


def test_identity_of_refuses_a_certificate_without_a_fleet_subject(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path)
    with pytest.raises(ValueError, match="not a fleet subject"):
        identity_of(ca.certificate)


@contextmanager
def _tls_server(ctx: ssl.SSLContext) -> Iterator[tuple[int, list[PeerIdentity | None]]]:
    """Accepts connections until closed; records who each client certificate names."""
    listener = socket.create_server(("127.0.0.1", 0))
    peers: list[PeerIdentity | None] = []

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    der = conn.getpeercert(binary_form=True)
                    peers.append(identity_of(x509.load_der_x509_certificate(der)) if der else None)
                    conn.sendall(b"ok")
            except (ssl.SSLError, OSError):
                raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], peers
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        thread.join(timeout=5)


def _handshake(port: int, ctx: ssl.SSLContext, server_hostname: str) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as conn,
    ):
        return conn.recv(2)


def _refused(port: int, ctx: ssl.SSLContext, server_hostname: str) -> bool:
    """TLS 1.3 clients finish their handshake before the server checks their certificate:
    a refusal shows as an alert or a closed connection on the first read."""
    try:
        return _handshake(port, ctx, server_hostname) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_mtls_handshake_and_live_crl_reload(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "router")  # TLS checks times against the real clock
    ca_path, crl_path = tmp_path / "ca.pem", tmp_path / "crl.pem"
    write_private(ca_path, ca.pem)
    write_private(crl_path, ca.crl([], number=1))
    server_home, client_home = tmp_path / "server", tmp_path / "client"
    _enrolled(server_home, ca, "server-node")
    client_cert = _enrolled(client_home, ca, "client-node")
    server = server_context(
        server_home / "node.pem", server_home / "node.key", ca_path, crl_path, client_certs=True
    )
    client = client_context(ca_path, client_home / "node.pem", client_home / "node.key")
    anonymous = client_context(None, ca_pem=ca.pem)

    with _tls_server(server) as (port, peers):
        assert _handshake(port, client, node_dns_name("server-node")) == b"ok"
        assert _handshake(port, anonymous, node_dns_name("server-node")) == b"ok"
        assert [peer.node_id if peer else None for peer in peers] == ["client-node", None]
        assert peers[0] is not None
        assert peers[0].serial == client_cert.serial_number

        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            _handshake(port, client, node_dns_name("another-node"))

        write_private(crl_path, ca.crl([(client_cert.serial_number, time.time())], number=2))
        reload_crl(server, crl_path)
        assert _refused(port, client, node_dns_name("server-node"))
        assert _handshake(port, anonymous, node_dns_name("server-node")) == b"ok"
        assert len(peers) == 3


def test_client_certs_need_a_crl(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "router")
    write_private(tmp_path / "ca.pem", ca.pem)
    _enrolled(tmp_path, ca, "n1")
    with pytest.raises(ValueError, match="CRL"):
        server_context(tmp_path / "node.pem", tmp_path / "node.key", None, None, client_certs=True)


def test_node_state_round_trips_through_node_toml(tmp_path: Path) -> None:
    assert NodeState.load(tmp_path) is None
    state = NodeState(
        node_id="edge-1",
        region="eu-west",
        device_class="gpu",
        hosts=["edge-1.example", "fd00::7"],
        state="enrolled",
        fleet_id="fleet-0123abcd",
        fleet_url='https://10.0.0.1:8301/"quoted"',
        ca_fingerprint="sha256:" + "a" * 64,
    )
    state.save(tmp_path)
    assert NodeState.load(tmp_path) == state
    assert (tmp_path / "node.toml").stat().st_mode & 0o777 == 0o600
    credentials = NodeCredentials.load(tmp_path)
    assert not credentials.enrolled  # node.toml says so, but there is no certificate
    (tmp_path / "node.toml").write_text('node_id = "edge-1"\nregion = "eu"\nregoin = "x"\n')
    with pytest.raises(ConfigError, match="regoin"):
        NodeState.load(tmp_path)
