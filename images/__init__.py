"""Appliance images: build, sign, verify, flash, A/B slots with rollback.

`palisade image build` makes one signed, deterministic bundle per release; `image verify`
checks it offline; `image flash` writes it to the inactive slot of a node's disk; the boot
state's try counter and the on-device agent commit it or fall back to the previous slot;
`palisade fleet update` rolls a bundle out through the router (docs/images.md).
"""

from images._private.build import build_bundle
from images._private.cli import image_cli
from images._private.cli_rollout import register_fleet
from images._private.errors import ImageError
from images._private.keys import ReleaseKey, SigningKey, TrustSet
from images._private.manifest import Manifest, Payload, compare_versions
from images._private.verify import VerifiedBundle, verify_bundle

__all__ = [
    "ImageError",
    "Manifest",
    "Payload",
    "ReleaseKey",
    "SigningKey",
    "TrustSet",
    "VerifiedBundle",
    "build_bundle",
    "compare_versions",
    "image_cli",
    "register_fleet",
    "verify_bundle",
]
