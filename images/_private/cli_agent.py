"""`palisade image mark-good`, `image agent` and `image supervise`: the on-device side of an
update (registered by images/_private/cli.py)."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import threading
from pathlib import Path
from typing import Annotated

import typer

from appliance import DEFAULT_PORT
from federation import NodeCredentials, PalisadeError
from federation.client import fail
from images._private.agent import (
    DEFAULT_DEADLINE_S,
    DEFAULT_POLL_S,
    DEFAULT_UPDATE_POLL_S,
    DEFAULT_WINDOW_S,
    ApplianceProbe,
    HealthWindow,
    NodeImage,
    Updater,
    booted_slot_from_cmdline,
    kernel_boot_id,
    probe_verify,
    watch_trial,
)
from images._private.bootstate import SLOTS, Slot
from images._private.disk import is_block_device
from images._private.supervise import SuperviseOptions, Supervisor

DiskOpt = Annotated[
    Path, typer.Option("--disk", help="The node's disk: a block device or a disk image file.")
]
DataOpt = Annotated[
    Path,
    typer.Option(
        "--data",
        help="The node's data directory (its PALISADE_HOME): events, slot configs, trust.",
    ),
]
WindowOpt = Annotated[
    float,
    typer.Option("--window", help="Seconds a trial boot must stay healthy before it commits."),
]
DeadlineOpt = Annotated[
    float,
    typer.Option(
        "--deadline", help="Seconds a trial boot may stay unhealthy before it is marked bad."
    ),
]
SlotOpt = Annotated[
    str | None,
    typer.Option("--slot", help="A or B: the booted slot (default: the kernel command line)."),
]
RouterOpt = Annotated[
    str | None,
    typer.Option("--router-url", help="The router's fleet URL (default: the enrolled one)."),
]


def register(app: typer.Typer) -> None:
    """Add this room's commands to `app`."""
    app.command("mark-good")(mark_good_command)
    app.command("agent")(agent_command)
    app.command("supervise")(supervise_command)


def mark_good_command(
    disk: DiskOpt,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="The node's data directory: records the commit event."),
    ] = None,
    slot: SlotOpt = None,
) -> None:
    """Commit the booted slot: it stays the node's image, and the minimum version moves up."""
    node = NodeImage(disk, data or Path(os.environ.get("PALISADE_HOME", "var")))
    try:
        booted = _booted(node, slot)
        if booted is None:
            raise fail(
                f"{disk} records no booted slot (BOOTED_SLOT) and the kernel command line "
                "names none; pass --slot A or B (no_booted_slot)"
            )
        state = node.commit(booted, "by hand (palisade image mark-good)")
    except PalisadeError as exc:
        raise fail(str(exc)) from None
    record = state.slot(booted)
    typer.echo(
        f"Committed slot {booted} ({record.version or 'unknown version'}); "
        f"minimum version now {state.min_version or '-'}."
    )


def agent_command(  # noqa: PLR0917 - typer maps each option to a parameter
    disk: DiskOpt,
    data: DataOpt,
    appliance_url: Annotated[
        str | None,
        typer.Option(
            "--appliance-url",
            help="The local appliance (its /readyz, /health); default 127.0.0.1:8400, HTTPS "
            "on an enrolled node.",
        ),
    ] = None,
    window: WindowOpt = DEFAULT_WINDOW_S,
    deadline: DeadlineOpt = DEFAULT_DEADLINE_S,
    slot: SlotOpt = None,
    router_url: RouterOpt = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow/--once",
            help="Keep polling the router for updates (an enrolled node) after the boot.",
        ),
    ] = True,
    update_poll: Annotated[
        float, typer.Option("--update-poll", help="Seconds between update polls.")
    ] = DEFAULT_UPDATE_POLL_S,
    reboot_command: Annotated[
        str, typer.Option("--reboot-command", help="How to reboot into the other slot.")
    ] = "systemctl reboot",
) -> None:
    """At boot: commit a healthy trial slot or mark it bad and reboot; then follow updates.

    Run by the palisade-image-agent systemd unit after the appliance starts. An enrolled
    node then polls its router for updates, installs them into the inactive slot and
    reboots into them.
    """
    _logging()
    node = NodeImage(disk, data)
    stop = threading.Event()
    try:
        booted = _booted(node, slot)
        if booted is None:
            raise fail("the booted slot is unknown: pass --slot A or B (no_booted_slot)")
        assessment = node.boot_once(booted, kernel_boot_id())
        updater = Updater.for_node(node, router_url)
        scheme = "https" if NodeCredentials.load(data).enrolled else "http"
        appliance_url = appliance_url or f"{scheme}://127.0.0.1:{DEFAULT_PORT}"
        if updater is not None:
            updater.report(booted)
        if assessment.outcome == "trial":
            committed = _trial(
                node, booted, appliance_url, window=window, deadline=deadline, updater=updater
            )
            if not committed:
                _reboot(reboot_command)
                return
        while follow and updater is not None and not stop.wait(update_poll):
            if updater.check(booted):
                _reboot(reboot_command)
                return
    except PalisadeError as exc:
        raise fail(str(exc)) from None


def _trial(
    node: NodeImage,
    slot: Slot,
    url: str,
    *,
    window: float,
    deadline: float,
    updater: Updater | None,
) -> bool:
    """Watch the trial boot; commit (True) or mark the slot bad (False: reboot)."""
    probe = ApplianceProbe(lambda: url.rstrip("/"), verify=probe_verify(node.data_dir))
    try:
        verdict, reason = watch_trial(
            HealthWindow(window=window, deadline=deadline),
            lambda: probe.look(alive=True),
            stop=threading.Event(),
            poll_s=DEFAULT_POLL_S,
        )
    finally:
        probe.close()
    if verdict == "commit":
        node.commit(slot, reason)
    else:
        node.fail(slot, reason)
    if updater is not None:
        updater.report(slot)
    return verdict == "commit"


def _reboot(command: str) -> None:
    typer.echo(f"rebooting: {command}", err=True)
    subprocess.run(shlex.split(command), check=False)  # noqa: S603 - the operator's command


def supervise_command(  # noqa: PLR0917 - typer maps each option to a parameter
    disk: DiskOpt,
    data: DataOpt,
    command: Annotated[
        list[str],
        typer.Argument(
            help="The appliance command after --; {config} becomes the booted slot's config."
        ),
    ],
    window: WindowOpt = DEFAULT_WINDOW_S,
    deadline: DeadlineOpt = DEFAULT_DEADLINE_S,
    max_boots: Annotated[
        int | None, typer.Option("--max-boots", help="Stop after this many boots.")
    ] = None,
    grace: Annotated[
        float, typer.Option("--grace", help="Seconds between SIGTERM and SIGKILL at a reboot.")
    ] = 10.0,
    router_url: RouterOpt = None,
    update_poll: Annotated[
        float, typer.Option("--update-poll", help="Seconds between update polls.")
    ] = DEFAULT_UPDATE_POLL_S,
) -> None:
    """Boot loader and init for a node without GRUB: run the appliance from its slots.

    Each boot picks a slot by the try counter, starts the command with that slot's config,
    commits a healthy trial and falls back from a failed one. SIGHUP reboots; SIGTERM stops.
    """
    _logging()
    options = SuperviseOptions(
        window_s=window,
        deadline_s=deadline,
        max_boots=max_boots,
        grace_s=grace,
        update_poll_s=update_poll,
        router_url=router_url,
    )
    try:
        supervisor = Supervisor(NodeImage(disk, data), command, options)
        code = supervisor.run()
    except PalisadeError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


def _booted(node: NodeImage, option: str | None) -> Slot | None:
    """--slot, else (on the disk this system runs from) the kernel command line's
    `palisade.slot=`, else the boot state's BOOTED_SLOT."""
    cmdline = booted_slot_from_cmdline() if is_block_device(node.disk) else None
    return _slot(option) or cmdline or node.state().booted_slot


def _slot(value: str | None) -> Slot | None:
    if value is None:
        return None
    for slot in SLOTS:
        if value.upper() == slot:
            return slot
    typer.echo("error: --slot must be A or B", err=True)
    raise typer.Exit(2)


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
