"""The appliance image's grub.cfg implements the boot model of `images/_private/boot.py`.

`grub-script-check` parses it as GRUB does. Then the script itself runs, under bash, over
real boot state blocks: GRUB's script language is close enough to sh that only GRUB's
commands need stand-ins (`set`, `load_env` and `save_env` on the state partition's blocklist
`(hd0,gpt1)/copyN`, the tar members `--init` lays on the state partition, `linux` recording the
kernel command line). For every state the slot it
boots and the state it leaves on the partition must be `select_slot`'s, including when copy
0 is torn and copy 1 must be used.
"""

from __future__ import annotations

import io
import itertools
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from msgspec import structs

from images._private.boot import install, mark_bad, mark_good, select_slot
from images._private.bootstate import (
    BLOCK_SIZE,
    COPY_OFFSETS,
    SECTOR,
    STATE_SPAN,
    BootState,
    Slot,
    SlotRecord,
    encode_boot_state,
    load_state,
    state_area,
)
from images._private.bootstate import FileDevice as StateFile

GRUB_CFG = Path(__file__).resolve().parents[2] / "images" / "os" / "grub.cfg"

# GRUB's commands, for running grub.cfg under bash against a state partition file.
SHIM = r"""
set() { declare -g "$1"; }
serial() { :; }
terminal_input() { :; }
terminal_output() { :; }
initrd() { :; }
boot() { :; }
linux() { printf '%s\n' "$*" > "$BOOTED"; }
member() {  # (hd0,gpt1)/copyN -> the member's byte offset (found by Python's tarfile)
    local name=COPY_${1##*/copy}
    echo "${!name}"
}
load_env() {  # load_env -f FILE: like GRUB, nothing unless the block has the header
    local at block
    at=$(member "$2")
    block=$(dd if="$STATE" bs=1 skip="$at" count=1024 status=none | tr -d '\0')
    [[ $block == "# GRUB Environment Block"* ]] || return 1
    while IFS= read -r line; do
        [[ $line == \#* || $line != *=* ]] && continue
        declare -g "$line"
    done <<< "$block"
}
save_env() {  # save_env -f FILE VAR: rewrite VAR's value in place (same length, as GRUB)
    local start at
    start=$(member "$2")
    at=$(dd if="$STATE" bs=1 skip="$start" count=1024 status=none |
        grep -abo "^$3=" | head -1 | cut -d: -f1)
    printf '%s' "${!3}" | dd of="$STATE" bs=1 seek=$((start + at + ${#3} + 1)) \
        conv=notrunc status=none
}
"""


def run_grub_cfg(state_file: Path, tmp_path: Path) -> str:
    """Run grub.cfg over `state_file` (the state partition); the kernel command line."""
    booted = tmp_path / "cmdline"
    booted.unlink(missing_ok=True)
    members = tar_members(state_file.read_bytes())
    script = SHIM + GRUB_CFG.read_text()
    bash = shutil.which("bash") or "/bin/bash"
    subprocess.run(
        [bash, "-c", script],
        env={
            "STATE": str(state_file),
            "BOOTED": str(booted),
            "PATH": "/usr/bin:/bin",
            **{f"COPY_{name[-1]}": str(offset) for name, offset in members.items()},
        },
        check=True,
        capture_output=True,
        timeout=30,
    )
    return booted.read_text()


def tar_members(partition: bytes) -> dict[str, int]:
    """Where GRUB's tar driver finds each file of the state partition."""
    with tarfile.open(fileobj=io.BytesIO(partition[:STATE_SPAN])) as archive:
        return {member.name: member.offset_data for member in archive.getmembers()}


def write_copies(path: Path, copy0: bytes, copy1: bytes) -> None:
    data = bytearray(state_area())
    data[COPY_OFFSETS[0] : COPY_OFFSETS[0] + BLOCK_SIZE] = copy0
    data[COPY_OFFSETS[1] : COPY_OFFSETS[1] + BLOCK_SIZE] = copy1
    path.write_bytes(bytes(data))


def read_back(path: Path) -> BootState:
    with path.open("rb") as file:
        return load_state(StateFile(file.fileno()), 0)


def booted_slot(cmdline: str) -> str:
    match = re.search(r"palisade\.slot=([AB])\b", cmdline)
    assert match is not None, cmdline
    return match[1]


def states() -> list[BootState]:
    """Every combination of order, commit and trial boots (0, 1, 3, 9) over two slots."""
    found = []
    orders: list[tuple[Slot, Slot]] = [("A", "B"), ("B", "A")]
    for order, ok_a, ok_b, try_a, try_b in itertools.product(
        orders, [False, True], [False, True], [0, 1, 3, 9], [0, 1, 3, 9]
    ):
        a = SlotRecord(ok=ok_a, tries=try_a, status="good" if ok_a else "trial", version="1.0.0")
        b = SlotRecord(ok=ok_b, tries=try_b, status="good" if ok_b else "trial", version="2.0.0")
        found.append(BootState(seq=7, order=order, a=a, b=b, min_version="1.0.0"))
    return found


def test_grub_script_check_accepts_grub_cfg() -> None:
    checker = shutil.which("grub-script-check") or "/usr/bin/grub-script-check"
    result = subprocess.run([checker, str(GRUB_CFG)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grub_cfg_reads_the_variables_the_boot_state_writes() -> None:
    text = GRUB_CFG.read_text()
    written = {
        line.split("=", 1)[0]
        for line in encode_boot_state(BootState()).decode().splitlines()
        if "=" in line and not line.startswith("#")
    }
    read = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    state_variables = {name for name in read if name.isupper() or name in written}
    assert state_variables <= written
    assert {"ORDER", "A_OK", "A_TRY", "B_OK", "B_TRY", "palisade_seq", "palisade_check"} <= read
    # GRUB reads and saves the copies as the tar members at the copies' offsets.
    members = tar_members(state_area())
    assert members == {"copy0": COPY_OFFSETS[0], "copy1": COPY_OFFSETS[1]}
    for name in members:
        assert f'"${{palisade_state}}/{name}"' in text


@pytest.mark.parametrize("state", states(), ids=lambda state: encode_boot_state(state)[25:80])
def test_grub_cfg_boots_what_select_slot_boots(state: BootState, tmp_path: Path) -> None:
    partition = tmp_path / "state"
    block = encode_boot_state(state)
    write_copies(partition, block, block)
    cmdline = run_grub_cfg(partition, tmp_path)
    decision = select_slot(state)
    assert booted_slot(cmdline) == decision.slot
    assert f"palisade.trial={int(decision.trial)}" in cmdline
    after = read_back(partition)
    assert after.same_content(decision.new_state)
    assert after.seq == state.seq  # GRUB rewrote one digit in place: the copy stays whole


def test_a_torn_copy_0_makes_grub_use_copy_1(tmp_path: Path) -> None:
    before = BootState(seq=3, a=SlotRecord(ok=True, status="good", version="1.0.0"))
    after = install(before, "B", version="2.0.0", digest="ab" * 32, tries=3)
    after = structs.replace(after, seq=4)
    new_block, old_block = encode_boot_state(after), encode_boot_state(before)
    torn = new_block[:SECTOR] + old_block[SECTOR:]  # power cut between copy 0's sectors
    partition = tmp_path / "state"
    write_copies(partition, torn, new_block)
    cmdline = run_grub_cfg(partition, tmp_path)
    assert booted_slot(cmdline) == "B"
    assert "palisade.trial=1" in cmdline
    assert read_back(partition).slot("B").tries == 2  # saved into copy 1, the one it read


def test_three_trial_boots_then_grub_returns_to_the_committed_slot(tmp_path: Path) -> None:
    good = BootState(seq=1, a=SlotRecord(ok=True, status="good", version="1.0.0"))
    state = structs.replace(install(good, "B", version="2.0.0", digest="cd" * 32, tries=3), seq=2)
    partition = tmp_path / "state"
    write_copies(partition, encode_boot_state(state), encode_boot_state(state))
    booted = [booted_slot(run_grub_cfg(partition, tmp_path)) for _ in range(4)]
    assert booted == ["B", "B", "B", "A"]
    assert read_back(partition).slot("B").tries == 0


def test_committed_and_bad_slots_boot_as_the_model_says(tmp_path: Path) -> None:
    good = BootState(seq=1, a=SlotRecord(ok=True, status="good", version="1.0.0"))
    trial = install(good, "B", version="2.0.0", digest="ef" * 32, tries=3)
    partition = tmp_path / "state"
    for state, slot in [(mark_good(trial, "B"), "B"), (mark_bad(trial, "B"), "A")]:
        block = encode_boot_state(structs.replace(state, seq=5))
        write_copies(partition, block, block)
        assert booted_slot(run_grub_cfg(partition, tmp_path)) == slot
