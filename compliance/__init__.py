"""Evidence: the tamper-evident audit log, signed exports and the offline verifier.

Entries are canonical JSON in SQLite, hash-chained and covered by an RFC 6962 Merkle tree
whose checkpoints the node signs with its Ed25519 key. Exports carry entries, proofs,
checkpoints and a signed manifest; `verify_export` checks one with no server or network.
"""

import importlib
from typing import TYPE_CHECKING

from compliance._private.errors import AuditLogError, ComplianceError
from compliance._private.export import (
    FORMAT,
    RESIDENCY_FORMAT,
    Report,
    Scope,
    build_export,
    build_residency,
    sign_document,
    verify_export,
)
from compliance._private.fleet_evidence import (
    FLEET_FORMAT,
    Collected,
    FleetReport,
    build_set,
    nodes_to_collect,
    verify_set,
)
from compliance._private.log import AuditLog, Checkpoint, canonical, read_checkpoints, read_entries
from compliance._private.recorder import Recorder

__all__ = [
    "FLEET_FORMAT",
    "FORMAT",
    "RESIDENCY_FORMAT",
    "VOUCHED_CONTENT_PATH",
    "VOUCHED_EXPORT_PATH",
    "AuditLog",
    "AuditLogError",
    "Checkpoint",
    "Collected",
    "ComplianceError",
    "FleetReport",
    "Recorder",
    "Report",
    "Scope",
    "audit_cli",
    "audit_routes",
    "build_export",
    "build_residency",
    "build_set",
    "canonical",
    "nodes_to_collect",
    "read_checkpoints",
    "read_entries",
    "sign_document",
    "verify_export",
    "verify_set",
    "vouched_content_routes",
    "vouched_export_routes",
]

if TYPE_CHECKING:
    from compliance._private.cli import audit_cli
    from compliance._private.routes import (
        VOUCHED_CONTENT_PATH,
        VOUCHED_EXPORT_PATH,
        audit_routes,
        vouched_content_routes,
        vouched_export_routes,
    )

# Loaded on first use: the CLI pulls in typer and httpx, the routes Litestar, which the
# audit-log writer process and the offline verifier do without.
_LAZY = {
    "audit_cli": "compliance._private.cli",
    "audit_routes": "compliance._private.routes",
    "vouched_content_routes": "compliance._private.routes",
    "VOUCHED_CONTENT_PATH": "compliance._private.routes",
    "VOUCHED_EXPORT_PATH": "compliance._private.routes",
    "vouched_export_routes": "compliance._private.routes",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compliance' has no attribute {name!r}")
