"""Evidence: the tamper-evident audit log, logging modes, signed export and verifier.

Empty until the compliance issue lands; the package exists so the layout and import rules of
DESIGN.md hold from the first commit.
"""

__all__: list[str] = []
