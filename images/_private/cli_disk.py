"""`palisade image flash` and `palisade image status`: a bundle onto a disk, and what the
disk's boot state says (registered by images/_private/cli.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer

from federation.client import JsonFlag, fail, print_json
from images._private.boot import select_slot
from images._private.bootstate import (
    BLOCK_SIZE,
    COPY_OFFSETS,
    SLOTS,
    BootState,
    Slot,
    decode_boot_state,
    parse_variables,
)
from images._private.disk import DiskLayout, is_block_device, read_boot_state
from images._private.errors import ImageError
from images._private.events import record_event
from images._private.flash import DEFAULT_TRIES, DiskSizes, FlashResult, flash_bundle
from images._private.keys import TrustSet, default_trust_file

_SIZE = re.compile(r"^(\d+)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_CMDLINE_SLOT = re.compile(r"(?:^|\s)palisade\.slot=([AB])(?:\s|$)")

DiskOpt = Annotated[
    Path, typer.Option("--disk", help="The node's disk: a block device or a disk image file.")
]


def register(app: typer.Typer) -> None:
    """Add this room's commands to `app`."""
    app.command("flash")(flash_command)
    app.command("status")(status_command)
    app.command("boot-state")(boot_state_command)


def flash_command(  # noqa: PLR0917 - typer maps each option to a parameter
    bundle: Annotated[Path, typer.Argument(help="The signed bundle (.pimg).")],
    target: Annotated[
        Path, typer.Option("--target", help="The disk: /dev/sdX or a disk image file.")
    ],
    init: Annotated[
        bool,
        typer.Option("--init", help="Lay out a new disk (GPT: state, slots A and B, data)."),
    ] = False,
    trust: Annotated[
        Path | None,
        typer.Option(
            "--trust",
            help="Release key trust file (default: $PALISADE_HOME/image/trust.json).",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="The node's data directory: models and the slot's config go there."
        ),
    ] = None,
    tries: Annotated[
        int, typer.Option("--tries", help="Trial boots before the node falls back (1-9).")
    ] = DEFAULT_TRIES,
    slot: Annotated[
        str | None,
        typer.Option("--slot", help="A or B (default: the inactive slot)."),
    ] = None,
    slot_size: Annotated[
        str, typer.Option("--slot-size", help="With --init: size of each root slot.")
    ] = "2G",
    data_size: Annotated[
        str | None,
        typer.Option(
            "--data-size",
            help="With --init: size of the data partition (default: the rest of a device; "
            "64M in a new image file).",
        ),
    ] = None,
    compatible: Annotated[
        str | None,
        typer.Option("--compatible", help="The node's hardware class (default: the disk's)."),
    ] = None,
    region: Annotated[
        str | None,
        typer.Option("--region", help="The node's region (default: the enrolled node's)."),
    ] = None,
) -> None:
    """Write a bundle to the inactive slot; the node boots it next, on trial."""
    try:
        result = flash_bundle(
            bundle,
            target,
            trust=TrustSet.load(_trust_file(trust)),
            data_dir=data,
            init=init,
            tries=tries,
            progress=_ProgressPrinter(),
            slot=_slot_option(slot),
            booted=_booted_from_cmdline(target),
            compatible=compatible,
            region=region,
            sizes=DiskSizes(slot=_size(slot_size), data=_size(data_size) if data_size else None),
        )
    except ImageError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # the device or the data directory failed under us
        raise fail(f"flash failed: {exc.strerror or exc} (io_error)") from None
    if data is not None:
        record_event(
            data,
            "image.install",
            slot=result.slot,
            version=result.version,
            digest=result.digest,
            detail=f"flashed from {bundle.name}",
        )
    _print_flashed(result, target)


def _trust_file(path: Path | None) -> Path:
    if path is not None:
        return path
    default = default_trust_file()
    if not default.is_file():
        raise fail(
            f"No release key trust file: pass --trust FILE or put one at {default} "
            "(trust_file_missing)"
        )
    return default


def _slot_option(value: str | None) -> Slot | None:
    if value is None:
        return None
    if value.upper() in SLOTS:
        return "A" if value.upper() == "A" else "B"
    typer.echo("error: --slot must be A or B", err=True)
    raise typer.Exit(2)


def _size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match or int(match[1]) == 0:
        typer.echo(f"error: {text!r} is not a size such as 8M, 512MiB or 2G", err=True)
        raise typer.Exit(2)
    return int(match[1]) * _UNITS[match[2].upper()]


def _booted_from_cmdline(target: Path) -> Slot | None:
    """On a running node flashing its own disk, the slot GRUB booted (palisade.slot=)."""
    if not is_block_device(target):
        return None  # a disk image file is never the disk this system runs from
    try:
        match = _CMDLINE_SLOT.search(Path("/proc/cmdline").read_text())
    except OSError:
        return None
    if match is None:
        return None
    return "A" if match[1] == "A" else "B"


class _ProgressPrinter:
    """A bar on a terminal; otherwise a plain line at every 10 %."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.shown = 0
        self.step = -1

    def __call__(self, done: int, total: int) -> None:
        if sys.stderr.isatty():
            if self.bar is None:
                self.bar = typer.progressbar(length=total, label="Flashing", file=sys.stderr)
                self.bar.__enter__()
            self.bar.update(done - self.shown)
            self.shown = done
            if done >= total:
                self.bar.__exit__(None, None, None)
            return
        step = done * 10 // max(total, 1)
        if step > self.step:
            self.step = step
            phase = "writing" if done * 2 <= total else "verifying"
            typer.echo(f"flash: {step * 10}% ({phase}, {done} of {total} bytes)", err=True)


def _print_flashed(result: FlashResult, target: Path) -> None:
    tries = result.state.slot(result.slot).tries
    typer.echo(
        f"Flashed {result.version} into slot {result.slot} of {target} "
        f"(rootfs sha256 {result.digest}).\n"
        f"It boots next, on trial ({tries} tries); once it is healthy the node commits it "
        "(`palisade image mark-good`), otherwise it returns to the previous slot."
    )


def status_command(disk: DiskOpt, as_json: JsonFlag = False) -> None:
    """Show the slots (version, digest, state, tries), the booted slot and the minimum version."""
    try:
        layout = DiskLayout.read(disk)
        state = read_boot_state(disk)
    except ImageError as exc:
        raise fail(str(exc)) from None
    report = disk_status(layout, state)
    if as_json:
        print_json(report)
        return
    _print_status(report)


def disk_status(layout: DiskLayout, state: BootState) -> dict[str, Any]:
    """What `image status --json` prints (also used by the agent's status report)."""
    decision = select_slot(state)
    return {
        "disk": str(layout.path),
        "order": list(state.order),
        "booted_slot": state.booted_slot,
        "next_boot": {"slot": decision.slot, "trial": decision.trial},
        "min_version": state.min_version or None,
        "compatible": state.compatible or None,
        "region": state.region or None,
        "seq": state.seq,
        "slots": {slot: _slot_status(layout, state, slot) for slot in SLOTS},
        "partitions": [
            {"number": each.number, "name": each.name, "start": each.start, "size": each.size}
            for each in layout.partitions
        ],
    }


def _slot_status(layout: DiskLayout, state: BootState, slot: Slot) -> dict[str, Any]:
    record = state.slot(slot)
    return {
        "state": record.status,
        "version": record.version or None,
        "digest": record.digest or None,
        "committed": record.ok,
        "tries": record.tries,
        "bootable": record.bootable,
        "size": layout.slot(slot).size,
    }


def _print_status(report: dict[str, Any]) -> None:
    nxt = report["next_boot"]
    typer.echo(f"Disk {report['disk']}")
    typer.echo(
        f"  booted slot: {report['booted_slot'] or '-'}   next boot: {nxt['slot']}"
        f"{' (trial)' if nxt['trial'] else ''}   order: {' '.join(report['order'])}   "
        f"minimum version: {report['min_version'] or '-'}"
    )
    typer.echo(f"  hardware: {report['compatible'] or '-'}   region: {report['region'] or '-'}")
    typer.echo(f"  {'SLOT':<5}{'STATE':<10}{'VERSION':<20}{'BOOTABLE':<18}DIGEST")
    for slot, info in report["slots"].items():
        typer.echo(
            f"  {slot:<5}{info['state']:<10}{info['version'] or '-':<20}"
            f"{_bootable(info):<18}{info['digest'] or '-'}"
        )


def _bootable(info: dict[str, Any]) -> str:
    if info["committed"]:
        return "yes (committed)"
    if info["tries"]:
        return f"trial, {info['tries']} left"
    return "no"


def boot_state_command(disk: DiskOpt, as_json: JsonFlag = False) -> None:
    """Debugging: both copies of the boot state block, whether each is whole, their variables."""
    try:
        base = DiskLayout.read(disk).state.start
        with disk.open("rb") as file:
            copies = [_read_copy(file, base + offset) for offset in COPY_OFFSETS]
    except ImageError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot read {disk}: {exc.strerror or exc} (disk_unreadable)") from None
    report: list[dict[str, Any]] = [
        {"copy": index, "offset": base + COPY_OFFSETS[index], "whole": state is not None,
         "variables": variables}
        for index, (state, variables) in enumerate(copies)
    ]  # fmt: skip
    if as_json:
        print_json(report)
        return
    for entry in report:
        whole = "whole" if entry["whole"] else "NOT whole (torn, blank or damaged)"
        typer.echo(f"copy {entry['copy']} at byte {entry['offset']}: {whole}")
        for key, value in entry["variables"]:
            if key != "palisade_pad":
                typer.echo(f"  {key}={value}")


def _read_copy(file: BinaryIO, offset: int) -> tuple[BootState | None, list[tuple[str, str]]]:
    file.seek(offset)
    block = file.read(BLOCK_SIZE)
    return decode_boot_state(block), parse_variables(block) or []
