"""Hand-built x509 objects that no honest library would make, for tests that attack them."""

from __future__ import annotations

import base64

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
