"""The boot state block: GRUB's environment block format, stored twice, crash-safe writes.

The fault-injecting device keeps what was written since the last fsync apart from what is
durable; at a power cut each of those pending writes keeps any subset of its 512-byte
sectors (dropped, torn or whole). Whatever the cut, the state reads as exactly the state
before the write or exactly the state after it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import structs

from images._private.boot import install, select_slot
from images._private.bootstate import (
    BLOCK_SIZE,
    COPY_OFFSETS,
    HEADER,
    SECTOR,
    SLOT_STATUSES,
    STATE_SPAN,
    BootState,
    SlotRecord,
    _highest_seq,
    decode_boot_state,
    encode_boot_state,
    load_state,
    store_state,
)
from images._private.disk import DiskLayout, init_disk, read_boot_state, write_boot_state
from images._private.errors import ImageError
from tests.support import run_palisade

DIGEST = "ab" * 32
FULL = BootState(
    order=("B", "A"),
    a=SlotRecord(ok=True, status="good", version="1.0.0", digest="12" * 32),
    b=SlotRecord(tries=3, status="trial", version="1.1.0-rc.1+build.7", digest=DIGEST),
    min_version="1.0.0",
    booted_slot="A",
    compatible="x86_64-pc",
    region="eu-west",
)


class PowerCutError(Exception):
    pass


class FaultyDevice:
    """A StateDevice over bytes that loses power at its `cut_at`-th pwrite or fsync."""

    def __init__(self, durable: bytes, cut_at: int | None = None) -> None:
        self.durable = bytearray(durable)
        self.pending: list[tuple[int, bytes]] = []
        self.cut_at = cut_at
        self.operations = 0

    def pread(self, size: int, offset: int) -> bytes:
        view = bytearray(self.durable)
        for where, data in self.pending:
            view[where : where + len(data)] = data
        return bytes(view[offset : offset + size])

    def pwrite(self, data: bytes, offset: int) -> None:
        self.pending.append((offset, bytes(data)))  # in flight when the power goes
        self._tick()

    def fsync(self) -> None:
        self._tick()
        for where, data in self.pending:
            self.durable[where : where + len(data)] = data
        self.pending.clear()

    def _tick(self) -> None:
        if self.operations == self.cut_at:
            raise PowerCutError
        self.operations += 1

    def sectors_pending(self) -> int:
        return sum(len(data) // SECTOR for _, data in self.pending)

    def power_cut(self, survives: list[bool]) -> None:
        """Each pending sector reaches the medium or not, as `survives` says."""
        fates = iter(survives)
        for where, data in self.pending:
            for start in range(0, len(data), SECTOR):
                if next(fates, False):
                    self.durable[where + start : where + start + SECTOR] = data[
                        start : start + SECTOR
                    ]
        self.pending.clear()


versions = st.sampled_from(["", "1.0.0", "1.2.3-rc.1", "2.0.0+build.5", "10.20.30"])
records = st.builds(
    SlotRecord,
    ok=st.booleans(),
    tries=st.integers(0, 9),
    status=st.sampled_from(SLOT_STATUSES),
    version=versions,
    digest=st.sampled_from(["", DIGEST, "cd" * 32]),
)
states = st.builds(
    BootState,
    order=st.sampled_from([("A", "B"), ("B", "A")]),
    a=records,
    b=records,
    min_version=versions,
    booted_slot=st.sampled_from([None, "A", "B"]),
)
# A step: a userspace write of a state (None: GRUB booting, saving one TRY digit in place in
# the copy it loaded), cut at its n-th pwrite/fsync (4: not cut), sectors that survive a cut.
steps = st.tuples(
    st.one_of(st.none(), states), st.integers(0, 4), st.lists(st.booleans(), min_size=4, max_size=4)
)


@settings(max_examples=300, deadline=None)
@given(first=states, chain=st.lists(steps, min_size=1, max_size=6))
def test_a_cut_write_reads_as_exactly_before_or_exactly_after(
    first: BootState, chain: list[tuple[BootState | None, int, list[bool]]]
) -> None:
    device = FaultyDevice(bytes(STATE_SPAN))
    store_state(device, 0, first)
    for new, cut_at, survives in chain:
        before = load_state(device, 0)
        next_seq = _highest_seq(device, 0) + 1
        device.operations, device.cut_at = 0, cut_at
        try:
            after = store_state(device, 0, new) if new else grub_boot(device)
        except PowerCutError:
            device.power_cut(survives)
            after = structs.replace(new, seq=next_seq) if new else select_slot(before).new_state
        now = load_state(device, 0)
        assert now in (before, after)
        assert now.seq >= before.seq
    # And whatever the cuts left, the next uninterrupted write reads back whole.
    device.cut_at = None
    written = store_state(device, 0, FULL)
    assert load_state(device, 0) == written
    assert written.same_content(FULL)


def grub_boot(device: FaultyDevice) -> BootState:
    """What grub.cfg does: load copy 0, else copy 1; if it boots a slot on trial, save the
    decremented TRY into the copy it loaded (same seq: GRUB rewrites one digit in place)."""
    for offset in COPY_OFFSETS:
        loaded = decode_boot_state(device.pread(BLOCK_SIZE, offset))
        if loaded is not None:
            break
    else:
        raise AssertionError("no whole copy")
    decision = select_slot(loaded)
    if decision.new_state != loaded:
        block = encode_boot_state(decision.new_state)
        old = device.pread(BLOCK_SIZE, offset)
        assert sum(a != b for a, b in zip(block, old, strict=True)) == 1
        device.pwrite(block, offset)
        device.fsync()
    return decision.new_state


def test_every_cut_point_of_one_write_is_covered() -> None:
    """The property test's cut points are real: a write is 2 pwrites and 2 fsyncs, and
    cutting after the first fsync with nothing of copy 0 surviving still reads as after."""
    device = FaultyDevice(bytes(STATE_SPAN))
    store_state(device, 0, BootState())
    before = load_state(device, 0)
    device.operations, device.cut_at = 0, 2  # copy 1 durable, copy 0 in flight
    with pytest.raises(PowerCutError):
        store_state(device, 0, FULL)
    assert device.sectors_pending() == 2
    device.power_cut([True, False])  # copy 0 torn: new first sector, old second
    now = load_state(device, 0)
    assert now != before
    assert now.same_content(FULL)
    assert now.seq == before.seq + 1


def test_the_block_is_a_grub_environment_block_with_seq_and_check_in_different_sectors() -> None:
    block = encode_boot_state(structs.replace(FULL, seq=41))
    assert len(block) == BLOCK_SIZE
    assert block.startswith(HEADER + b"palisade_seq=41\n")
    assert block.index(b"palisade_check=41\n") >= SECTOR  # second sector
    assert block.rstrip(b"#").endswith(b"palisade_check=41\n")
    assert decode_boot_state(block) == structs.replace(FULL, seq=41)


def test_a_copy_torn_between_its_sectors_is_not_whole() -> None:
    old = encode_boot_state(structs.replace(FULL, seq=7))
    new = encode_boot_state(structs.replace(FULL, seq=8, min_version="1.1.0"))
    assert decode_boot_state(new[:SECTOR] + old[SECTOR:]) is None
    assert decode_boot_state(old[:SECTOR] + new[SECTOR:]) is None
    assert decode_boot_state(bytes(BLOCK_SIZE)) is None


def test_values_grub_cannot_hold_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    before = read_boot_state(disk)
    bad = structs.replace(FULL, a=structs.replace(FULL.a, version="1.0\n0"))
    with pytest.raises(ImageError) as caught:
        write_boot_state(disk, bad)
    assert caught.value.code == "boot_state_invalid"
    with pytest.raises(ImageError) as too_many:
        write_boot_state(disk, structs.replace(FULL, a=structs.replace(FULL.a, tries=10)))
    assert too_many.value.code == "boot_state_invalid"
    assert read_boot_state(disk) == before


def test_variables_added_by_others_are_kept(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    written = write_boot_state(disk, structs.replace(FULL, extra=(("next_entry", "rescue"),)))
    assert read_boot_state(disk).extra == (("next_entry", "rescue"),)
    assert read_boot_state(disk) == written


def test_read_falls_back_to_copy_1_then_refuses(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    written = write_boot_state(disk, FULL)
    state_start = _state_start(disk)
    with disk.open("r+b") as file:
        file.seek(state_start + COPY_OFFSETS[0] + 100)
        file.write(b"garbage")
    assert read_boot_state(disk) == written
    with disk.open("r+b") as file:
        file.seek(state_start + COPY_OFFSETS[1] + 100)
        file.write(b"garbage")
    with pytest.raises(ImageError) as caught:
        read_boot_state(disk)
    assert caught.value.code == "boot_state_corrupt"
    # Replacing the state whole (no read-modify-write) repairs both copies.
    repaired = write_boot_state(disk, FULL)
    assert read_boot_state(disk) == repaired
    assert repaired.seq > written.seq


needs_grub = pytest.mark.skipif(
    shutil.which("grub-editenv") is None, reason="grub-editenv (grub-common) not installed"
)


@needs_grub
def test_grub_editenv_reads_a_copy_extracted_to_a_file(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    state = install(read_boot_state(disk), "B", version="1.1.0", digest=DIGEST, tries=3)
    written = write_boot_state(disk, state)
    for copy in COPY_OFFSETS:
        extracted = tmp_path / f"copy{copy}.env"
        extracted.write_bytes(_read(disk, _state_start(disk) + copy, BLOCK_SIZE))
        listing = _grub_editenv(extracted, "list").splitlines()
        assert listing[0] == f"palisade_seq={written.seq}"
        assert listing[-1] == f"palisade_check={written.seq}"
        for line in ("ORDER=B A", "B_OK=0", "B_TRY=3", "A_OK=0", "B_VERSION=1.1.0"):
            assert line in listing


@needs_grub
def test_grubs_in_place_decrement_keeps_the_copy_whole(tmp_path: Path) -> None:
    """GRUB's save_env rewrites a same-length value in place: TRY=3 → TRY=2 leaves the
    check line where it was, so the copy still reads as whole, with one try fewer."""
    block = encode_boot_state(structs.replace(FULL, seq=12))
    extracted = tmp_path / "grubenv"
    extracted.write_bytes(block)
    _grub_editenv(extracted, "set", "B_TRY=2")
    changed = extracted.read_bytes()
    assert len(changed) == BLOCK_SIZE
    assert sum(a != b for a, b in zip(block, changed, strict=True)) == 1
    decoded = decode_boot_state(changed)
    assert decoded is not None
    assert decoded.b.tries == 2
    assert decoded.seq == 12


def _grub_editenv(path: Path, *args: str) -> str:
    result = subprocess.run(
        ["grub-editenv", str(path), *args], capture_output=True, text=True, check=True
    )
    return result.stdout


def _disk(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.img"
    init_disk(disk, slot_size=1 << 20, data_size=1 << 20)
    return disk


def _state_start(disk: Path) -> int:
    return DiskLayout.read(disk).state.start


def _read(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read(size)


def test_the_boot_state_tool_shows_which_copy_is_whole(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    written = write_boot_state(disk, FULL)
    with disk.open("r+b") as file:  # tear copy 0: its second sector from another write
        file.seek(_state_start(disk) + COPY_OFFSETS[0] + SECTOR)
        file.write(encode_boot_state(structs.replace(FULL, seq=99))[SECTOR:])
    result = run_palisade("image", "boot-state", "--disk", str(disk), "--json")
    assert result.returncode == 0, result.stderr
    copies = json.loads(result.stdout)
    assert [copy["whole"] for copy in copies] == [False, True]
    assert ["palisade_check", "99"] in copies[0]["variables"]
    assert ["palisade_seq", str(written.seq)] in copies[1]["variables"]
    assert read_boot_state(disk) == written
