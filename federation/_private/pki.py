"""Fleet x509: who a certificate says its holder is, certificate requests, TLS contexts.

Every node and router proves its identity with a certificate from the fleet CA (the
router's `fleet/ca.pem`). The key is the process's Ed25519 `node.key`. The certificate
says everything the fleet trusts about the holder: CN = node (or router) id, O = fleet id,
OU = role in the subject, and for a node its region and device class as URI subject
alternative names, `urn:palisade:region:<region>` and `urn:palisade:device-class:<class>`
(standard name types every X.509 stack parses, Go's included). The CA sets all of it; a
certificate request contributes only its public key and the host names it asks for.

Revocation is a CRL signed by the CA. A context that checks client certificates always
has a CRL loaded (an empty one at first): with `VERIFY_CRL_CHECK_LEAF` and no CRL every
handshake fails. A newer CRL (higher CRLNumber, later last_update) loaded into a live
context is honoured from the next handshake on, see `reload_crl`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID, ObjectIdentifier

from federation._private.identity import NodeIdentity
from federation._private.vocabulary import (
    CERTIFICATE_ROLES,
    DEVICE_CLASSES,
    CertificateRole,
    FleetRole,
)

StrPath = str | os.PathLike[str]

DNS_SUFFIX = "palisade.internal"
URN_PREFIX = "urn:palisade:"
REGION_URN = URN_PREFIX + "region:"
DEVICE_CLASS_URN = URN_PREFIX + "device-class:"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # fleet_wire.Name: node ids and regions

# LEGACY, read only: certificates issued before the URNs carried region and device class
# as subject attributes under these OIDs (UUID arc 2.25), which Go's x509 cannot parse.
# Nothing issues them any more; a node renews to the URNs when a third of its 30 days is
# left. Remove these two and `_legacy_attributes` once every router has run with the URNs
# for 30 days (no certificate with the OIDs can still be valid then).
_LEGACY_REGION_OID = ObjectIdentifier("2.25.310613956484810803564186195976021482477")
_LEGACY_DEVICE_CLASS_OID = ObjectIdentifier("2.25.288518122563068208789969010568663243962")


@dataclass(frozen=True)
class PeerIdentity:
    """What a fleet certificate vouches for; `device_class` None means "any"."""

    node_id: str
    role: CertificateRole
    fleet_id: str
    region: str | None
    device_class: str | None
    serial: int
    fingerprint: str
    not_after: float


def load_pem_certificate(pem: bytes) -> x509.Certificate:
    """Parse one PEM certificate; ValueError if it is not one."""
    return x509.load_pem_x509_certificate(pem)


def fingerprint(cert: x509.Certificate) -> str:
    """`sha256:<hex>` of the certificate's DER: how operators pin the CA."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def node_dns_name(node_id: str) -> str:
    return f"{node_id}.node.{DNS_SUFFIX}"


def router_dns_name(router_id: str) -> str:
    return f"{router_id}.router.{DNS_SUFFIX}"


def dns_name(role: FleetRole, holder_id: str) -> str:
    return node_dns_name(holder_id) if role == "node" else router_dns_name(holder_id)


def identity_of(cert: x509.Certificate) -> PeerIdentity:
    """The fleet identity a certificate names. Does not check who signed it: TLS did, or
    the caller must. ValueError, saying why, if it is not a fleet certificate: no fleet
    subject, a node without exactly one valid region, a router or monitor with one, a
    region or device class named twice or in two places, an unknown `urn:palisade:` name."""
    subject = cert.subject
    holder = _attribute(subject, NameOID.COMMON_NAME)
    fleet_id = _attribute(subject, NameOID.ORGANIZATION_NAME)
    role = _attribute(subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if holder is None or fleet_id is None or role not in CERTIFICATE_ROLES:
        raise ValueError(f"certificate subject {subject.rfc4514_string()} is not a fleet subject")
    region, device_class = _fleet_attributes(cert)
    if (region is None) == (role == "node"):
        raise ValueError(
            f"a {role} certificate "
            + ("must name one region" if role == "node" else "names no region")
        )
    return PeerIdentity(
        node_id=holder,
        role=_certificate_role(role),
        fleet_id=fleet_id,
        region=region,
        device_class=device_class,
        serial=cert.serial_number,
        fingerprint=fingerprint(cert),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def _certificate_role(role: str) -> CertificateRole:
    for known in CERTIFICATE_ROLES:
        if role == known:
            return known
    raise ValueError(f"`{role}` is not a fleet certificate role")


def fleet_subject(holder_id: str, fleet_id: str, role: CertificateRole) -> x509.Name:
    """The subject `identity_of` reads back: what the CA writes into every certificate."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, holder_id),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, fleet_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )


def fleet_uris(region: str | None, device_class: str | None) -> list[x509.GeneralName]:
    """The URI names a node certificate carries for its region and device class; ValueError
    for a value `identity_of` would refuse to read back."""
    names: list[x509.GeneralName] = []
    if region is not None:
        names.append(x509.UniformResourceIdentifier(REGION_URN + _region(region)))
    if device_class is not None:
        names.append(x509.UniformResourceIdentifier(DEVICE_CLASS_URN + _device(device_class)))
    return names


def _region(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"`{value}` is not a region name (lower-case letters, digits, . _ -)")
    return value


def _device(value: str) -> str:
    if value not in DEVICE_CLASSES:
        raise ValueError(f"`{value}` is not a device class ({', '.join(DEVICE_CLASSES)})")
    return value


def _fleet_attributes(cert: x509.Certificate) -> tuple[str | None, str | None]:
    """Region and device class: from the URNs, or from a legacy certificate's OIDs, never
    from both."""
    regions: list[str] = []
    devices: list[str] = []
    for uri in _san(cert).get_values_for_type(x509.UniformResourceIdentifier):
        if uri.lower().startswith(REGION_URN):
            regions.append(_region(uri[len(REGION_URN) :]))
        elif uri.lower().startswith(DEVICE_CLASS_URN):
            devices.append(_device(uri[len(DEVICE_CLASS_URN) :]))
        elif uri.lower().startswith(URN_PREFIX):
            raise ValueError(f"`{uri}` is not a fleet name this version knows")
    legacy_regions, legacy_devices = _legacy_attributes(cert.subject)
    if (regions or devices) and (legacy_regions or legacy_devices):
        raise ValueError("the region or device class is named both as a URI and as an OID")
    return _one("region", regions or legacy_regions), _one(
        "device class", devices or legacy_devices
    )


def _legacy_attributes(subject: x509.Name) -> tuple[list[str], list[str]]:
    """LEGACY, read only (see `_LEGACY_REGION_OID`)."""
    return (
        [_region(_text(a.value)) for a in subject.get_attributes_for_oid(_LEGACY_REGION_OID)],
        [_device(_text(a.value)) for a in subject.get_attributes_for_oid(_LEGACY_DEVICE_CLASS_OID)],
    )


def _one(what: str, values: list[str]) -> str | None:
    if len(values) > 1:
        raise ValueError(f"the certificate names {len(values)} values for its {what}")
    return values[0] if values else None


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return x509.SubjectAlternativeName([])


def _attribute(name: x509.Name, oid: ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    if len(values) > 1:
        raise ValueError(f"the certificate subject names {oid.dotted_string} twice")
    return _text(values[0].value) if values else None


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8")


_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def host_problem(host: str) -> str | None:
    """Why `host` cannot be a name a node asks for in its certificate, or None if it can:
    an IP address or a DNS name, not a wildcard, not under the fleet's own `palisade.internal`
    names (those are the CA's to give: `<router>.router.palisade.internal` would let a node
    pass for the router)."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return None
    name = host.lower().rstrip(".")
    if name == DNS_SUFFIX or name.endswith("." + DNS_SUFFIX):
        return f"`{host}` is a fleet name only the CA assigns"
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        return f"`{host}` is neither an IP address nor a DNS name (no wildcards)"
    return None


def general_names(hosts: list[str]) -> list[x509.GeneralName]:
    """SAN entries for host names and IP addresses (an IP literal becomes an IPAddress)."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def requested_hosts(csr: x509.CertificateSigningRequest) -> list[str]:
    """The DNS names and IP addresses a certificate request asks for, in order."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    hosts: list[str] = list(san.get_values_for_type(x509.DNSName))
    hosts += [str(address) for address in san.get_values_for_type(x509.IPAddress)]
    return hosts


def requested_other_names(csr: x509.CertificateSigningRequest) -> list[str]:
    """What a certificate request asks for beyond DNS names and IP addresses (URIs such as
    `urn:palisade:region:…`, e-mail addresses, …): the CA refuses a request that does."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    hosts = (x509.DNSName, x509.IPAddress)
    return [f"`{str(name.value)[:100]}`" for name in san if not isinstance(name, hosts)]


def make_csr(identity: NodeIdentity, node_id: str, hosts: list[str]) -> bytes:
    """A PEM certificate request for the node's own key, asking for `hosts` as SANs."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(general_names(hosts)), critical=False
        )
    csr = builder.sign(identity.private_key, algorithm=None)
    return csr.public_bytes(serialization.Encoding.PEM)


def raw_public_key(holder: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    """The holder's Ed25519 public key as 32 raw bytes; ValueError for any other key type."""
    key = holder.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"the key is {type(key).__name__}; fleet keys are Ed25519")  # noqa: TRY004
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def server_context(
    cert_path: StrPath,
    key_path: StrPath,
    ca_path: StrPath | None,
    crl_path: StrPath | None,
    *,
    client_certs: bool,
) -> ssl.SSLContext:
    """TLS 1.3 server context presenting `cert_path`. With `client_certs`, clients may
    present a certificate (routes that need one check `peer_identity`); a presented one
    must chain to the CA and not be revoked, or the handshake fails."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(os.fspath(cert_path), os.fspath(key_path))
    if client_certs:
        if ca_path is None or crl_path is None:
            raise ValueError("checking client certificates needs the fleet CA and a CRL")
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=os.fspath(ca_path))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        reload_crl(ctx, crl_path)
    return ctx


def client_context(
    ca_path: StrPath | None,
    cert_path: StrPath | None = None,
    key_path: StrPath | None = None,
    crl_path: StrPath | None = None,
    *,
    ca_pem: bytes | None = None,
) -> ssl.SSLContext:
    """TLS 1.3 client context trusting only the fleet CA (a file, or `ca_pem` in memory).

    Host names are checked: connect with `server_hostname=node_dns_name(...)` or
    `router_dns_name(...)`. With `cert_path` the client presents its fleet certificate;
    with `crl_path` the server's certificate is checked against the CRL too.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if ca_path is not None:
        ctx.load_verify_locations(cafile=os.fspath(ca_path))
    if ca_pem is not None:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    if cert_path is not None:
        key = os.fspath(key_path) if key_path is not None else None
        ctx.load_cert_chain(os.fspath(cert_path), key)
    if crl_path is not None:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        reload_crl(ctx, crl_path)
    return ctx


def reload_crl(ctx: ssl.SSLContext, crl_path: StrPath) -> None:
    """Add the CRL at `crl_path` to a live context; the next handshake honours it.

    OpenSSL keeps every CRL it was given and uses the newest for an issuer, so the CA
    must issue each CRL with a higher CRLNumber and last_update = now.
    """
    ctx.load_verify_locations(cafile=os.fspath(crl_path))


def crl_serials(crl_path: StrPath) -> frozenset[int]:
    """The serials the CRL at `crl_path` revokes (ValueError if it is not a PEM CRL)."""
    with open(crl_path, "rb") as file:
        crl = x509.load_pem_x509_crl(file.read())
    return frozenset(revoked.serial_number for revoked in crl)
