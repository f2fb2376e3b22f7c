"""The compliance package's exception tree.

federation.PalisadeError
└── ComplianceError
    ├── AuditLogError          the log cannot be opened or written (names the file and why)
    └── VerificationError      an export failed verification (names the first bad item)
"""

from __future__ import annotations

from federation import PalisadeError


class ComplianceError(PalisadeError):
    """Root of every error the compliance package raises on purpose."""


class AuditLogError(ComplianceError):
    """The audit log cannot be opened or written."""
