"""The appliance image under QEMU (`make image-test`; not part of the default run).

`make appliance-image` built `$IMAGE_BUILD/disk.img` (v1.0.0 in slot A on trial) and
`grub.lnx`. Here the lane builds v2.0.0 and a v3.0.0 whose node config names a model that
is not there (its appliance cannot start), then, on a copy of the disk:

1. boots v1 (GRUB: slot A on trial), calls the appliance with the `openai` SDK through a
   port forward bound to 127.0.0.1 (time from power-on to the first token measured), and
   waits for the image agent to commit slot A;
2. boots with v2 on a second, read-only disk (PALISADE-INBOX): inside the guest the inbox
   unit flashes it into slot B and reboots, GRUB boots B on trial, the agent commits it;
3. boots with v3 on the inbox disk: flashed into slot A, GRUB boots A on trial, its
   appliance never becomes healthy, the agent marks A bad and reboots, GRUB boots v2 again.

Each step reads the disk's boot state from the host (`palisade image status --json`) and
appends what happened, with the guest's serial console, to the transcript.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("IMAGE_BUILD", ROOT / "var" / "image-build")).resolve()
TRANSCRIPT = Path(os.environ.get("IMAGE_TRANSCRIPT", BUILD / "qemu-transcript.txt"))
PALISADE = ROOT / ".venv" / "bin" / "palisade"
IMAGE_CONFIG = ROOT / "images" / "os" / "appliance-image.toml"
BOOT_QEMU = ROOT / "images" / "os" / "boot-qemu.sh"
BOOT_TIMEOUT = 900.0  # QEMU's software emulation on a shared 2-core machine
DEMO_KEY = re.compile(r"palisade-demo-key: (pal-sk-[A-Za-z0-9_-]+)")


def log(text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)  # noqa: T201 - the lane's progress on `make image-test`
    with TRANSCRIPT.open("a") as transcript:
        transcript.write(line + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Guest:
    """One QEMU process (a node's power-on to power-off, reboots included)."""

    process: subprocess.Popen[bytes]
    serial: Path
    port: int
    started: float = field(default_factory=time.monotonic)

    def console(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None  # a reaped exit, not `kill -0` (zombies pass it)

    def wait_console(self, pattern: str, *, after: int = 0, timeout: float = BOOT_TIMEOUT) -> int:
        """Wait for `pattern` on the console past offset `after`; the offset past the match."""

        def seen() -> int | None:
            assert self.alive(), f"QEMU exited:\n{self.console()[-3000:]}"
            match = re.compile(pattern).search(self.console(), after)
            return match.end() if match else None

        return wait_for(seen, timeout=timeout, interval=1.0)

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()  # a power cut: the boot state is fsynced, data is ext4
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def boot(disk: Path, serial: Path, inbox: Path | None = None) -> Guest:
    serial.unlink(missing_ok=True)
    port = free_port()
    command = [str(BOOT_QEMU), str(disk), str(BUILD / "grub.lnx"), str(port)]
    command += [str(inbox) if inbox else "", str(serial)]
    log(f"power on: {' '.join(command[1:])}")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    return Guest(process=process, serial=serial, port=port)


def status(disk: Path) -> dict[str, Any]:
    result = subprocess.run(
        [str(PALISADE), "image", "status", "--disk", str(disk), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def summary(report: dict[str, Any]) -> str:
    slots = " ".join(
        f"{name}={info['version']}/{info['state']}/ok={int(info['committed'])}/try={info['tries']}"
        for name, info in report["slots"].items()
    )
    return (
        f"booted={report['booted_slot']} order={''.join(report['order'])} {slots} "
        f"min={report['min_version']}"
    )


def wait_state(disk: Path, what: str, condition: Any, guest: Guest) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        assert guest.alive(), f"QEMU exited:\n{guest.console()[-3000:]}"
        report = status(disk)
        return report if condition(report) else None

    report = wait_for(reached, timeout=BOOT_TIMEOUT, interval=3.0)
    log(f"{what}: {summary(report)}")
    return report


def first_token(guest: Guest, key: str) -> tuple[str, float]:
    """Ask the appliance through the port forward with the openai SDK: the answer and the
    seconds from power-on to its first token."""
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{guest.port}/v1", api_key=key, max_retries=0, timeout=600
    )  # generous: llama.cpp's AVX2 code runs on QEMU's software emulation

    def answered() -> tuple[str, float] | None:
        assert guest.alive(), f"QEMU exited:\n{guest.console()[-3000:]}"
        try:
            stream = client.chat.completions.create(
                model="smollm2-135m-instruct",
                messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=4,
                stream=True,
            )
            first: float | None = None
            text = ""
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.monotonic()
                    text += chunk.choices[0].delta.content
        except openai.APIError:
            return None  # not up yet (the forward accepts before the guest listens)
        return (text, first - guest.started) if first else None

    try:
        return wait_for(answered, timeout=BOOT_TIMEOUT, interval=2.0)
    finally:
        client.close()


def demo_key(guest: Guest) -> str:
    end = guest.wait_console(DEMO_KEY.pattern)
    match = DEMO_KEY.search(guest.console(), 0, end)
    assert match is not None
    return match[1]


def build_bundle(version: str, config: Path) -> Path:
    out = BUILD / f"palisade-{version}.pimg"
    base_stamp = BUILD / "base.stamp"
    if out.exists() and out.stat().st_mtime > base_stamp.stat().st_mtime:
        return out
    started = time.monotonic()
    subprocess.run(
        [
            str(PALISADE),
            "image",
            "build",
            str(config),
            "--version",
            version,
            "--out",
            str(out),
            "--key",
            str(BUILD / "release.key"),
        ],
        check=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": "1767225600"},
        timeout=1800,
    )
    log(f"built {out.name} ({out.stat().st_size} bytes) in {time.monotonic() - started:.0f} s")
    return out


def broken_config(work: Path) -> Path:
    """v3's image config: the same image, but its node config names a missing model."""
    template = work / "broken-appliance.toml.tmpl"
    shipped = (ROOT / "images" / "os" / "appliance.toml.tmpl").read_text()
    template.write_text(shipped.replace("SmolLM2-135M-Instruct.Q4_1.gguf", "missing.gguf"))
    image = tomllib.loads(IMAGE_CONFIG.read_text())

    def place(relative: str) -> str:
        return str((IMAGE_CONFIG.parent / relative).resolve())

    rootfs = image["rootfs"]
    config = work / "broken-image.toml"
    config.write_text(
        f'[image]\ncompatible = "{image["image"]["compatible"]}"\n'
        f'region = "{image["image"]["region"]}"\n'
        f'[rootfs]\nwheels = "{place(rootfs["wheels"])}"\nbase = "{place(rootfs["base"])}"\n'
        f'units = "{place(rootfs["units"])}"\n'
        f'[[models]]\npath = "{place(image["models"][0]["path"])}"\n'
        f'[node]\ntemplate = "{template}"\n'
    )
    return config


def inbox_disk(bundle: Path, work: Path) -> Path:
    """A read-only disk for the guest's inbox unit, holding `bundle`."""
    contents = work / f"inbox-{bundle.stem}"
    contents.mkdir()
    shutil.copyfile(bundle, contents / bundle.name)
    image = work / f"inbox-{bundle.stem}.ext4"
    size_kib = bundle.stat().st_size * 5 // 4 // 1024 + 32 * 1024
    subprocess.run(
        [
            "/usr/sbin/mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "PALISADE-INBOX",
            "-d",
            str(contents),
            str(image),
            f"{size_kib}k",
        ],
        check=True,
        timeout=300,
    )
    shutil.rmtree(contents)
    return image


@dataclass
class Lane:
    work: Path
    disk: Path
    key: str = ""
    steps_done: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def lane(tmp_path_factory: pytest.TempPathFactory) -> Lane:
    for needed in ("disk.img", "grub.lnx", "release.key", "base.stamp"):
        if not (BUILD / needed).exists():
            pytest.fail(f"{BUILD / needed} is missing: run `make appliance-image` first")
    work = tmp_path_factory.mktemp("image-lane")
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(BUILD / "disk.img"), str(disk)], check=True)
    log(f"lane: {disk} from {BUILD / 'disk.img'}: {summary(status(disk))}")
    return Lane(work=work, disk=disk)


def test_v1_boots_answers_the_openai_sdk_and_commits(lane: Lane) -> None:
    guest = boot(lane.disk, lane.work / "console-1.txt")
    try:
        guest.wait_console(r"palisade: booting slot A \(trial=1\)")
        lane.key = demo_key(guest)
        text, seconds = first_token(guest, lane.key)
        log(f"v1: first token {seconds:.1f} s after power-on; answer {text!r}")
        report = wait_state(
            lane.disk, "v1 committed", lambda r: r["slots"]["A"]["committed"], guest
        )
        assert report["booted_slot"] == "A"
        assert report["slots"]["A"]["version"] == "1.0.0"
        assert report["min_version"] == "1.0.0"
    finally:
        guest.stop()
        log("console of boot 1:\n" + guest.console())
    lane.steps_done.append("v1")


def test_v2_flashed_from_inside_the_guest_boots_on_trial_and_commits(lane: Lane) -> None:
    assert "v1" in lane.steps_done, "the v1 step did not pass"
    v2 = build_bundle("2.0.0", IMAGE_CONFIG)
    guest = boot(lane.disk, lane.work / "console-2.txt", inbox_disk(v2, lane.work))
    try:
        at = guest.wait_console(r"palisade-inbox: flashing palisade-2\.0\.0\.pimg")
        at = guest.wait_console(r"palisade: booting slot B \(trial=1\)", after=at)
        report = wait_state(
            lane.disk,
            "v2 committed",
            lambda r: r["booted_slot"] == "B" and r["slots"]["B"]["committed"],
            guest,
        )
        assert report["slots"]["B"]["version"] == "2.0.0"
        assert report["min_version"] == "2.0.0"
        assert report["order"] == ["B", "A"]
        text, _ = first_token(guest, lane.key)
        log(f"v2 answers: {text!r}")
    finally:
        guest.stop()
        log("console of boot 2:\n" + guest.console())
    lane.steps_done.append("v2")


def test_v3_that_cannot_start_rolls_back_to_v2_by_itself(lane: Lane) -> None:
    assert "v2" in lane.steps_done, "the v2 step did not pass"
    v3 = build_bundle("3.0.0", broken_config(lane.work))
    guest = boot(lane.disk, lane.work / "console-3.txt", inbox_disk(v3, lane.work))
    try:
        at = guest.wait_console(r"palisade-inbox: flashing palisade-3\.0\.0\.pimg")
        at = guest.wait_console(r"palisade: booting slot A \(trial=1\)", after=at)
        at = guest.wait_console(r"palisade: booting slot B \(trial=0\)", after=at)
        report = wait_state(
            lane.disk,
            "back on v2",
            lambda r: r["booted_slot"] == "B" and r["slots"]["A"]["state"] == "bad",
            guest,
        )
        assert report["slots"]["A"]["version"] == "3.0.0"
        assert not report["slots"]["A"]["bootable"]
        assert (
            report["slots"]["B"] | {"committed": True, "version": "2.0.0"} == report["slots"]["B"]
        )
        assert report["min_version"] == "2.0.0"
        text, _ = first_token(guest, lane.key)
        log(f"v2 answers again after the rollback: {text!r}")
    finally:
        guest.stop()
        log("console of boot 3:\n" + guest.console())
