"""`palisade image supervise` with real processes: the real appliance (fronting a stand-in
OpenAI upstream, so that it starts in seconds) booted from a disk image's slots.

A healthy trial is committed after its window; a slot whose appliance cannot start is tried,
marked bad, and the node comes back on the old slot by itself; MIN_VERSION moves only at a
commit; every install, boot, commit and rollback ends up in the appliance's audit log, which
`palisade audit verify` accepts.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from compliance import Scope, build_export, read_entries
from federation import NodeIdentity
from images import NodeImage, read_events
from images._private.bootstate import BootState
from tests.e2e.fleet import upstream_toml
from tests.images.bundles import REGION, make_bundle
from tests.standin import RunningStandin, run_standin
from tests.support import REPO, run_palisade, stop, wait_for

BROKEN_TEMPLATE = f'region = "{REGION}"\n[[models]]\nid = "gone"\npath = "models/missing.gguf"\n'


@dataclass
class Supervised:
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.output)


@dataclass
class Device:
    root: Path
    standin: RunningStandin

    @property
    def disk(self) -> Path:
        return self.root / "disk.img"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def node(self) -> NodeImage:
        return NodeImage(self.disk, self.data)

    def template(self) -> str:
        return f'region = "{REGION}"\n' + upstream_toml(self.standin, "cpu")

    def flash(self, version: str, template: str | None = None, *, init: bool = False) -> None:
        bundle, trust = make_bundle(self.root, version=version, config_template=template)
        args = ["--target", str(self.disk), "--trust", str(trust), "--data", str(self.data)]
        if init:
            args += ["--init", "--slot-size", "8M", "--data-size", "8M"]
        result = run_palisade("image", "flash", str(bundle), *args)
        assert result.returncode == 0, result.stderr

    def state(self) -> BootState:
        return self.node.state()

    @contextmanager
    def supervise(self) -> Iterator[Supervised]:
        command = [
            sys.executable, "-m", "palisade", "image", "supervise",
            "--disk", str(self.disk), "--data", str(self.data),
            "--window", "1", "--deadline", "30", "--grace", "5",
            "--", sys.executable, "-m", "palisade", "appliance", "serve",
            "--config", "{config}", "--port", "0",
        ]  # fmt: skip
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        supervised = Supervised(process)

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                supervised.output.append(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            yield supervised
        finally:
            stop(process)
            reader.join(timeout=10)
            if process.stdout is not None:
                process.stdout.close()

    def wait(self, supervised: Supervised, condition: Callable[[BootState], bool]) -> BootState:
        def check() -> BootState | None:
            if supervised.process.poll() is not None:
                raise RuntimeError("supervise exited:\n" + supervised.text())
            state = self.state()
            return state if condition(state) else None

        try:
            return wait_for(check, timeout=45, interval=0.1)
        except TimeoutError:
            raise AssertionError(supervised.text()) from None


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    with run_standin() as standin:
        yield Device(tmp_path, standin)


def test_supervise_commits_a_healthy_slot_and_falls_back_from_a_broken_one(
    device: Device,
) -> None:
    device.flash("1.0.0", device.template(), init=True)
    with device.supervise() as supervised:
        state = device.wait(supervised, lambda s: s.a.ok)
        assert (state.booted_slot, state.min_version) == ("A", "1.0.0")

        device.flash("2.0.0", device.template())
        assert device.state().min_version == "1.0.0"  # the install does not move it
        supervised.process.send_signal(signal.SIGHUP)  # reboot into it
        state = device.wait(supervised, lambda s: s.b.ok)
        assert (state.booted_slot, state.min_version, state.order) == ("B", "2.0.0", ("B", "A"))

        device.flash("3.0.0", BROKEN_TEMPLATE)
        supervised.process.send_signal(signal.SIGHUP)
        state = device.wait(
            supervised, lambda s: s.a.status == "bad" and s.booted_slot == "B" and s.b.ok
        )
        assert (state.order, state.min_version, state.a.version) == (("B", "A"), "2.0.0", "3.0.0")
        assert "marked slot A bad: the appliance exited during its trial boot" in supervised.text()
        # Back on 2.0.0 by itself, serving; the appliance copies the events into its audit log.
        url = wait_for(lambda: last_url(supervised))
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, timeout=20)
        wait_for(lambda: len(audit_rows(device.data)) >= len(read_events(device.data)), timeout=20)

        supervised.process.send_signal(signal.SIGTERM)
        assert supervised.process.wait(timeout=20) == 0
    with pytest.raises(httpx.TransportError):  # SIGTERM stopped the appliance too
        httpx.get(f"{url}/readyz", timeout=5)

    events = [(e.event, e.slot, e.version) for e in read_events(device.data)]
    assert events == [
        ("image.install", "A", "1.0.0"),
        ("image.boot", "A", "1.0.0"),
        ("image.commit", "A", "1.0.0"),
        ("image.install", "B", "2.0.0"),
        ("image.boot", "B", "2.0.0"),
        ("image.commit", "B", "2.0.0"),
        ("image.install", "A", "3.0.0"),
        ("image.boot", "A", "3.0.0"),
        ("image.mark_bad", "A", "3.0.0"),
        ("image.boot", "B", "2.0.0"),
    ]
    rows = audit_rows(device.data)
    assert [(r["event"], r["payload"]["slot"], r["payload"]["version"]) for r in rows] == events
    assert_audit_verifies(device.data, device.root / "export.json")


def last_url(supervised: Supervised) -> str | None:
    """The URL the appliance of the latest boot printed (None until it has)."""
    text = supervised.text()
    boots = list(re.finditer(r"boot \d+: slot", text))
    found = re.search(r"listening on (https?://\S+)", text[boots[-1].end() :]) if boots else None
    return found[1] if found else None


def audit_rows(home: Path) -> list[dict[str, Any]]:
    db = home / "audit.db"
    if not db.exists():
        return []
    rows = [json.loads(body) for body in read_entries(db)]
    return [row for row in rows if str(row.get("event", "")).startswith("image.")]


def assert_audit_verifies(home: Path, export: Path) -> None:
    identity = NodeIdentity.load_or_create(home)
    body = build_export(home / "audit.db", identity, origin="appliance-local", scope=Scope())
    export.write_bytes(body)
    result = run_palisade("audit", "verify", str(export), "--trusted-key", f"@{home / 'node.pub'}")
    assert result.returncode == 0, result.stdout + result.stderr
