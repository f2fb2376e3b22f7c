"""Hand-built x509 objects that no honest library would make, for tests that attack them."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ObjectIdentifier

_ED25519 = bytes.fromhex("300506032b6570")  # AlgorithmIdentifier { id-Ed25519 }


def csr_with_signature(tbs: bytes, signature: bytes) -> str:
    """A PEM CSR made of one request's body and another key's signature:
    SEQUENCE { tbs, AlgorithmIdentifier Ed25519, BIT STRING signature }."""
    bits = b"\x03" + _length(len(signature) + 1) + b"\x00" + signature
    body = tbs + _ED25519 + bits
    der = b"\x30" + _length(len(body)) + body
    lines = base64.encodebytes(der).decode("ascii")
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{lines}-----END CERTIFICATE REQUEST-----\n"


def _length(n: int) -> bytes:
    """A DER length: short form below 128, else the long form."""
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def ca_signed(
    ca_home: Path,
    subject: list[tuple[ObjectIdentifier, str]],
    names: list[x509.GeneralName],
    *,
    public_key: Ed25519PublicKey | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """A certificate the fleet CA under `ca_home` signed with whatever subject and SANs it
    is given: what a CA tricked, or an older release, would issue."""
    key = serialization.load_pem_private_key((ca_home / "fleet" / "ca.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    ca = x509.load_pem_x509_certificate((ca_home / "fleet" / "ca.pem").read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(oid, value) for oid, value in subject]))
        .issuer_name(ca.subject)
        .public_key(public_key or Ed25519PrivateKey.generate().public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, algorithm=None)
