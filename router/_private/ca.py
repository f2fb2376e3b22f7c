"""The fleet CA: the router's certificate authority for node and router identities.

Kept in the fleet directory (`<home>/fleet` unless the router's `fleet_dir` names another):
`ca.key` (Ed25519, 0600), `ca.pem` (self-signed, 10 years), `fleet.id` (random
`fleet-<8 hex>`, made with the CA). The CA writes every subject field and the region and
device-class names itself; from a certificate request it takes only the public key and the
host names asked for (see `federation.fleet_subject`, `federation.fleet_uris`).
"""

from __future__ import annotations

import datetime
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation import (
    ConfigError,
    NodeIdentity,
    dns_name,
    fingerprint,
    fleet_subject,
    fleet_uris,
    general_names,
    host_problem,
    invalid_csr,
    load_pem_certificate,
    requested_hosts,
    requested_other_names,
    write_private,
)

FLEET_DIR = "fleet"
CRL_FILE = "crl.pem"
CA_YEARS = 10
NODE_DAYS = 30
ROUTER_DAYS = 365
MONITOR_DAYS = 90
MAX_MONITOR_DAYS = 365
# Certificates start a little in the past so a node whose clock lags still accepts them.
BACKDATE = datetime.timedelta(minutes=5)
COARSE_CLOCK_LAG_S = 0.05
MAX_HOSTS = 16
Clock = Callable[[], float]


class FleetCA:
    """Issues node and router certificates and CRLs; one per router home."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        cert: x509.Certificate,
        fleet_id: str,
        clock: Clock = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._key = key
        self.certificate = cert
        self.fleet_id = fleet_id
        self.fingerprint = fingerprint(cert)
        self.pem = cert.public_bytes(serialization.Encoding.PEM)
        self._clock = clock
        self._sleep = sleep
        self._last_crl_second = 0
        # Where this home's CRL lives: the next CRL is dated after the one there, whoever
        # (another FleetCA of the same home, a process before a restart) wrote it.
        self.crl_path: Path | None = None

    @classmethod
    def load_or_create(
        cls, home: Path, clock: Clock = time.time, sleep: Callable[[float], None] = time.sleep
    ) -> FleetCA:
        """The CA of the fleet directory under `home` (made on first use)."""
        return cls.in_directory(home / FLEET_DIR, clock, sleep)

    @classmethod
    def in_directory(
        cls, directory: Path, clock: Clock = time.time, sleep: Callable[[float], None] = time.sleep
    ) -> FleetCA:
        """The CA kept in the fleet directory `directory` (made on first use)."""
        key_path, cert_path, id_path = (
            directory / "ca.key",
            directory / "ca.pem",
            directory / "fleet.id",
        )
        if not key_path.exists():
            _create(key_path, cert_path, id_path, clock())
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = load_pem_certificate(cert_path.read_bytes())
            fleet_id = id_path.read_text().strip()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"The fleet CA under {directory} is unreadable: {exc}.") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{key_path} is not an Ed25519 key.")
        ca = cls(key, cert, fleet_id, clock, sleep)
        ca.crl_path = directory / CRL_FILE
        return ca

    def issue_node(
        self,
        csr_pem: bytes,
        node_id: str,
        region: str,
        device_class: str | None,
        days: int = NODE_DAYS,
    ) -> x509.Certificate:
        """A node certificate for the key in `csr_pem`; `invalid_csr` if it does not verify."""
        csr = checked_csr(csr_pem)
        subject = fleet_subject(node_id, self.fleet_id, "node")
        hosts = [dns_name("node", node_id), *requested_hosts(csr)]
        names = [*general_names(list(dict.fromkeys(hosts))), *fleet_uris(region, device_class)]
        return self._issue(_ed25519(csr.public_key()), subject, names, days)

    def issue_router(
        self, identity: NodeIdentity, router_id: str, hosts: Iterable[str], days: int = ROUTER_DAYS
    ) -> x509.Certificate:
        """The router's own fleet certificate (role router) for its identity key."""
        subject = fleet_subject(router_id, self.fleet_id, "router")
        names = general_names(list(dict.fromkeys([dns_name("router", router_id), *hosts])))
        return self._issue(identity.private_key.public_key(), subject, names, days)

    def issue_monitor(
        self, public_key: Ed25519PublicKey, name: str, days: int = MONITOR_DAYS
    ) -> x509.Certificate:
        """A client certificate (role monitor) for a scraper such as Prometheus: it passes a
        node's TLS handshake and nothing else, no fleet route takes it."""
        subject = fleet_subject(name, self.fleet_id, "monitor")
        return self._issue(public_key, subject, [], days, usage=CLIENT_ONLY)

    def _issue(
        self,
        public_key: Ed25519PublicKey,
        subject: x509.Name,
        names: list[x509.GeneralName],
        days: int,
        usage: x509.ExtendedKeyUsage | None = None,
    ) -> x509.Certificate:
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_usage(), critical=True)
            .add_extension(usage or SERVER_AND_CLIENT, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_id(self.certificate), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self._key, algorithm=None)

    def crl(self, revoked: Iterable[tuple[int, float]], number: int) -> bytes:
        """A PEM CRL listing `(serial, revoked_at)`; `number` must grow with every CRL."""
        now = datetime.datetime.fromtimestamp(self._crl_second(), datetime.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            .next_update(now + datetime.timedelta(days=ROUTER_DAYS))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(_authority_key_id(self.certificate), critical=False)
        )
        for serial, revoked_at in revoked:
            when = datetime.datetime.fromtimestamp(revoked_at, datetime.UTC)
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self._key, algorithm=None).public_bytes(serialization.Encoding.PEM)

    def _crl_second(self) -> int:
        """last_update for the next CRL: a whole second later than the previous one's.

        Of two CRLs for the same issuer OpenSSL uses the one with the later last_update,
        and the first one loaded on a tie; a CRL dated in the future is not used at all.
        So the CA waits for the next second when it already issued a CRL in this one, and
        a little longer: OpenSSL reads time(), a coarse clock that lags a few milliseconds.
        """
        now = self._clock()
        previous = max(self._last_crl_second, _last_update(self.crl_path))
        second = max(int(now), previous + 1)
        if second + COARSE_CLOCK_LAG_S > now:
            self._sleep(second + COARSE_CLOCK_LAG_S - now)
        self._last_crl_second = second
        return second


SERVER_AND_CLIENT = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
CLIENT_ONLY = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])


def checked_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A parsed certificate request whose signature verifies and whose key is Ed25519."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise invalid_csr("it is not a PEM certificate request") from exc
    if not isinstance(csr.public_key(), Ed25519PublicKey):
        raise invalid_csr("fleet keys are Ed25519")
    if not csr.is_signature_valid:
        raise invalid_csr("its signature does not verify with the key it carries")
    try:
        hosts = requested_hosts(csr)
        others = requested_other_names(csr)
    except ValueError as exc:
        raise invalid_csr(f"its subject alternative names are malformed ({exc})") from exc
    if others:
        raise invalid_csr(
            f"it asks for {', '.join(others)}; a request names only DNS names and IP addresses "
            "(the CA alone writes a node's region and device class)"
        )
    _check_hosts(hosts)
    return csr


def _check_hosts(hosts: list[str]) -> None:
    if len(hosts) > MAX_HOSTS:
        raise invalid_csr(f"it asks for {len(hosts)} host names; at most {MAX_HOSTS}")
    for host in hosts:
        if (problem := host_problem(host)) is not None:
            raise invalid_csr(problem)


def _last_update(crl_path: Path | None) -> int:
    """When the CRL at `crl_path` was dated (0 if there is none)."""
    if crl_path is None:
        return 0
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except (OSError, ValueError):
        return 0
    return int(crl.last_update_utc.timestamp())


def _ed25519(key: object) -> Ed25519PublicKey:
    if not isinstance(key, Ed25519PublicKey):
        raise invalid_csr("fleet keys are Ed25519")
    return key


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _create(key_path: Path, cert_path: Path, id_path: Path, now_s: float) -> None:
    key = Ed25519PrivateKey.generate()
    fleet_id = f"fleet-{secrets.token_hex(4)}"
    now = datetime.datetime.fromtimestamp(now_s, datetime.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"Palisade fleet CA {fleet_id}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, fleet_id),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, algorithm=None)
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # The id and certificate first: a half-made CA (no key) is made again from scratch.
    write_private(id_path, fleet_id + "\n")
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    write_private(key_path, pem_key)
