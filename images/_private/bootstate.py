"""The boot state: a GRUB environment block stored twice on the state partition.

Each copy is exactly 1024 bytes (`# GRUB Environment Block\\n`, `key=value\\n` lines, `#`
padding), so GRUB's `load_env`/`save_env` and `grub-editenv` read it as it is. Copy 0 sits at
partition offset 512, copy 1 at 2048: each is the one member (`copy0`, `copy1`) of a tar
archive that `--init` lays on the partition (`state_area`), because GRUB 2.06's `save_env`
writes only to a file it reads through a filesystem driver (its tar driver reports the
sectors; a raw blocklist such as `(hd0,gpt1)0+2` is refused as "sparse"). The first line
is `palisade_seq=<n>`, the last one `palisade_check=<n>`, and a `palisade_pad=###…` line
pushes the check into the block's second 512-byte sector: a copy whose two sectors come from
different writes has seq != check.

A write takes a sequence number above any found on the partition, writes copy 1 and fsyncs,
then copy 0 and fsyncs (copy 0 first if copy 0 is the torn one: the copy a read relies on is
never the one being written). A read takes copy 0 if it is whole, else copy 1. A write that is cut
(dropped or torn at any sector, in either copy) therefore reads as exactly the state before
it or exactly the state after it.
"""

from __future__ import annotations

import os
import re
import tarfile
from typing import Literal, Protocol

from msgspec import Struct, structs

from images._private.errors import ImageError
from images._private.pause import pause_point

Slot = Literal["A", "B"]
SLOTS: tuple[Slot, Slot] = ("A", "B")
SlotStatus = Literal["empty", "installed", "trial", "good", "bad"]
SLOT_STATUSES: tuple[SlotStatus, ...] = ("empty", "installed", "trial", "good", "bad")

BLOCK_SIZE = 1024
SECTOR = 512
COPY_OFFSETS = (512, 2048)  # copy 0, copy 1 (GRUB: `(hd0,gpt1)/copy0`, `(hd0,gpt1)/copy1`)
STATE_SPAN = 4096  # the tar archive holding the copies: headers, copies, end-of-archive
HEADER = b"# GRUB Environment Block\n"
MAX_TRIES = 9  # one digit: GRUB's in-place decrement never moves the check line

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VALUE = re.compile(r"^[A-Za-z0-9 ._+:,/-]*$")
_SEQ_ANYWHERE = re.compile(rb"palisade_(?:seq|check)=(\d{1,19})\n")
_OWN_KEYS = frozenset(
    {"palisade_seq", "palisade_pad", "palisade_check", "ORDER", "MIN_VERSION", "BOOTED_SLOT"}
    | {"COMPATIBLE", "REGION"}
    | {f"{slot}_{field}" for slot in SLOTS for field in ("OK", "TRY", "STATE", "VERSION", "DIGEST")}
)


class SlotRecord(Struct, frozen=True, kw_only=True):
    """What the boot state says about one root slot."""

    ok: bool = False  # committed: GRUB boots it without counting
    tries: int = 0  # trial boots left
    status: SlotStatus = "empty"
    version: str = ""
    digest: str = ""  # sha256 of the rootfs written to the slot

    @property
    def bootable(self) -> bool:
        """Whether GRUB would ever boot this slot (committed, or trial boots left)."""
        return self.ok or self.tries > 0


class BootState(Struct, frozen=True, kw_only=True):
    """One whole copy of the boot state. Change it with the functions of `boot.py`."""

    seq: int = 0
    order: tuple[Slot, Slot] = SLOTS
    a: SlotRecord = SlotRecord()
    b: SlotRecord = SlotRecord()
    min_version: str = ""
    booted_slot: Slot | None = None
    compatible: str = ""  # the disk's hardware class and region, fixed at --init
    region: str = ""
    extra: tuple[tuple[str, str], ...] = ()  # variables someone else added; kept as they are

    def slot(self, name: Slot) -> SlotRecord:
        return self.a if name == "A" else self.b

    def with_slot(self, name: Slot, record: SlotRecord) -> BootState:
        return structs.replace(self, a=record) if name == "A" else structs.replace(self, b=record)

    def same_content(self, other: BootState) -> bool:
        """Equal apart from the sequence number (which every write moves)."""
        return structs.replace(self, seq=0) == structs.replace(other, seq=0)


def state_area() -> bytes:
    """The state partition's first STATE_SPAN bytes before any state is stored: a tar archive
    whose members `copy0` and `copy1` (1024 zero bytes each) are the two copies' places."""
    area = bytearray(STATE_SPAN)
    for index, offset in enumerate(COPY_OFFSETS):
        member = tarfile.TarInfo(f"copy{index}")
        member.size, member.mode, member.mtime = BLOCK_SIZE, 0o644, 0
        area[offset - SECTOR : offset] = member.tobuf(format=tarfile.USTAR_FORMAT)
    return bytes(area)


def other_slot(slot: Slot) -> Slot:
    return "B" if slot == "A" else "A"


def encode_boot_state(state: BootState) -> bytes:
    """The 1024-byte GRUB environment block of `state` (seq and check = `state.seq`)."""
    lines = [f"palisade_seq={state.seq}\n"]
    lines += [f"{key}={value}\n" for key, value in _variables(state)]
    body = HEADER + "".join(lines).encode("ascii")
    check = f"palisade_check={state.seq}\n".encode("ascii")
    pad_prefix = b"palisade_pad="
    filler = max(0, SECTOR - len(body) - len(pad_prefix) - 1)
    body += pad_prefix + b"#" * filler + b"\n" + check
    if len(body) > BLOCK_SIZE:
        raise ImageError(
            "The boot state does not fit in a 1024-byte GRUB environment block.",
            code="boot_state_invalid",
        )
    return body + b"#" * (BLOCK_SIZE - len(body))


def _variables(state: BootState) -> list[tuple[str, str]]:
    grub_visible = [("ORDER", " ".join(state.order))]
    own: list[tuple[str, str]] = []
    for name in SLOTS:
        record = state.slot(name)
        grub_visible += [
            (f"{name}_OK", "1" if record.ok else "0"),
            (f"{name}_TRY", str(record.tries)),
        ]
        own += [
            (f"{name}_STATE", record.status),
            (f"{name}_VERSION", record.version),
            (f"{name}_DIGEST", record.digest),
        ]
    own += [
        ("MIN_VERSION", state.min_version),
        ("BOOTED_SLOT", state.booted_slot or ""),
        ("COMPATIBLE", state.compatible),
        ("REGION", state.region),
    ]
    variables = grub_visible + own + list(state.extra)
    for key, value in variables:
        if not _KEY.match(key) or not _VALUE.match(value):
            raise ImageError(
                f"Boot state variable {key}={value!r} cannot be stored in a GRUB environment "
                "block (letters, digits and . _ + : , / - only).",
                code="boot_state_invalid",
            )
    if not all(0 <= state.slot(name).tries <= MAX_TRIES for name in SLOTS):
        raise ImageError(f"Trial boots must be 0 to {MAX_TRIES}.", code="boot_state_invalid")
    return variables


def decode_boot_state(block: bytes) -> BootState | None:
    """The state in one copy, or None if the copy is not whole (torn, blank or garbage)."""
    variables = parse_variables(block)
    if variables is None or len(variables) < 2:
        return None
    (first, seq), (last, check) = variables[0], variables[-1]
    if first != "palisade_seq" or last != "palisade_check" or seq != check or not seq.isdigit():
        return None
    try:
        return _state_of(int(seq), dict(variables[1:-1]))
    except (KeyError, ValueError):
        return None


def parse_variables(block: bytes) -> list[tuple[str, str]] | None:
    """The `key=value` lines of one copy in order, or None if it is no environment block."""
    if len(block) != BLOCK_SIZE or not block.startswith(HEADER):
        return None
    try:
        text = block[len(HEADER) :].decode("ascii")
    except UnicodeDecodeError:
        return None
    variables: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue  # padding (GRUB's comment lines)
        key, equals, value = line.partition("=")
        if not equals or not _KEY.match(key):
            return None
        variables.append((key, value))
    return variables


def _state_of(seq: int, variables: dict[str, str]) -> BootState:
    order = tuple(variables["ORDER"].split())
    if sorted(order) != list(SLOTS):
        raise ValueError("ORDER")
    booted = variables.get("BOOTED_SLOT", "")
    return BootState(
        seq=seq,
        order=(_slot(order[0]), _slot(order[1])),
        a=_slot_record("A", variables),
        b=_slot_record("B", variables),
        min_version=variables.get("MIN_VERSION", ""),
        booted_slot=_slot(booted) if booted else None,
        compatible=variables.get("COMPATIBLE", ""),
        region=variables.get("REGION", ""),
        extra=tuple((key, value) for key, value in variables.items() if key not in _OWN_KEYS),
    )


def _slot(name: str) -> Slot:
    if name == "A":
        return "A"
    if name == "B":
        return "B"
    raise ValueError(name)


def _slot_record(name: Slot, variables: dict[str, str]) -> SlotRecord:
    ok, tries, status = (
        variables[f"{name}_OK"],
        variables[f"{name}_TRY"],
        variables[f"{name}_STATE"],
    )
    if ok not in {"0", "1"} or not (tries.isdigit() and len(tries) == 1):
        raise ValueError(name)
    return SlotRecord(
        ok=ok == "1",
        tries=int(tries),
        status=next(each for each in SLOT_STATUSES if each == status),  # StopIteration: bad
        version=variables.get(f"{name}_VERSION", ""),
        digest=variables.get(f"{name}_DIGEST", ""),
    )


class StateDevice(Protocol):
    """Where the copies live: a disk (at the state partition's offset) or a test device."""

    def pread(self, size: int, offset: int) -> bytes: ...
    def pwrite(self, data: bytes, offset: int) -> None: ...
    def fsync(self) -> None: ...


class FileDevice:
    """A StateDevice over an open file descriptor (a disk image or a block device)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, data: bytes, offset: int) -> None:
        written = os.pwrite(self.fd, data, offset)
        if written != len(data):
            raise OSError(f"short write at {offset}: {written} of {len(data)} bytes")

    def fsync(self) -> None:
        os.fsync(self.fd)


def load_state(device: StateDevice, base: int) -> BootState:
    """Copy 0 if it is whole, else copy 1, else ImageError `boot_state_corrupt`."""
    for offset in COPY_OFFSETS:
        state = decode_boot_state(device.pread(BLOCK_SIZE, base + offset))
        if state is not None:
            return state
    raise ImageError(
        "Neither copy of the boot state is readable: the state partition is damaged or was "
        "never initialised (`palisade image flash --init`).",
        code="boot_state_corrupt",
    )


def store_state(device: StateDevice, base: int, state: BootState) -> BootState:
    """Write `state` by the two-copy protocol; returns it with the sequence number written.

    The copy a read would not pick is written (and fsynced) first: normally copy 1, but
    copy 0 when an earlier cut left copy 0 torn, so the one whole copy is never the one in
    flight.
    """
    written = structs.replace(state, seq=_highest_seq(device, base) + 1)
    block = encode_boot_state(written)
    first, second = COPY_OFFSETS[::-1]
    if decode_boot_state(device.pread(BLOCK_SIZE, base + COPY_OFFSETS[0])) is None:
        first, second = second, first
    device.pwrite(block, base + first)
    device.fsync()
    pause_point("state_write")
    device.pwrite(block, base + second)
    device.fsync()
    return written


def _highest_seq(device: StateDevice, base: int) -> int:
    """The largest sequence number in any sector of either copy, whole or torn: a new write
    above it cannot be mistaken, when torn, for a whole copy."""
    found = [0]
    for offset in COPY_OFFSETS:
        block = device.pread(BLOCK_SIZE, base + offset)
        found += [int(match) for match in _SEQ_ANYWHERE.findall(block)]
    return max(found)
