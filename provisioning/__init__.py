"""Node bring-up: first boot, identity, enrollment, pinned node config.

Empty until the provisioning issue lands; the package exists so the layout and import rules of
docs/architecture.md hold from the first commit.
"""

__all__: list[str] = []
