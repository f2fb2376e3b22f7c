"""Appliance images: build, sign, verify, flash, A/B slots with rollback.

`palisade image build` makes one signed, deterministic bundle per release; `image verify`
checks it offline; `image flash` writes it to the inactive slot of a node's disk; the boot
state's try counter and the on-device agent commit it or fall back to the previous slot;
`palisade fleet update` rolls a bundle out through the router (docs/images.md).
"""

from images._private.agent import Health, HealthWindow, NodeImage, Updater
from images._private.boot import (
    Assessment,
    BootDecision,
    active_slot,
    assess,
    install,
    mark_bad,
    mark_good,
    record_booted,
    select_slot,
)
from images._private.bootstate import BootState, SlotRecord
from images._private.build import build_bundle
from images._private.cli import image_cli
from images._private.cli_rollout import register_fleet
from images._private.disk import (
    DiskLayout,
    init_disk,
    read_boot_state,
    update_boot_state,
    write_boot_state,
)
from images._private.errors import ImageError
from images._private.events import ImageEvent, read_events, record_event
from images._private.flash import DiskSizes, FlashResult, flash_bundle, slot_config_path
from images._private.keys import ReleaseKey, SigningKey, TrustSet
from images._private.manifest import Manifest, Payload, compare_versions
from images._private.supervise import SuperviseOptions, Supervisor
from images._private.verify import VerifiedBundle, verify_bundle

__all__ = [
    "Assessment",
    "BootDecision",
    "BootState",
    "DiskLayout",
    "DiskSizes",
    "FlashResult",
    "Health",
    "HealthWindow",
    "ImageError",
    "ImageEvent",
    "Manifest",
    "NodeImage",
    "Payload",
    "ReleaseKey",
    "SigningKey",
    "SlotRecord",
    "SuperviseOptions",
    "Supervisor",
    "TrustSet",
    "Updater",
    "VerifiedBundle",
    "active_slot",
    "assess",
    "build_bundle",
    "compare_versions",
    "flash_bundle",
    "image_cli",
    "init_disk",
    "install",
    "mark_bad",
    "mark_good",
    "read_boot_state",
    "read_events",
    "record_booted",
    "record_event",
    "register_fleet",
    "select_slot",
    "slot_config_path",
    "update_boot_state",
    "verify_bundle",
    "write_boot_state",
]
