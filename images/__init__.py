"""Appliance images: build, sign, verify, flash, A/B slots with rollback.

`palisade image build` makes one signed, deterministic bundle per release; `image verify`
checks it offline; `image flash` writes it to the inactive slot of a node's disk; the boot
state's try counter and the on-device agent commit it or fall back to the previous slot;
`palisade fleet update` rolls a bundle out through the router (docs/images.md).
"""

from images._private.cli import image_cli
from images._private.cli_rollout import register_fleet
from images._private.errors import ImageError

# --- bundle (build, verify, release keys) ---
# --- disk (layout, boot state, flash) ---
# --- agent (boot assessment, supervise, audit events) ---
# --- rollout ---

__all__ = [
    "ImageError",
    "image_cli",
    "register_fleet",
    # --- bundle ---
    # --- disk ---
    # --- agent ---
    # --- rollout ---
]
