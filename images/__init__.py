"""Appliance images: build, sign, verify, flash, A/B slots with rollback.

Empty until the images issue lands; the package exists so the layout and import rules of
docs/architecture.md hold from the first commit.
"""

__all__: list[str] = []
