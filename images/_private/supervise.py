"""`palisade image supervise`: a software boot loader and init for a node without GRUB (the
local fleet, the tests).

Each "boot" does what GRUB and the device's units do: pick the slot by the boot model
(`select_slot`, saving the decremented try counter before anything starts, as GRUB's
`save_env` does), let the agent record and assess the boot, start the appliance with that
slot's config (`{config}` in the command = `DATA/image/slots/<S>/appliance.toml`, with
`PALISADE_HOME=DATA`), and watch a trial boot's health window. A failed trial marks the
slot bad and "reboots": the appliance gets SIGTERM (SIGKILL after a grace period) and the
next boot picks again. A committed boot runs until the appliance exits (then it reboots,
as a watchdog would) or an update is installed. SIGHUP reboots at once (say, after a flash
by hand); SIGTERM or SIGINT stops the appliance and ends the loop.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

from images._private.agent import (
    DEFAULT_DEADLINE_S,
    DEFAULT_POLL_S,
    DEFAULT_UPDATE_POLL_S,
    DEFAULT_WINDOW_S,
    ApplianceProbe,
    HealthWindow,
    NodeImage,
    Updater,
    probe_verify,
    watch_trial,
)
from images._private.boot import BootDecision, select_slot
from images._private.bootstate import BootState, Slot
from images._private.disk import update_boot_state
from images._private.errors import ImageError
from images._private.flash import slot_config_path

log = logging.getLogger("palisade.images.supervise")

CONFIG_PLACEHOLDER = "{config}"
_LISTENING = re.compile(r"listening on (?P<url>https?://\S+)")


@dataclass(frozen=True)
class SuperviseOptions:
    window_s: float = DEFAULT_WINDOW_S
    deadline_s: float = DEFAULT_DEADLINE_S
    max_boots: int | None = None  # stop after this many boots (tests)
    grace_s: float = 10.0  # SIGTERM → SIGKILL
    poll_s: float = DEFAULT_POLL_S
    reboot_delay_s: float = 1.0  # between boots: a slot that cannot start never spins
    update_poll_s: float = DEFAULT_UPDATE_POLL_S
    router_url: str | None = None


class Appliance:
    """The appliance process of one boot, its output passed through and its URL noted."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.url: str | None = None
        try:
            self.process = subprocess.Popen(  # noqa: S603 - the operator's own command
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,  # its own process group: a reboot stops all of it
            )
        except OSError as exc:
            raise ImageError(
                f"Cannot start the appliance command {command[0]!r}: {exc.strerror or exc}.",
                code="command_failed",
            ) from None
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if self.url is None and (found := _LISTENING.search(line)):
                self.url = found["url"]
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except (OSError, ValueError):
                continue  # nobody reads our output: keep draining the appliance's

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float) -> int:
        """SIGTERM to its process group, SIGKILL after `grace_s`; returns the exit code."""
        if self.alive:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("the appliance ignored SIGTERM for %.0f s; killing it", grace_s)
                self._signal(signal.SIGKILL)
        code = self.process.wait()
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def _signal(self, signum: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            return


class Supervisor:
    def __init__(self, node: NodeImage, command: list[str], options: SuperviseOptions) -> None:
        if command and shutil.which(command[0]) is None:
            raise ImageError(
                f"The appliance command {command[0]!r} is not an executable (nothing was "
                "booted); give its path, e.g. `-- palisade appliance serve --config {config}`.",
                code="command_not_found",
            )
        self.node = node
        self.command = command
        self.options = options
        self.stop = threading.Event()  # SIGTERM/SIGINT: end the loop
        self.wake = threading.Event()  # set with `stop`, or by SIGHUP: end this boot
        self.boots = 0
        self.updater = Updater.for_node(node, options.router_url)

    def run(self) -> int:
        """Boot until stopped (or `max_boots`); returns the exit code."""
        self._handle_signals()
        limit = self.options.max_boots
        while not self.stop.is_set() and (limit is None or self.boots < limit):
            if self.boots and self.stop.wait(self.options.reboot_delay_s):
                break
            self.wake.clear()
            self.boots += 1
            self.boot_once()
        if self.updater is not None:
            self.updater.channel.close()
        return 0

    def _handle_signals(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping the appliance", signum)
            self.stop.set()
            self.wake.set()

        def reboot(_signum: int, _frame: FrameType | None) -> None:
            log.info("SIGHUP: rebooting")
            self.wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reboot)

    def select(self) -> BootDecision:
        """The boot loader's choice, its decremented try counter saved first (GRUB's
        save_env before it loads the kernel)."""
        chosen: list[BootDecision] = []

        def choose(state: BootState) -> BootState:
            chosen.append(select_slot(state))
            return chosen[-1].new_state

        update_boot_state(self.node.disk, choose)
        return chosen[-1]

    def boot_once(self) -> None:
        decision = self.select()
        slot = decision.slot
        kind = "trial" if decision.trial else "committed"
        log.info("boot %d: slot %s (%s)", self.boots, slot, kind)
        assessment = self.node.boot(slot)
        self._report(slot)
        appliance = Appliance(self._command(slot), self._environment())
        probe = ApplianceProbe(lambda: appliance.url, verify=probe_verify(self.node.data_dir))
        try:
            if assessment.outcome == "trial" and not self._trial(slot, appliance, probe):
                return
            self._run(slot, appliance)
        finally:
            probe.close()
            code = appliance.stop(self.options.grace_s)
            log.info(
                "boot %d: the appliance on slot %s ended (exit code %d)", self.boots, slot, code
            )

    def _trial(self, slot: Slot, appliance: Appliance, probe: ApplianceProbe) -> bool:
        """Watch the trial; True if committed (keep running), False to reboot or stop."""
        window = HealthWindow(window=self.options.window_s, deadline=self.options.deadline_s)
        verdict, reason = watch_trial(
            window,
            lambda: probe.look(alive=appliance.alive),
            stop=self.wake,
            poll_s=self.options.poll_s,
        )
        if verdict == "commit":
            self.node.commit(slot, reason)
            self._report(slot)
            return True
        if verdict == "fail":
            self.node.fail(slot, reason)
            self._report(slot)
        return False

    def _run(self, slot: Slot, appliance: Appliance) -> None:
        """A committed boot: until the appliance exits, an update waits, or a signal."""
        next_poll = time.monotonic()
        while not self.wake.wait(self.options.poll_s):
            if not appliance.alive:
                log.warning("the appliance exited (code %s); rebooting", appliance.process.poll())
                return
            if self.updater is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.options.update_poll_s
                if self.updater.check(slot):
                    log.info("an update was installed; rebooting into it")
                    return

    def _report(self, slot: Slot) -> None:
        if self.updater is not None:
            self.updater.report(slot)

    def _command(self, slot: Slot) -> list[str]:
        config = os.fspath(slot_config_path(self.node.data_dir, slot))
        return [part.replace(CONFIG_PLACEHOLDER, config) for part in self.command]

    def _environment(self) -> dict[str, str]:
        home = os.fspath(self.node.data_dir.resolve())
        return os.environ | {"PALISADE_HOME": home, "PYTHONUNBUFFERED": "1"}
