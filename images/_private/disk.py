"""A Palisade disk: its GPT layout (made with `sfdisk`, read back with `sfdisk --json`) and
the boot state on its state partition.

    1 palisade-state   the boot state (two GRUB environment block copies, bootstate.py)
    2 palisade-root-a  root slot A
    3 palisade-root-b  root slot B
    4 palisade-data    persistent data; a flash never touches it

The kernel here may not parse partition tables (no /dev/loopNpM), so nothing uses partition
device nodes: every read and write goes to the whole disk at the partition's byte offset.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec
from msgspec import Struct

from images._private.bootstate import (
    STATE_SPAN,
    BootState,
    FileDevice,
    Slot,
    load_state,
    state_area,
    store_state,
)
from images._private.errors import ImageError

PARTITION_NAMES = ("palisade-state", "palisade-root-a", "palisade-root-b", "palisade-data")
SLOT_PARTITIONS: dict[Slot, str] = {"A": "palisade-root-a", "B": "palisade-root-b"}
MIB = 1024 * 1024
FIRST_LBA_BYTES = MIB  # partitions start 1 MiB aligned
GPT_BACKUP_BYTES = MIB  # room for the backup GPT at the end of a disk image file
DEFAULT_STATE_SIZE = MIB
LOCK_TIMEOUT = 30.0


@dataclass(frozen=True)
class Partition:
    number: int
    name: str
    start: int  # bytes from the start of the disk
    size: int  # bytes

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class DiskLayout:
    """The four partitions of a Palisade disk, as `sfdisk --json` reports them."""

    path: Path
    disk_size: int
    partitions: tuple[Partition, ...]

    @classmethod
    def read(cls, target: Path) -> DiskLayout:
        """The layout of `target`, or ImageError `disk_layout_unexpected`."""
        table = _sfdisk_json(target)
        partitions = tuple(
            Partition(
                number=_partition_number(entry.node),
                name=entry.name,
                start=entry.start * table.sectorsize,
                size=entry.size * table.sectorsize,
            )
            for entry in table.partitions
        )
        layout = cls(path=target, disk_size=_disk_size(target), partitions=partitions)
        layout.check(table.label)
        return layout

    def check(self, label: str) -> None:
        found = [(each.number, each.name) for each in self.partitions]
        wanted = list(enumerate(PARTITION_NAMES, start=1))
        if label != "gpt" or found != wanted:
            raise ImageError(
                f"{self.path} does not have the Palisade layout (GPT with partitions "
                f"{', '.join(PARTITION_NAMES)}); found {label or 'no'} partition table with "
                f"{[name for _, name in found]}. Use --init to lay out a new disk.",
                code="disk_layout_unexpected",
            )
        if self.state.size < STATE_SPAN or any(
            each.end > self.disk_size for each in self.partitions
        ):
            raise ImageError(
                f"{self.path}: a partition is too small or runs past the end of the disk.",
                code="disk_layout_unexpected",
            )

    def partition(self, name: str) -> Partition:
        return next(each for each in self.partitions if each.name == name)

    @property
    def state(self) -> Partition:
        return self.partition("palisade-state")

    @property
    def data(self) -> Partition:
        return self.partition("palisade-data")

    def slot(self, slot: Slot) -> Partition:
        return self.partition(SLOT_PARTITIONS[slot])


class _SfdiskPartition(Struct):
    node: str
    start: int
    size: int
    name: str = ""


class _SfdiskTable(Struct):
    label: str
    sectorsize: int = 512
    partitions: list[_SfdiskPartition] = msgspec.field(default_factory=list)


class _SfdiskOutput(Struct):
    partitiontable: _SfdiskTable


def _sfdisk_json(target: Path) -> _SfdiskTable:
    if not target.exists():
        raise ImageError(f"{target} does not exist.", code="disk_unreadable")
    result = subprocess.run(  # noqa: S603 - fixed argument list
        [_tool("sfdisk"), "--json", str(target)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise ImageError(
            f"{target} has no partition table sfdisk can read: {result.stderr.strip()}",
            code="disk_layout_unexpected",
        )
    try:
        return msgspec.json.decode(result.stdout, type=_SfdiskOutput).partitiontable
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ImageError(
            f"sfdisk --json printed something unexpected for {target}: {exc}",
            code="disk_layout_unexpected",
        ) from None


def _partition_number(node: str) -> int:
    digits = len(node) - len(node.rstrip("0123456789"))
    return int(node[-digits:]) if digits else 0


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise ImageError(
            f"`{name}` is not installed (Debian: `make system-deps`).", code="tool_missing"
        )
    return path


def _disk_size(target: Path) -> int:
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def is_block_device(target: Path) -> bool:
    try:
        return stat.S_ISBLK(target.stat().st_mode)
    except FileNotFoundError:
        return False


def init_disk(
    target: Path,
    *,
    slot_size: int,
    state_size: int = DEFAULT_STATE_SIZE,
    data_size: int | None = None,
    state: BootState | None = None,
) -> DiskLayout:
    """Lay out a new Palisade disk and write its first boot state (default: both slots
    empty).

    A disk image file is created (or grown) to fit; a block device must be large enough.
    `data_size=None` gives the data partition the rest of a block device (64 MiB in a new
    image file). Sizes round up to whole MiB.
    """
    sizes = [_whole_mib(size) for size in (state_size, slot_size, slot_size)]
    if not is_block_device(target):
        wanted = FIRST_LBA_BYTES + sum(sizes) + _whole_mib(data_size or 64 * MIB)
        _grow_file(target, wanted + GPT_BACKUP_BYTES)
    elif data_size is not None:
        sizes.append(_whole_mib(data_size))
    script = "label: gpt\nunit: sectors\nsector-size: 512\nfirst-lba: 2048\n\n"
    script += "".join(
        f'size={size // 512}, name="{name}"\n'
        for size, name in zip(sizes, PARTITION_NAMES, strict=False)
    )
    script += "" if len(sizes) == len(PARTITION_NAMES) else f'name="{PARTITION_NAMES[-1]}"\n'
    _run_sfdisk(target, script)
    layout = DiskLayout.read(target)
    with locked_disk(target) as fd:
        os.pwrite(fd, bytes(layout.state.size), layout.state.start)
        os.pwrite(fd, state_area(), layout.state.start)  # where GRUB finds the copies
        store_state(FileDevice(fd), layout.state.start, state or BootState())
    return layout


def _whole_mib(size: int) -> int:
    if size <= 0:
        raise ImageError("Partition sizes must be positive.", code="invalid_size")
    return -(-size // MIB) * MIB


def _grow_file(target: Path, size: int) -> None:
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if os.lseek(fd, 0, os.SEEK_END) < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _run_sfdisk(target: Path, script: str) -> None:
    command = [_tool("sfdisk"), "--quiet", "--wipe", "always"]
    if not is_block_device(target):
        command += ["--no-reread", "--no-tell-kernel"]
    result = subprocess.run(  # noqa: S603 - fixed argument list
        [*command, str(target)], input=script, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ImageError(
            f"sfdisk could not lay out {target}: {result.stderr.strip()}",
            code="disk_layout_failed",
        )


@contextmanager
def locked_disk(disk: Path, *, timeout: float = LOCK_TIMEOUT) -> Iterator[int]:
    """The disk opened read-write under an exclusive flock (the convention udev and
    systemd honour for block devices); waits up to `timeout`, then `disk_busy`."""
    fd = open_disk(disk, os.O_RDWR)
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                raise ImageError(
                    f"{disk} is in use by another flash or boot-state change.", code="disk_busy"
                )
            time.sleep(0.05)
        yield fd
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def open_disk(disk: Path, flags: int) -> int:
    try:
        return os.open(disk, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(
            f"Cannot open {disk}: {exc.strerror or exc}.", code="disk_unreadable"
        ) from None


def read_boot_state(disk: Path) -> BootState:
    """The boot state of a Palisade disk (image file or block device)."""
    base = DiskLayout.read(disk).state.start
    fd = open_disk(disk, os.O_RDONLY)
    try:
        return load_state(FileDevice(fd), base)
    finally:
        os.close(fd)


def write_boot_state(disk: Path, state: BootState) -> BootState:
    """Replace the boot state whole (under the disk lock), even a corrupt one; returns it
    with the sequence number written."""
    base = DiskLayout.read(disk).state.start
    with locked_disk(disk) as fd:
        return store_state(FileDevice(fd), base, state)


def update_boot_state(disk: Path, change: Callable[[BootState], BootState]) -> BootState:
    """Read, change and write the boot state under the disk lock (read-modify-write)."""
    base = DiskLayout.read(disk).state.start
    with locked_disk(disk) as fd:
        device = FileDevice(fd)
        return store_state(device, base, change(load_state(device, base)))
