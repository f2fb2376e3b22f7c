"""The image agent on a real disk image: boot counting, rollback, commit, `mark-good`, and
the trial's health window (an injected clock)."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from images import (
    Health,
    HealthWindow,
    NodeImage,
    SuperviseOptions,
    Supervisor,
    TrustSet,
    Updater,
    read_events,
)
from images._private.flash import DiskSizes, flash_bundle
from tests.e2e.fleet import Fleet, running_fleet
from tests.images.bundles import REGION, make_bundle, release_key
from tests.support import run_palisade

HEALTHY = Health(alive=True, ready=True, joined=True)
MIB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the health window ------------------------------------------------------------------


def test_a_trial_commits_only_after_the_whole_window_healthy() -> None:
    clock = FakeClock()
    window = HealthWindow(window=10, deadline=30, clock=clock)
    assert window.observe(Health(alive=True, ready=False, joined=False))[0] == "waiting"
    clock.now += 5
    assert window.observe(HEALTHY)[0] == "waiting"  # healthy from t=105
    clock.now += 9.9
    assert window.observe(HEALTHY)[0] == "waiting"
    clock.now += 0.1
    assert window.observe(HEALTHY) == ("commit", "healthy for 10 s")


def test_a_lapse_restarts_the_window() -> None:
    clock = FakeClock()
    window = HealthWindow(window=10, deadline=30, clock=clock)
    window.observe(HEALTHY)
    clock.now += 8
    assert window.observe(Health(alive=True, ready=True, joined=False))[0] == "waiting"
    clock.now += 1
    assert window.observe(HEALTHY)[0] == "waiting"
    clock.now += 9
    assert window.observe(HEALTHY)[0] == "waiting"  # 9 s since the lapse, not 18
    clock.now += 1
    assert window.observe(HEALTHY)[0] == "commit"


def test_ready_but_never_joined_fails_at_the_deadline() -> None:
    clock = FakeClock()
    window = HealthWindow(window=10, deadline=30, clock=clock)
    unjoined = Health(alive=True, ready=True, joined=False)
    assert window.observe(unjoined)[0] == "waiting"
    clock.now += 29.9
    assert window.observe(unjoined)[0] == "waiting"
    clock.now += 0.1
    assert window.observe(unjoined) == ("fail", "not joined to its router for 30 s")


def test_an_exited_appliance_fails_at_once() -> None:
    window = HealthWindow(window=10, deadline=30, clock=FakeClock())
    verdict, reason = window.observe(Health(alive=False, ready=False, joined=False))
    assert verdict == "fail"
    assert "exited" in reason


# --- boot counting on a real disk --------------------------------------------------------


@dataclass
class Node:
    image: NodeImage
    supervisor: Supervisor
    trust: Path

    def boot(self) -> tuple[str, bool, str]:
        """One boot as the boot loader and the agent do it: (slot, trial, outcome)."""
        decision = self.supervisor.select()
        assessment = self.image.boot(decision.slot)
        return decision.slot, decision.trial, assessment.outcome

    def events(self) -> list[tuple[str, str, str]]:
        return [(e.event, e.slot, e.version) for e in read_events(self.image.data_dir)]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    """Version 1.0.0 committed in slot A, 2.0.0 just flashed into slot B (3 trial boots)."""
    disk, data = tmp_path / "disk.img", tmp_path / "data"
    v1, trust = make_bundle(tmp_path, version="1.0.0")
    v2, _ = make_bundle(tmp_path, version="2.0.0")
    trusted = TrustSet.load(trust)
    sizes = DiskSizes(slot=8 * MIB, data=8 * MIB)
    flash_bundle(v1, disk, trust=trusted, data_dir=data, init=True, sizes=sizes)
    image = NodeImage(disk, data)
    node = Node(image, Supervisor(image, [], SuperviseOptions()), trust)
    assert node.boot() == ("A", True, "trial")
    image.commit("A")
    flash_bundle(v2, disk, trust=trusted, data_dir=data)
    state = image.state()
    assert (state.order, state.b.tries, state.min_version) == (("B", "A"), 3, "1.0.0")
    return node


def test_three_trial_boots_without_commit_return_to_the_old_slot(node: Node) -> None:
    for _ in range(3):
        assert node.boot() == ("B", True, "trial")
    assert node.boot() == ("A", False, "rolled_back")
    state = node.image.state()
    assert (state.order, state.b.status, state.b.tries, state.booted_slot) == (
        ("A", "B"),
        "bad",
        0,
        "A",
    )
    assert state.min_version == "1.0.0"
    assert node.boot() == ("A", False, "committed")  # and it stays there
    assert node.events()[-3:] == [
        ("image.boot", "A", "1.0.0"),
        ("image.rollback", "B", "2.0.0"),
        ("image.boot", "A", "1.0.0"),
    ]


def test_a_commit_on_the_second_trial_boot_keeps_the_slot(node: Node) -> None:
    assert node.boot() == ("B", True, "trial")
    assert node.boot() == ("B", True, "trial")
    assert node.image.state().min_version == "1.0.0"  # not moved by the install or a boot
    node.image.commit("B", "healthy")
    state = node.image.state()
    assert (state.b.ok, state.b.status, state.min_version) == (True, "good", "2.0.0")
    for _ in range(4):
        assert node.boot() == ("B", False, "committed")
    assert ("image.commit", "B", "2.0.0") in node.events()


def test_a_failed_health_check_marks_the_slot_bad_and_boots_the_old_one(node: Node) -> None:
    assert node.boot() == ("B", True, "trial")
    node.image.fail("B", "the appliance exited during its trial boot")
    assert node.boot() == ("A", False, "committed")
    state = node.image.state()
    assert (state.b.status, state.min_version, state.booted_slot) == ("bad", "1.0.0", "A")
    assert node.events()[-2:] == [("image.mark_bad", "B", "2.0.0"), ("image.boot", "A", "1.0.0")]


def test_mark_good_commits_the_booted_slot(node: Node) -> None:
    assert node.boot() == ("B", True, "trial")
    disk, data = node.image.disk, node.image.data_dir
    result = run_palisade("image", "mark-good", "--disk", str(disk), "--data", str(data))
    assert result.returncode == 0, result.stderr
    assert "Committed slot B (2.0.0); minimum version now 2.0.0." in result.stdout
    state = node.image.state()
    assert (state.b.ok, state.b.status, state.min_version) == (True, "good", "2.0.0")
    assert node.events()[-1] == ("image.commit", "B", "2.0.0")
    assert node.boot() == ("B", False, "committed")


def test_mark_good_without_a_booted_slot_says_so(tmp_path: Path) -> None:
    bundle, trust = make_bundle(tmp_path)
    disk = tmp_path / "disk.img"
    sizes = DiskSizes(slot=8 * MIB, data=8 * MIB)
    flash_bundle(bundle, disk, trust=TrustSet.load(trust), init=True, sizes=sizes)
    result = run_palisade("image", "mark-good", "--disk", str(disk), "--data", str(tmp_path))
    assert result.returncode == 1
    assert "(no_booted_slot)" in result.stderr
    assert not NodeImage(disk, tmp_path).state().a.ok


# --- the update client against a real router -----------------------------------------------


def upload(fleet: Fleet, bundle: Path, version: str) -> str:
    """What `palisade fleet update` sends (without its own check of the bundle)."""
    body = bundle.read_bytes()
    params = {"region": REGION, "version": version, "sha256": hashlib.sha256(body).hexdigest()}
    headers = {"Authorization": f"Bearer {fleet.admin.key}"}
    url = f"{fleet.router.url}/admin/v1/fleet/updates"
    reply = httpx.post(url, content=body, params=params, headers=headers, timeout=30)
    assert reply.status_code == 201, reply.text
    rollout_id: str = reply.json()["id"]
    return rollout_id


def rollout_node(fleet: Fleet, rollout_id: str) -> tuple[str, str, str]:
    """(rollout state, the node's step, its detail)."""
    rollout = fleet.admin.ok("GET", f"/admin/v1/fleet/updates/{rollout_id}")
    (node,) = rollout["nodes"]
    return rollout["state"], node["step"], node["detail"]


def test_the_update_client_installs_only_what_its_node_trusts(tmp_path: Path) -> None:
    build = tmp_path / "build"
    with running_fleet(tmp_path) as fleet:
        home = fleet.enroll("eu-1", REGION)
        v1, trust = make_bundle(build, version="1.0.0")
        (home / "image").mkdir()
        shutil.copy(trust, home / "image" / "trust.json")
        disk = tmp_path / "disk.img"
        sizes = DiskSizes(slot=8 * MIB, data=8 * MIB)
        flash_bundle(v1, disk, trust=TrustSet.load(trust), data_dir=home, init=True, sizes=sizes)
        node = NodeImage(disk, home)
        node.boot("A")
        node.commit("A")
        updater = Updater.for_node(node)
        assert updater is not None
        assert updater.report("A") is True

        # Signed by a key the node does not pin: refused, reported, nothing written.
        rogue_key, _ = release_key(build, "rogue")
        rogue, _ = make_bundle(build, version="2.0.0", signing_key=rogue_key)
        rollout_id = upload(fleet, rogue, "2.0.0")
        before = node.state()
        assert updater.check("A") is False
        assert node.state() == before
        assert rollout_node(fleet, rollout_id) == ("stopped", "failed", "untrusted_key")

        # The router's stored copy changed after the upload: the download does not match.
        v2, _ = make_bundle(build, version="2.0.0")
        rollout_id = upload(fleet, v2, "2.0.0")
        stored = fleet.router.home / "fleet" / "updates" / f"{rollout_id}.pimg"
        data = bytearray(stored.read_bytes())
        data[-1] ^= 1
        stored.write_bytes(bytes(data))
        assert updater.check("A") is False
        assert node.state() == before
        assert rollout_node(fleet, rollout_id) == ("stopped", "failed", "download_mismatch")

        # A good one: installed into B on trial, reported, committed after its "reboot".
        v3, _ = make_bundle(build, version="3.0.0")
        rollout_id = upload(fleet, v3, "3.0.0")
        assert updater.check("A") is True
        state = node.state()
        assert (state.order, state.b.version, state.b.status) == (("B", "A"), "3.0.0", "trial")
        assert rollout_node(fleet, rollout_id) == ("running", "installed", "")
        assert updater.check("A") is True  # still waiting for its reboot: not installed again
        installs = [(e.slot, e.version) for e in read_events(home) if e.event == "image.install"]
        assert installs == [("B", "3.0.0")]
        decision = Supervisor(node, [], SuperviseOptions()).select()
        assert (decision.slot, decision.trial) == ("B", True)
        node.boot("B")
        assert updater.report("B") is True
        assert rollout_node(fleet, rollout_id) == ("running", "trial", "")
        assert updater.check("B") is False  # it runs the offered version on trial
        node.commit("B")
        assert updater.report("B") is True
        assert rollout_node(fleet, rollout_id) == ("completed", "committed", "")
        assert not (home / "image" / "rollout.json").exists()
        updater.channel.close()


def test_supervise_refuses_a_command_it_cannot_run_before_booting(node: Node) -> None:
    before = node.image.state()
    result = run_palisade(
        "image", "supervise", "--disk", str(node.image.disk), "--data", str(node.image.data_dir),
        "--", "/nonexistent/palisade", "appliance", "serve", "--config", "{config}",
    )  # fmt: skip
    assert result.returncode == 1
    assert "(command_not_found)" in result.stderr
    assert node.image.state() == before  # no try counted, nothing recorded


def test_the_agent_assesses_each_kernel_boot_once(node: Node) -> None:
    """A committed boot with `--once`: the decision, then exit. Run again on the same kernel
    boot (the unit restarted), it records nothing twice."""
    node.image.commit("B")
    disk, data = str(node.image.disk), str(node.image.data_dir)
    for _ in range(2):
        result = run_palisade(
            "image", "agent", "--disk", disk, "--data", data, "--slot", "B", "--once"
        )
        assert result.returncode == 0, result.stderr
    boots = [e for e in read_events(node.image.data_dir) if e.event == "image.boot"]
    assert [(e.slot, e.version, e.detail) for e in boots[-1:]] == [("B", "2.0.0", "committed")]
    assert len(boots) == 2  # the fixture's boot of A, and this one
    assert node.image.state().booted_slot == "B"
