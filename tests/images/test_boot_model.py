"""The boot model (what grub.cfg does, and what install/commit/failure change), run against
the boot state on a real disk image: boot counting, commit, rollback, the minimum version."""

from __future__ import annotations

from pathlib import Path

import pytest
from msgspec import structs

from images._private.boot import (
    BootDecision,
    active_slot,
    assess,
    install,
    mark_bad,
    mark_good,
    record_booted,
    select_slot,
)
from images._private.bootstate import BootState, Slot, SlotRecord
from images._private.disk import init_disk, read_boot_state, update_boot_state
from images._private.errors import ImageError

V1, V2 = "1.0.0", "2.0.0"
D1, D2 = "11" * 32, "22" * 32


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A disk whose slot A runs V1, committed, booted (what a first install comes to)."""
    path = tmp_path / "disk.img"
    init_disk(path, slot_size=1 << 20, data_size=1 << 20)
    update_boot_state(path, lambda state: install(state, "A", version=V1, digest=D1, tries=3))
    assert boot(path).slot == "A"
    update_boot_state(path, lambda state: mark_good(state, "A", V1))
    return path


def boot(disk: Path) -> BootDecision:
    """One power-on: GRUB picks a slot and saves its decrement; the booted system's agent
    records which slot it runs and writes what the assessment says."""
    decision = select_slot(read_boot_state(disk))
    update_boot_state(disk, lambda _state: decision.new_state)
    update_boot_state(
        disk, lambda state: record_booted(assess(state, decision.slot).new_state, decision.slot)
    )
    return decision


def install_v2(disk: Path, tries: int = 3) -> BootState:
    return update_boot_state(
        disk, lambda state: install(state, "B", version=V2, digest=D2, tries=tries)
    )


def test_three_trial_boots_without_commit_fall_back_and_mark_the_new_slot_bad(
    disk: Path,
) -> None:
    install_v2(disk)
    for tries_left in (2, 1, 0):
        decision = boot(disk)
        assert (decision.slot, decision.trial) == ("B", True)
        assert read_boot_state(disk).b.tries == tries_left
    state = read_boot_state(disk)
    decision = select_slot(state)
    assert (decision.slot, decision.trial) == ("A", False)
    assessment = assess(state, "A")
    assert assessment.outcome == "rolled_back"
    assert assessment.failed_slot == "B"
    assert boot(disk).slot == "A"
    after = read_boot_state(disk)
    assert after.b == SlotRecord(ok=False, tries=0, status="bad", version=V2, digest=D2)
    assert after.order == ("A", "B")
    assert after.min_version == V1
    assert [boot(disk).slot for _ in range(3)] == ["A", "A", "A"]


def test_a_commit_on_the_second_boot_keeps_the_new_slot(disk: Path) -> None:
    install_v2(disk)
    assert boot(disk).slot == "B"
    second = boot(disk)
    assert (second.slot, second.trial) == ("B", True)
    assert assess(read_boot_state(disk), "B").outcome == "trial"
    committed = update_boot_state(disk, lambda state: mark_good(state, "B", V2))
    assert committed.b.ok
    assert committed.b.status == "good"
    assert assess(committed, "B").outcome == "committed"
    for _ in range(5):
        decision = boot(disk)
        assert (decision.slot, decision.trial) == ("B", False)
    # The previous slot is no longer bootable: V1 is below the new minimum, and the next
    # flash may overwrite it.
    assert not read_boot_state(disk).a.bootable


def test_a_failed_health_check_rolls_back_on_the_next_boot(disk: Path) -> None:
    install_v2(disk)
    assert boot(disk).slot == "B"
    failed = update_boot_state(disk, lambda state: mark_bad(state, "B"))
    assert failed.order == ("A", "B")
    assert failed.b.status == "bad"
    decision = boot(disk)
    assert (decision.slot, decision.trial) == ("A", False)
    assert assess(read_boot_state(disk), "A").outcome == "committed"


def test_the_minimum_version_moves_only_at_commit(disk: Path) -> None:
    assert read_boot_state(disk).min_version == V1
    assert install_v2(disk).min_version == V1
    boot(disk)
    assert read_boot_state(disk).min_version == V1
    assert update_boot_state(disk, lambda state: mark_bad(state, "B")).min_version == V1
    install_v2(disk)
    boot(disk)
    assert update_boot_state(disk, lambda state: mark_good(state, "B")).min_version == V2
    # Committing an older version never lowers it.
    state = install(read_boot_state(disk), "A", version="1.5.0", digest=D1, tries=1)
    assert mark_good(state, "A").min_version == V2


def test_mark_good_checks_the_version_it_is_told(disk: Path) -> None:
    state = install_v2(disk)
    with pytest.raises(ImageError) as caught:
        mark_good(state, "B", "9.9.9")
    assert caught.value.code == "slot_version_mismatch"


def test_with_no_bootable_slot_the_first_slot_boots_anyway() -> None:
    state = BootState(order=("B", "A"))
    decision = select_slot(state)
    assert (decision.slot, decision.new_state) == ("B", state)


def test_tries_must_be_one_digit() -> None:
    with pytest.raises(ImageError) as caught:
        install(BootState(), "A", version=V1, digest=D1, tries=10)
    assert caught.value.code == "invalid_tries"


@pytest.mark.parametrize(
    ("state", "booted", "active"),
    [
        (BootState(), None, None),
        (BootState(booted_slot="B"), None, "B"),
        (BootState(booted_slot="B"), "A", "A"),
        (structs.replace(BootState(), order=("B", "A"), a=SlotRecord(ok=True)), None, "A"),
    ],
)
def test_the_active_slot(state: BootState, booted: Slot | None, active: Slot | None) -> None:
    assert active_slot(state, booted=booted) == active


def test_a_first_image_that_fails_stays_the_boot_loaders_last_resort(tmp_path: Path) -> None:
    """On a new disk the other slot is empty: a failed first image must not send the boot
    loader's fallback to a slot with nothing in it."""
    path = tmp_path / "new.img"
    init_disk(path, slot_size=1 << 20, state_size=1 << 20, data_size=1 << 20)
    update_boot_state(path, lambda state: install(state, "A", version=V1, digest=D1, tries=3))
    failed = update_boot_state(path, lambda state: mark_bad(state, "A"))
    assert failed.order == ("A", "B")
    assert failed.slot("A").status == "bad"
    assert select_slot(failed).slot == "A"
