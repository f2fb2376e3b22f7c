"""A real `palisade image flash` process SIGKILLed at named points: at 0 %, at 50 %, after
the data and between the two boot state copies. Each time the boot state reads exactly as
before, the active slot is still the one selected and still holds its image, the slot
being written is never shown as bootable, and the next flash (of another version) succeeds.

The process stops itself at the point (`PALISADE_TEST_PAUSE_AT`, SIGSTOP); the test waits
for the stop in /proc/PID/stat and kills it there, so each cut is at a known step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from images._private.boot import mark_good, record_booted, select_slot
from images._private.bootstate import BLOCK_SIZE, COPY_OFFSETS, decode_boot_state
from images._private.disk import DiskLayout, read_boot_state, update_boot_state
from images._private.flash import DiskSizes, flash_bundle
from images._private.keys import TrustSet
from images._private.pause import PAUSE_ENV
from images._private.verify import verify_bundle
from tests.images.bundles import make_bundle
from tests.support import REPO, run_palisade, wait_for

MIB = 1 << 20


def stopped(pid: int) -> bool:
    """Whether the process is stopped (state T), as a SIGSTOP leaves it."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "T"


def start_flash(bundle: Path, disk: Path, trust: Path, data: Path, pause_at: str) -> int:
    process = subprocess.Popen(
        [sys.executable, "-m", "palisade", "image", "flash", str(bundle),
         "--target", str(disk), "--trust", str(trust), "--data", str(data)],
        cwd=REPO,
        env={**os.environ, PAUSE_ENV: pause_at},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: stopped(process.pid) or process.poll() is not None, timeout=60)
        assert process.poll() is None, f"the flash ended before reaching {pause_at}"
    finally:
        process.kill()  # SIGKILL: no handler, no cleanup, like pulling the plug
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    return process.pid


def slot_bytes(disk: Path, slot: str, size: int) -> bytes:
    partition = DiskLayout.read(disk).slot("A" if slot == "A" else "B")
    with disk.open("rb") as file:
        file.seek(partition.start)
        return file.read(size)


def state_copy(disk: Path, offset: int) -> bytes:
    with disk.open("rb") as file:
        file.seek(DiskLayout.read(disk).state.start + offset)
        return file.read(BLOCK_SIZE)


@pytest.fixture
def committed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(disk, trust file, data dir): slot A runs 1.0.0, booted and committed."""
    bundle, trust = make_bundle(tmp_path, version="1.0.0", rootfs_size=2 * MIB)
    disk, data = tmp_path / "disk.img", tmp_path / "data"
    flash_bundle(
        bundle,
        disk,
        trust=TrustSet.load(trust),
        data_dir=data,
        init=True,
        sizes=DiskSizes(slot=4 * MIB),
    )
    decision = select_slot(read_boot_state(disk))
    update_boot_state(disk, lambda _: record_booted(decision.new_state, decision.slot))
    update_boot_state(disk, lambda state: mark_good(state, "A"))
    return disk, trust, data


@pytest.mark.parametrize("pause_at", ["start", "half", "data_written", "state_write"])
def test_a_flash_killed_at_any_point_leaves_the_node_as_it_was(
    tmp_path: Path, committed: tuple[Path, Path, Path], pause_at: str
) -> None:
    disk, trust_file, data = committed
    trust = TrustSet.load(trust_file)
    before = read_boot_state(disk)
    active_image = slot_bytes(disk, "A", 4 * MIB)
    update, _ = make_bundle(tmp_path, version="1.1.0", rootfs_size=2 * MIB)
    rootfs = verify_bundle(update, trust).rootfs

    start_flash(update, disk, trust_file, data, pause_at)

    after = read_boot_state(disk)
    assert after == before  # exactly: same variables, same sequence number
    assert select_slot(after).slot == "A"
    assert slot_bytes(disk, "A", 4 * MIB) == active_image
    status = run_palisade("image", "status", "--disk", str(disk), "--json")
    report = json.loads(status.stdout)
    assert report["next_boot"] == {"slot": "A", "trial": False}
    assert report["slots"]["B"]["bootable"] is False
    written = slot_bytes(disk, "B", rootfs.size)
    expected = b"".join(verify_bundle(update, trust).iter_payload(rootfs.name))
    if pause_at == "start":
        assert written == bytes(rootfs.size)  # not a byte of the slot written yet
    if pause_at == "half":
        half = rootfs.size // 2
        assert written[:half] == expected[:half]
        assert written[half:] == bytes(rootfs.size - half)
    if pause_at in {"data_written", "state_write"}:
        assert written == expected  # the data was all there: only the switch was missing
    if pause_at == "state_write":
        # Cut between the copies: copy 1 already holds the switch, copy 0 does not.
        copy_1 = decode_boot_state(state_copy(disk, COPY_OFFSETS[1]))
        assert copy_1 is not None
        assert (copy_1.b.version, copy_1.order) == ("1.1.0", ("B", "A"))
        assert decode_boot_state(state_copy(disk, COPY_OFFSETS[0])) == before

    # "current + partial" is not a dead end: the next flash, of another version, succeeds.
    other, _ = make_bundle(tmp_path, version="1.2.0", rootfs_size=2 * MIB)
    result = flash_bundle(other, disk, trust=trust, data_dir=data)
    assert result.slot == "B"
    state = read_boot_state(disk)
    assert (state.b.version, state.b.status, state.b.tries) == ("1.2.0", "trial", 3)
    assert state.a == before.a
    assert select_slot(state).slot == "B"


def test_a_pending_install_overwritten_and_cut_is_never_bootable(
    tmp_path: Path, committed: tuple[Path, Path, Path]
) -> None:
    """B holds a flashed, never booted 1.1.0 (bootable on trial). A flash of 1.2.0 over it,
    cut at 50 %, leaves B cancelled: not bootable, the active slot first."""
    disk, trust_file, data = committed
    trust = TrustSet.load(trust_file)
    pending, _ = make_bundle(tmp_path, version="1.1.0", rootfs_size=2 * MIB)
    flash_bundle(pending, disk, trust=trust, data_dir=data)
    assert read_boot_state(disk).b.bootable
    update, _ = make_bundle(tmp_path, version="1.2.0", rootfs_size=2 * MIB)

    start_flash(update, disk, trust_file, data, "half")

    state = read_boot_state(disk)
    assert not state.b.bootable
    assert state.b.status == "empty"
    assert state.order == ("A", "B")
    assert select_slot(state).slot == "A"
    assert flash_bundle(update, disk, trust=trust, data_dir=data).version == "1.2.0"
