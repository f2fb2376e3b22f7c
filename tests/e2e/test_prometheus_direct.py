"""Go's x509 parses the fleet's certificates: Debian's Prometheus scrapes an enrolled
appliance's /metrics directly over mTLS.

Prometheus trusts the fleet CA, checks the node's certificate for its fleet DNS name and
presents a `monitor` certificate from the fleet CA (a client certificate no fleet route
takes), issued with `palisade fleet monitor issue`; once `palisade fleet monitor revoke`
puts it on the CRL, the node refuses its handshake and cuts the connection Prometheus
kept open: its target goes down. Beside the node, a TLS server
presenting a certificate laid out as releases before the URNs issued them (region and
device class as subject attributes under 128-bit OID arcs) is scraped by the same
Prometheus: Go refuses that one, so the test could fail.
"""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID, ObjectIdentifier

from federation import client_context, node_dns_name, write_private
from router._private.ca import FleetCA
from router._private.monitoring import PROMETHEUS, free_port, start_prometheus
from tests.e2e.fleet import running_fleet
from tests.federation.forgery import ca_signed
from tests.support import Server, run_palisade, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which(PROMETHEUS) is None,
    reason="Debian's prometheus is absent: run `make system-deps`",
)

SCRIPTED = """[[models]]
id = "scripted"
engine = "scripted"
replies = ["one two"]
"""
# How soon a node refuses a revoked certificate (the same bound as for a revoked node's,
# tests/e2e/test_policy_propagation.py).
PROPAGATION_S = 2.0
SCRAPE_S = 1.0  # the scrape interval and timeout of the jobs below
LEGACY_REGION = ObjectIdentifier("2.25.310613956484810803564186195976021482477")


def _private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _fleet_monitor(router: Server, *args: str) -> dict[str, Any]:
    """`palisade fleet monitor …` against the router, as its system admin."""
    done = run_palisade(
        "fleet", "monitor", *args, "--url", router.url, "--json",
        env={"PALISADE_HOME": str(router.home)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def _monitor_credentials(router: Server, directory: Path) -> tuple[Path, Path, int]:
    """A monitor certificate, its key (made by the CLI, never printed) and its serial."""
    issued = _fleet_monitor(router, "issue", "--name", "prometheus", "--out", str(directory))
    cert, key = directory / "prometheus.pem", directory / "prometheus.key"
    assert issued["files"] == [str(key), str(cert), str(directory / "ca.pem")]
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()
    assert "PRIVATE KEY" not in json.dumps(issued)
    assert issued["not_after"] - issued["issued_at"] == pytest.approx(90 * 86400, abs=5)
    return cert, key, int(issued["serial"])


def _revoked_on(member: Server) -> set[int]:
    """The serials on the CRL the node holds (from its policy snapshot)."""
    crl = x509.load_pem_x509_crl((member.home / "fleet" / "crl.pem").read_bytes())
    return {entry.serial_number for entry in crl}


def _handshake_refused(url: str, monitor: ssl.SSLContext) -> bool:
    """Whether a new TLS connection presenting the monitor certificate is refused."""
    try:
        response = httpx.get(f"{url}/metrics", verify=monitor, timeout=5)
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    assert response.status_code == 200, response.text
    return False


@contextmanager
def _legacy_node(router_home: Path, directory: Path) -> Iterator[str]:
    """An HTTPS /metrics on 127.0.0.1 presenting an older release's node certificate."""
    key = Ed25519PrivateKey.generate()
    ca = FleetCA.load_or_create(router_home)
    subject = [
        (NameOID.COMMON_NAME, "legacy-1"),
        (NameOID.ORGANIZATION_NAME, ca.fleet_id),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "node"),
        (LEGACY_REGION, "eu"),
    ]
    names: list[x509.GeneralName] = [x509.DNSName(node_dns_name("legacy-1"))]
    cert = ca_signed(router_home, subject, names, public_key=key.public_key())
    write_private(directory / "legacy.pem", _pem(cert))
    write_private(directory / "legacy.key", _private_key_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "legacy.pem", directory / "legacy.key")

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"legacy_up 1\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _scrape_job(name: str, target: str, ca: Path, cert: Path, key: Path) -> dict[str, Any]:
    return {
        "job_name": name,
        "scheme": "https",
        "scrape_interval": f"{SCRAPE_S:g}s",
        "scrape_timeout": f"{SCRAPE_S:g}s",
        "static_configs": [{"targets": [target]}],
        "tls_config": {
            "ca_file": str(ca),
            "cert_file": str(cert),
            "key_file": str(key),
            "server_name": node_dns_name(name),
        },
    }


@contextmanager
def _prometheus(directory: Path, jobs: list[dict[str, Any]]) -> Iterator[str]:
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}
    write_private(directory / "prometheus.yml", json.dumps(config, indent=2) + "\n")
    address = f"127.0.0.1:{free_port()}"
    process = start_prometheus(directory, address, directory / "prometheus.log")
    try:
        yield f"http://{address}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _targets(prometheus: str) -> dict[str, dict[str, Any]]:
    """Active targets by job, once Prometheus answers (empty before)."""
    try:
        data = httpx.get(f"{prometheus}/api/v1/targets", timeout=2).json()["data"]
    except httpx.HTTPError:
        return {}
    return {target["labels"]["job"]: target for target in data["activeTargets"]}


def _scrape_refused(prometheus: str) -> bool:
    """The node's target is down: its last scrape failed (Go sees the refused handshake's
    alert as a reset connection). One on a connection from before the revocation would
    have gone through."""
    node = _targets(prometheus).get("eu-1")
    return bool(node and node["health"] == "down" and node["lastError"])


def _settled(prometheus: str) -> bool:
    """The node scraped successfully and the legacy server scraped at all."""
    targets = _targets(prometheus)
    node, legacy = targets.get("eu-1"), targets.get("legacy-1")
    return bool(node and legacy and node["health"] == "up" and legacy["health"] != "unknown")


def test_prometheus_scrapes_an_enrolled_node_directly_over_mtls(tmp_path: Path) -> None:
    monitoring = tmp_path / "monitoring"
    monitoring.mkdir(mode=0o700)
    with running_fleet(tmp_path) as fleet:
        member = fleet.start_member("eu-1", "eu", SCRIPTED)
        fleet.wait_joined("eu-1")
        cert, key, serial = _monitor_credentials(fleet.router, monitoring)
        node_target = member.url.removeprefix("https://")
        with (
            _legacy_node(fleet.router.home, monitoring) as legacy_target,
            _prometheus(
                monitoring,
                [
                    _scrape_job("eu-1", node_target, fleet.ca_path, cert, key),
                    _scrape_job("legacy-1", legacy_target, fleet.ca_path, cert, key),
                ],
            ) as prometheus,
        ):
            try:
                wait_for(lambda: _settled(prometheus), timeout=60, interval=0.2)
            except TimeoutError:
                pytest.fail(f"Prometheus never scraped the node: {_targets(prometheus)}")
            targets = _targets(prometheus)
            node = targets["eu-1"]
            assert (node["health"], node["lastError"]) == ("up", ""), node
            assert node["scrapeUrl"] == f"https://{node_target}/metrics"
            legacy = targets["legacy-1"]
            assert legacy["health"] == "down"
            assert "x509: invalid RDNSequence" in legacy["lastError"], legacy
            series = httpx.get(
                f"{prometheus}/api/v1/query",
                params={"query": 'scrape_samples_scraped{job="eu-1"}'},
                timeout=5,
            ).json()["data"]["result"]
            assert float(series[0]["value"][1]) > 0

            # The monitor certificate passes the handshake and nothing else.
            monitor = client_context(fleet.ca_path, cert, key)
            assert not _handshake_refused(member.url, monitor)
            offered = httpx.post(
                f"{member.url}/federation/v1/policy", content=b"{}", verify=monitor
            )
            assert offered.json()["error"]["code"] == "client_certificate_required", offered.text
            beat = httpx.post(f"{fleet.fleet_url}/federation/v1/heartbeat", json={}, verify=monitor)
            assert beat.json()["error"]["code"] == "node_identity_mismatch", beat.text

            # Revoked, it is refused by the node as a revoked node certificate is: the CRL
            # travels in the next policy snapshot, new handshakes fail, and the connection
            # Prometheus kept open from before (it scrapes every second) is cut.
            listed = _fleet_monitor(fleet.router, "list")["data"]
            assert [(row["name"], row["state"]) for row in listed] == [("prometheus", "valid")]
            started = time.monotonic()
            revoked = _fleet_monitor(fleet.router, "revoke", "prometheus")["data"]
            assert [(row["serial"], row["state"]) for row in revoked] == [(str(serial), "revoked")]
            wait_for(lambda: _handshake_refused(member.url, monitor), timeout=10, interval=0.01)
            elapsed = time.monotonic() - started
            print(f"\nmonitor revocation refused by the node after {elapsed * 1000:.0f} ms")  # noqa: T201
            assert elapsed < PROPAGATION_S
            assert serial in _revoked_on(member)
            try:
                wait_for(lambda: _scrape_refused(prometheus), timeout=10, interval=0.1)
            except TimeoutError:
                pytest.fail(f"Prometheus still scrapes the node: {_targets(prometheus)}")
            elapsed = time.monotonic() - started
            print(f"Prometheus's target down after {elapsed * 1000:.0f} ms")  # noqa: T201
            assert elapsed < PROPAGATION_S + SCRAPE_S * 3
