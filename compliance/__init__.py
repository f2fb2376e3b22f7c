"""Evidence: the tamper-evident audit log, signed exports and the offline verifier.

Entries are canonical JSON in SQLite, hash-chained and covered by an RFC 6962 Merkle tree
whose checkpoints the node signs with its Ed25519 key. Exports carry entries, proofs,
checkpoints and a signed manifest; `verify_export` checks one with no server or network.
"""

from compliance._private.errors import AuditLogError, ComplianceError, VerificationError
from compliance._private.export import (
    FORMAT,
    Report,
    Scope,
    build_export,
    sign_document,
    verify_export,
    verify_file,
)
from compliance._private.log import AuditLog, Checkpoint, canonical, read_checkpoints, read_entries

__all__ = [
    "FORMAT",
    "AuditLog",
    "AuditLogError",
    "Checkpoint",
    "ComplianceError",
    "Report",
    "Scope",
    "VerificationError",
    "build_export",
    "canonical",
    "read_checkpoints",
    "read_entries",
    "sign_document",
    "verify_export",
    "verify_file",
]
