"""`flash_bundle` and `palisade image flash|status`: only the inactive slot is written, every
byte is read back, every refusal leaves the disk and the data directory as they were."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from federation import NodeState
from images._private.boot import mark_bad, mark_good, record_booted, select_slot
from images._private.bootstate import STATE_SPAN, BootState
from images._private.disk import DiskLayout, read_boot_state, update_boot_state
from images._private.errors import ImageError
from images._private.flash import DiskSizes, FlashResult, flash_bundle, slot_config_path
from images._private.keys import TrustSet
from images._private.verify import verify_bundle
from tests.images.bundles import MODEL_FILE, REGION, make_bundle
from tests.support import run_palisade

MIB = 1 << 20
SLOT = 4 * MIB


@dataclass
class Node:
    """A disk image plus data directory whose slot A runs 1.0.0, booted and committed."""

    tmp: Path
    disk: Path
    data: Path
    trust: TrustSet
    trust_file: Path

    def flash(self, bundle: Path, **options: object) -> FlashResult:
        return flash_bundle(bundle, self.disk, trust=self.trust, data_dir=self.data, **options)  # type: ignore[arg-type]

    def bundle(self, version: str, **options: object) -> Path:
        return make_bundle(self.tmp, version=version, **options)[0]  # type: ignore[arg-type]

    def boot(self) -> str:
        decision = select_slot(read_boot_state(self.disk))
        update_boot_state(self.disk, lambda _: record_booted(decision.new_state, decision.slot))
        return decision.slot

    def commit(self, slot: str = "A") -> None:
        assert slot in {"A", "B"}
        update_boot_state(self.disk, lambda state: mark_good(state, "A" if slot == "A" else "B"))


@pytest.fixture
def node(tmp_path: Path) -> Node:
    bundle, trust_file = make_bundle(tmp_path, version="1.0.0")
    disk, data = tmp_path / "disk.img", tmp_path / "data"
    trust = TrustSet.load(trust_file)
    flash_bundle(bundle, disk, trust=trust, data_dir=data, init=True, sizes=DiskSizes(slot=SLOT))
    made = Node(tmp=tmp_path, disk=disk, data=data, trust=trust, trust_file=trust_file)
    assert made.boot() == "A"
    made.commit("A")
    return made


def digest_outside(disk: Path, *ranges: tuple[int, int]) -> str:
    """SHA-256 of the whole disk with the byte ranges [start, end) left out."""
    data = bytearray(disk.read_bytes())
    for start, end in sorted(ranges, reverse=True):
        del data[start:end]
    return hashlib.sha256(data).hexdigest()


def snapshot(node: Node) -> tuple[str, dict[str, bytes]]:
    """Everything a refused flash must leave alone: the disk and the data directory."""
    files = {
        str(path.relative_to(node.data)): path.read_bytes()
        for path in sorted(node.data.rglob("*"))
        if path.is_file()
    }
    return hashlib.sha256(node.disk.read_bytes()).hexdigest(), files


def test_a_flash_writes_only_the_rootfs_range_of_the_inactive_slot(node: Node) -> None:
    bundle = node.bundle("1.1.0")
    rootfs = verify_bundle(bundle, node.trust).rootfs
    layout = DiskLayout.read(node.disk)
    written = (layout.slot("B").start, layout.slot("B").start + rootfs.size)
    boot_state = (layout.state.start, layout.state.start + STATE_SPAN)
    outside_before = digest_outside(node.disk, written, boot_state)
    table_before = _sfdisk_table(node.disk)
    steps: list[tuple[int, int]] = []

    result = node.flash(bundle, progress=lambda done, total: steps.append((done, total)))

    assert result.slot == "B"
    assert digest_outside(node.disk, written, boot_state) == outside_before
    with node.disk.open("rb") as file:
        file.seek(written[0])
        assert hashlib.sha256(file.read(rootfs.size)).hexdigest() == rootfs.sha256
    assert _sfdisk_table(node.disk) == table_before
    totals = {total for _, total in steps}
    done = [each for each, _ in steps]
    assert len(totals) == 1
    assert done == sorted(set(done))  # only rises, no repeats
    assert done[0] == 0
    assert done[-1] == totals.pop()
    state = read_boot_state(node.disk)
    assert state.order == ("B", "A")
    assert (state.b.status, state.b.version, state.b.tries, state.b.ok) == (
        "trial",
        "1.1.0",
        3,
        False,
    )
    assert state.b.digest == rootfs.sha256
    assert state.a.ok
    assert select_slot(state).slot == "B"


def _sfdisk_table(disk: Path) -> dict[str, object]:
    result = subprocess.run(
        ["sfdisk", "--json", str(disk)], capture_output=True, text=True, check=True
    )
    table = json.loads(result.stdout)["partitiontable"]
    assert isinstance(table, dict)
    assert table["label"] == "gpt"
    verify = subprocess.run(
        ["sfdisk", "--verify", str(disk)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    return table


def test_the_models_and_the_slot_config_land_in_the_data_directory(node: Node) -> None:
    result = node.flash(node.bundle("1.1.0"))
    assert result.models == (node.data / "models" / MODEL_FILE,)
    assert result.config == slot_config_path(node.data, "B")
    assert result.config.read_text() == f'region = "{REGION}"\n'
    assert slot_config_path(node.data, "A").read_text() == f'region = "{REGION}"\n'
    assert not list(node.data.rglob(".*.flashing"))


def refusal(node: Node, run: Callable[[], object], code: str) -> None:
    before = snapshot(node)
    with pytest.raises(ImageError) as caught:
        run()
    assert caught.value.code == code
    assert snapshot(node) == before


def test_the_active_slot_is_refused(node: Node) -> None:
    bundle = node.bundle("1.1.0")
    refusal(node, lambda: node.flash(bundle, slot="A"), "active_slot")
    assert node.flash(bundle, slot="B").slot == "B"


def test_a_rootfs_larger_than_the_slot_is_refused(node: Node) -> None:
    bundle = node.bundle("1.1.0", rootfs_size=SLOT + MIB)
    refusal(node, lambda: node.flash(bundle), "bundle_too_large")


def test_a_disk_without_the_layout_is_refused(node: Node) -> None:
    bundle = node.bundle("1.1.0")
    blank = node.tmp / "blank.img"
    blank.write_bytes(bytes(16 * MIB))
    with pytest.raises(ImageError) as caught:
        flash_bundle(bundle, blank, trust=node.trust)
    assert caught.value.code == "disk_layout_unexpected"
    assert blank.read_bytes() == bytes(16 * MIB)


def test_init_refuses_a_disk_that_already_has_the_layout(node: Node) -> None:
    bundle = node.bundle("1.1.0")
    refusal(
        node,
        lambda: node.flash(bundle, init=True, sizes=DiskSizes(slot=SLOT)),
        "disk_initialised",
    )


def test_a_bundle_that_fails_verification_writes_nothing(node: Node) -> None:
    bundle = node.bundle("1.1.0")
    data = bytearray(bundle.read_bytes())
    data[-10] ^= 0x01  # a byte of the last payload
    bundle.write_bytes(bytes(data))
    refusal(node, lambda: node.flash(bundle), "payload_hash_mismatch")
    refusal(node, lambda: node.flash(node.bundle("1.1.0"), region="us-east"), "wrong_region")


def test_a_device_that_does_not_store_what_was_written_is_caught_by_the_read_back(
    node: Node,
) -> None:
    bundle = node.bundle("1.1.0")
    slot_b = DiskLayout.read(node.disk).slot("B")
    state_before = read_boot_state(node.disk)

    def corrupt_once_written(done: int, total: int) -> None:
        if done == total // 2:  # the write pass is over, the read-back not begun
            with node.disk.open("r+b") as file:
                file.seek(slot_b.start + 12345)
                byte = file.read(1)
                file.seek(slot_b.start + 12345)
                file.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(ImageError) as caught:
        node.flash(bundle, progress=corrupt_once_written)
    assert caught.value.code == "readback_mismatch"
    assert read_boot_state(node.disk) == state_before
    assert node.flash(bundle).slot == "B"  # the next flash succeeds


def test_below_the_minimum_is_refused_but_rollback_stays_possible_during_a_trial(
    node: Node,
) -> None:
    node.flash(node.bundle("2.0.0"))
    assert node.boot() == "B"
    node.commit("B")
    assert read_boot_state(node.disk).min_version == "2.0.0"
    old = node.bundle("1.5.0")
    refusal(node, lambda: node.flash(old), "version_below_minimum")
    # 3.0.0 on trial in A; B (2.0.0) stays the committed fallback and min stays 2.0.0.
    node.flash(node.bundle("3.0.0"))
    assert node.boot() == "A"
    state = read_boot_state(node.disk)
    assert state.min_version == "2.0.0"
    update_boot_state(node.disk, lambda current: mark_bad(current, "A"))
    assert node.boot() == "B"
    assert read_boot_state(node.disk).b.version == "2.0.0"


def test_the_committed_fallback_of_a_slot_on_trial_is_not_overwritten(node: Node) -> None:
    node.flash(node.bundle("1.1.0"))
    assert node.boot() == "B"  # on trial; A holds the committed 1.0.0
    refusal(node, lambda: node.flash(node.bundle("1.2.0")), "update_in_progress")


def test_a_pending_install_is_cancelled_before_its_slot_is_overwritten(node: Node) -> None:
    """Flashing over a never-booted install: the slot is not bootable while it is written."""
    node.flash(node.bundle("1.1.0"))
    seen: list[BootState] = []
    result = node.flash(
        node.bundle("1.2.0"), progress=lambda *_: seen.append(read_boot_state(node.disk))
    )
    assert result.slot == "B"
    assert all(not state.b.bootable and state.order == ("A", "B") for state in seen)
    assert read_boot_state(node.disk).b.version == "1.2.0"


def test_the_cli_flashes_with_progress_lines_and_shows_the_status(tmp_path: Path) -> None:
    bundle, trust = make_bundle(tmp_path, version="1.0.0")
    disk = tmp_path / "disk.img"
    flashed = run_palisade(
        "image", "flash", str(bundle), "--target", str(disk), "--init", "--trust", str(trust),
        "--slot-size", "4M", "--data", str(tmp_path / "data"),
    )  # fmt: skip
    assert flashed.returncode == 0, flashed.stderr
    assert "into slot A" in flashed.stdout
    percents = [
        int(line.split("%")[0].split()[-1])
        for line in flashed.stderr.splitlines()
        if line.startswith("flash:")
    ]
    assert percents == sorted(set(percents))
    assert percents[-1] == 100
    events = (tmp_path / "data" / "image" / "events.jsonl").read_text().splitlines()
    assert json.loads(events[-1])["event"] == "image.install"

    status = run_palisade("image", "status", "--disk", str(disk), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["slots"]["A"]["version"] == "1.0.0"
    assert report["slots"]["A"]["bootable"] is True
    assert report["slots"]["B"]["bootable"] is False
    assert report["next_boot"] == {"slot": "A", "trial": True}
    text = run_palisade("image", "status", "--disk", str(disk))
    assert "1.0.0" in text.stdout
    assert "trial, 3 left" in text.stdout

    again = run_palisade(
        "image", "flash", str(bundle), "--target", str(disk), "--init", "--trust", str(trust)
    )
    assert again.returncode == 1
    assert again.stderr.strip().endswith("(disk_initialised)")
    assert again.stderr.startswith("error: ")


def _can_use_loop_devices() -> bool:
    return (
        os.geteuid() == 0
        and shutil.which("losetup") is not None
        and Path("/dev/loop-control").exists()
    )


@pytest.mark.skipif(not _can_use_loop_devices(), reason="needs root and loop devices")
def test_a_block_device_is_laid_out_and_flashed(tmp_path: Path) -> None:
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"")
    os.truncate(backing, 32 * MIB)
    attach = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if attach.returncode != 0:
        pytest.skip(f"losetup failed: {attach.stderr.strip()}")
    device = Path(attach.stdout.strip())
    try:
        bundle, trust = make_bundle(tmp_path, version="1.0.0")
        result = flash_bundle(
            bundle, device, trust=TrustSet.load(trust), init=True, sizes=DiskSizes(slot=SLOT)
        )
        layout = DiskLayout.read(device)
        assert layout.data.end <= 32 * MIB
        assert layout.data.size > 16 * MIB  # the rest of the device
        assert read_boot_state(device).a.digest == result.digest
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=True)
    assert DiskLayout.read(backing).slot("A").size == SLOT


def test_the_enrolled_nodes_region_is_the_one_checked(node: Node) -> None:
    NodeState(node_id="edge-1", region="us-east").save(node.data)
    refusal(node, lambda: node.flash(node.bundle("1.1.0")), "wrong_region")
