"""The boot model: what GRUB (grub.cfg) and the software boot loader do with the boot state,
and how an install, a commit and a failure change it. Pure functions over `BootState`.

    boot      for slot in ORDER: committed (OK=1) → boot it; trial boots left (TRY>0) →
              TRY-1, boot it on trial; else skip. Nothing bootable → ORDER[0] (never brick).
    install   the new slot first in ORDER, on trial with `tries` boots, not committed.
    commit    OK=1, first in ORDER, MIN_VERSION = max(MIN_VERSION, its version), and the
              other slot is no longer bootable (its version may now be below the minimum,
              and the next flash overwrites it): the only place MIN_VERSION moves.
    mark bad  OK=0, TRY=0, the other slot first in ORDER.
    assess    after a boot: committed, trial, or rolled back (the preferred slot ran out of
              trial boots and the other one booted: mark it bad, put the booted one first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from msgspec import structs

from images._private.bootstate import MAX_TRIES, BootState, Slot, SlotRecord, other_slot
from images._private.errors import ImageError
from images._private.manifest import compare_versions

Outcome = Literal["committed", "trial", "rolled_back"]


@dataclass(frozen=True)
class BootDecision:
    slot: Slot
    new_state: BootState  # what the boot loader saves (only a TRY decremented, if any)
    trial: bool  # booted without being committed


@dataclass(frozen=True)
class Assessment:
    outcome: Outcome
    slot: Slot  # the booted slot
    new_state: BootState  # to write (unchanged unless rolled back)
    failed_slot: Slot | None = None  # rolled back: the slot that ran out of trial boots


def select_slot(state: BootState) -> BootDecision:
    """The slot GRUB boots, and the state it saves."""
    for slot in state.order:
        record = state.slot(slot)
        if record.ok:
            return BootDecision(slot=slot, new_state=state, trial=False)
        if record.tries > 0:
            counted = state.with_slot(slot, structs.replace(record, tries=record.tries - 1))
            return BootDecision(slot=slot, new_state=counted, trial=True)
    first = state.order[0]
    return BootDecision(slot=first, new_state=state, trial=not state.slot(first).ok)


def install(state: BootState, slot: Slot, *, version: str, digest: str, tries: int) -> BootState:
    """The switch at the end of a flash: `slot` boots next, on trial."""
    if not 1 <= tries <= MAX_TRIES:
        raise ImageError(f"--tries must be 1 to {MAX_TRIES}.", code="invalid_tries")
    record = SlotRecord(ok=False, tries=tries, status="trial", version=version, digest=digest)
    return structs.replace(state.with_slot(slot, record), order=(slot, other_slot(slot)))


def cancel(state: BootState, slot: Slot) -> BootState:
    """`slot` is about to be overwritten: not bootable, not preferred, recorded as empty."""
    return structs.replace(state.with_slot(slot, SlotRecord()), order=(other_slot(slot), slot))


def mark_good(state: BootState, slot: Slot, version: str | None = None) -> BootState:
    """Commit `slot` (the booted one). `version`, if given, must be the slot's."""
    record = state.slot(slot)
    version = _committed_version(record, slot, version)
    minimum = state.min_version
    if version and (not minimum or compare_versions(version, minimum) > 0):
        minimum = version
    committed = structs.replace(record, ok=True, status="good", version=version)
    other = other_slot(slot)
    new = state.with_slot(slot, committed).with_slot(other, _retired(state.slot(other)))
    return structs.replace(new, order=(slot, other), min_version=minimum)


def _retired(record: SlotRecord) -> SlotRecord:
    """The previous slot once the other one is committed: kept, but never booted again."""
    status = "installed" if record.status in {"good", "trial"} else record.status
    return structs.replace(record, ok=False, tries=0, status=status)


def _committed_version(record: SlotRecord, slot: Slot, version: str | None) -> str:
    if version and record.version and version != record.version:
        raise ImageError(
            f"Slot {slot} holds version {record.version}, not {version}.",
            code="slot_version_mismatch",
        )
    return version or record.version


def mark_bad(state: BootState, slot: Slot) -> BootState:
    """`slot` failed (its health check, or it ran out of trial boots): never boot it again.

    The other slot goes first, unless it holds no image at all (the first image of a new
    disk failed): then the failed slot stays first, because the boot loader's last resort is
    the first slot of ORDER, and an empty slot cannot boot anything."""
    record = structs.replace(state.slot(slot), ok=False, tries=0, status="bad")
    other = other_slot(slot)
    order = (slot, other) if state.slot(other).status == "empty" else (other, slot)
    return structs.replace(state.with_slot(slot, record), order=order)


def record_booted(state: BootState, slot: Slot) -> BootState:
    """What the booted system's agent writes: which slot it runs (GRUB's palisade.slot=)."""
    return structs.replace(state, booted_slot=slot)


def assess(state: BootState, booted: Slot) -> Assessment:
    """What the boot that just happened means (run by the agent once the system is up)."""
    preferred = state.order[0]
    record = state.slot(preferred)
    if booted != preferred and not record.ok and record.tries == 0:
        return Assessment(
            outcome="rolled_back",
            slot=booted,
            new_state=mark_bad(state, preferred),
            failed_slot=preferred,
        )
    outcome: Outcome = "committed" if state.slot(booted).ok else "trial"
    return Assessment(outcome=outcome, slot=booted, new_state=state)


def active_slot(state: BootState, *, booted: Slot | None = None) -> Slot | None:
    """The slot the node runs (or last ran): never to be written. The booted slot if known,
    else the first committed slot in ORDER, else none (a disk that never booted)."""
    if booted or state.booted_slot:
        return booted or state.booted_slot
    return next((slot for slot in state.order if state.slot(slot).ok), None)
