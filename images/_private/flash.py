"""`flash_bundle`: write a verified bundle to the inactive slot of a Palisade disk.

Order, each step only after the previous one succeeded:

1. verify the bundle (signature, payload hashes, the disk's hardware class and region, the
   node's minimum version); with `init`, lay the disk out first;
2. under the disk's lock, pick the slot: never the active one, never the committed fallback
   of a slot still on trial; refuse a rootfs larger than the slot;
3. if that slot is marked bootable (a pending install that never booted), cancel it in the
   boot state first, so a half-written slot is never bootable;
4. write the rootfs at the slot's offset (never past its end), fsync, drop it from the page
   cache and read every byte back (SHA-256 must be the manifest's);
5. copy the models and the node config template into the data directory, atomically;
6. switch: one boot state write makes the slot the next boot, on trial.

A flash cut anywhere before step 6 leaves the boot state as it was (or, in the case of step
3, with only the never-booted install cancelled), and the next flash starts over.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from federation import NodeState, PalisadeError, sync_directory
from images._private.boot import active_slot, cancel, install
from images._private.bootstate import (
    MAX_TRIES,
    SLOTS,
    BootState,
    FileDevice,
    Slot,
    load_state,
    other_slot,
    store_state,
)
from images._private.disk import DiskLayout, Partition, init_disk, locked_disk
from images._private.errors import ImageError
from images._private.keys import TrustSet
from images._private.manifest import Payload
from images._private.pause import pause_point
from images._private.verify import VerifiedBundle, verify_bundle

CHUNK = 1 << 20
DEFAULT_TRIES = 3
DEFAULT_SLOT_SIZE = 2048 * 1024 * 1024
SLOT_CONFIG = "appliance.toml"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FlashResult:
    slot: Slot
    version: str
    digest: str  # the rootfs's sha256
    state: BootState  # the boot state written by the switch
    models: tuple[Path, ...]  # model files now in the data directory
    config: Path | None  # the slot's node config


@dataclass(frozen=True)
class DiskSizes:
    """Partition sizes for `init` (bytes); data None: 64 MiB in a new image file, else the
    rest of the device."""

    slot: int = DEFAULT_SLOT_SIZE
    data: int | None = None


def slot_config_path(data_dir: Path, slot: Slot) -> Path:
    """Where a flash puts slot `slot`'s node config: what the node boots that slot with."""
    return data_dir / "image" / "slots" / slot / SLOT_CONFIG


def flash_bundle(
    bundle: Path,
    target: Path,
    *,
    trust: TrustSet,
    data_dir: Path | None = None,
    init: bool = False,
    tries: int = DEFAULT_TRIES,
    progress: Progress | None = None,
    slot: Slot | None = None,
    booted: Slot | None = None,
    compatible: str | None = None,
    region: str | None = None,
    sizes: DiskSizes | None = None,
) -> FlashResult:
    """Flash `bundle` to `target` (a disk image file or a block device); see the module doc.

    `slot` asks for a slot (refused if it is the active one); `booted` is the slot the
    running system booted when the caller knows it (the kernel command line), overriding
    the boot state's BOOTED_SLOT. `compatible`/`region` default to the disk's own (fixed at
    `init`) and the region of the node enrolled in `data_dir`.
    """
    if not 1 <= tries <= MAX_TRIES:
        raise ImageError(f"--tries must be 1 to {MAX_TRIES}.", code="invalid_tries")
    verified = None
    if init:
        verified = _init(
            bundle,
            target,
            trust,
            data_dir=data_dir,
            compatible=compatible,
            region=region,
            sizes=sizes or DiskSizes(),
        )
    with locked_disk(target, timeout=0) as fd:
        layout = DiskLayout.read(target)
        device = FileDevice(fd)
        state = load_state(device, layout.state.start)
        if verified is None:
            verified = verify_bundle(
                bundle, trust, **_node_constraints(state, data_dir, compatible, region)
            )
        chosen = _target_slot(state, requested=slot, booted=booted)
        partition = layout.slot(chosen)
        _check_fits(verified.rootfs, partition, chosen)
        pause_point("start")
        if state.slot(chosen).bootable:
            state = store_state(device, layout.state.start, cancel(state, chosen))
        _write_slot(fd, partition, verified, progress or _no_progress)
        models, config = _copy_data(verified, data_dir, chosen)
        pause_point("data_written")
        rootfs = verified.rootfs
        switched = install(
            state, chosen, version=verified.manifest.version, digest=rootfs.sha256, tries=tries
        )
        written = store_state(device, layout.state.start, switched)
    return FlashResult(
        slot=chosen,
        version=verified.manifest.version,
        digest=rootfs.sha256,
        state=written,
        models=models,
        config=config,
    )


def _no_progress(_done: int, _total: int) -> None:
    return


def _init(
    bundle: Path,
    target: Path,
    trust: TrustSet,
    *,
    data_dir: Path | None,
    compatible: str | None,
    region: str | None,
    sizes: DiskSizes,
) -> VerifiedBundle:
    """Verify, then lay out a new disk whose hardware class and region are the bundle's."""
    if _has_layout(target):
        raise ImageError(
            f"{target} already has a Palisade layout; flash without --init to update it "
            "(--init would lay it out anew and lose both slots and the boot state).",
            code="disk_initialised",
        )
    verified = verify_bundle(
        bundle, trust, **_node_constraints(BootState(), data_dir, compatible, region)
    )
    if verified.rootfs.size > sizes.slot:
        raise _too_large(verified.rootfs, sizes.slot, "the requested slot size")
    manifest = verified.manifest
    empty = BootState(compatible=manifest.compatible, region=manifest.region)
    init_disk(target, slot_size=sizes.slot, data_size=sizes.data, state=empty)
    return verified


def _has_layout(target: Path) -> bool:
    if not target.exists():
        return False
    try:
        DiskLayout.read(target)
    except ImageError:
        return False
    return True


def _node_constraints(
    state: BootState, data_dir: Path | None, compatible: str | None, region: str | None
) -> dict[str, str | None]:
    try:
        node = NodeState.load(data_dir) if data_dir is not None else None
    except PalisadeError as exc:
        raise ImageError(
            f"The node's state in {data_dir} cannot be read: {exc}", code="node_state_invalid"
        ) from None
    return {
        "compatible": compatible or state.compatible or None,
        "region": region or (node.region if node else None) or state.region or None,
        "min_version": state.min_version or None,
    }


def _target_slot(state: BootState, *, requested: Slot | None, booted: Slot | None) -> Slot:
    active = active_slot(state, booted=booted)
    if requested is not None and requested == active:
        raise ImageError(
            f"Slot {active} is the active slot (the one the node runs); a flash writes only "
            "the inactive slot.",
            code="active_slot",
        )
    target = requested or (other_slot(active) if active else _unused_slot(state))
    if active and state.slot(target).ok and not state.slot(active).ok:
        raise ImageError(
            f"Slot {active} runs version {state.slot(active).version or '?'} on trial and slot "
            f"{target} holds the committed fallback; commit the running slot (`palisade image "
            "mark-good`) or let it roll back before flashing again.",
            code="update_in_progress",
        )
    return target


def _unused_slot(state: BootState) -> Slot:
    """A disk that never booted: a slot GRUB would not boot, else the less preferred one."""
    return next((slot for slot in SLOTS if not state.slot(slot).bootable), state.order[1])


def _check_fits(rootfs: Payload, partition: Partition, slot: Slot) -> None:
    if rootfs.size > partition.size:
        raise _too_large(rootfs, partition.size, f"slot {slot}")


def _too_large(rootfs: Payload, room: int, where: str) -> ImageError:
    return ImageError(
        f"The bundle's rootfs is {rootfs.size} bytes; {where} holds {room} bytes.",
        code="bundle_too_large",
    )


def _write_slot(
    fd: int, partition: Partition, verified: VerifiedBundle, progress: Progress
) -> None:
    """Write the rootfs, fsync, read it back from the device; progress covers both passes."""
    rootfs = verified.rootfs
    total, half = 2 * rootfs.size, rootfs.size // 2
    progress(0, total)
    done = 0
    for chunk in _split_at(verified.iter_payload(rootfs.name, CHUNK), half):
        _pwrite_all(fd, chunk, partition.start + done)
        done += len(chunk)
        progress(done, total)
        if done == half:
            pause_point("half")
    os.fsync(fd)
    # Read back from the device, not from the page cache the write just filled.
    os.posix_fadvise(fd, partition.start, rootfs.size, os.POSIX_FADV_DONTNEED)
    digest = hashlib.sha256()
    for chunk in _read_range(fd, partition.start, rootfs.size):
        digest.update(chunk)
        done += len(chunk)
        progress(done, total)
    if digest.hexdigest() != rootfs.sha256:
        raise ImageError(
            f"Reading slot back after the write gave SHA-256 {digest.hexdigest()}, not the "
            f"bundle's {rootfs.sha256}: the device did not store what was written. The boot "
            "state is unchanged.",
            code="readback_mismatch",
        )


def _split_at(chunks: Iterator[bytes], position: int) -> Iterator[bytes]:
    """The same bytes, with a chunk boundary at `position`."""
    seen = 0
    for chunk in chunks:
        cut = position - seen
        if 0 < cut < len(chunk):
            yield chunk[:cut]
            yield chunk[cut:]
        else:
            yield chunk
        seen += len(chunk)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_range(fd: int, offset: int, size: int) -> Iterator[bytes]:
    end = offset + size
    while offset < end:
        chunk = os.pread(fd, min(CHUNK, end - offset), offset)
        if not chunk:
            raise ImageError("The disk ended inside the slot.", code="readback_mismatch")
        offset += len(chunk)
        yield chunk


def _copy_data(
    verified: VerifiedBundle, data_dir: Path | None, slot: Slot
) -> tuple[tuple[Path, ...], Path | None]:
    """The models (skipped when the same bytes are already there) and the slot's config."""
    if data_dir is None:
        return (), None
    models = tuple(_install_model(verified, model, data_dir) for model in verified.models)
    config = verified.config
    if config is None:
        return models, None
    path = slot_config_path(data_dir, slot)
    _replace_atomically(path, verified.iter_payload(config.name))
    return models, path


def _install_model(verified: VerifiedBundle, model: Payload, data_dir: Path) -> Path:
    path = data_dir / (model.path or f"models/{model.name}")
    if not _holds(path, model):
        _replace_atomically(path, verified.iter_payload(model.name))
    return path


def _holds(path: Path, payload: Payload) -> bool:
    try:
        if path.stat().st_size != payload.size:
            return False
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest() == payload.sha256
    except FileNotFoundError:
        return False


def _replace_atomically(path: Path, chunks: Iterator[bytes]) -> None:
    """Write a temporary file beside `path`, fsync it, rename it over `path`, fsync the
    directory: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.flashing")
    try:
        with temporary.open("wb") as file:
            for chunk in chunks:
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    sync_directory(path.parent)
