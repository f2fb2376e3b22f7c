"""The shared-membership merge policy (`Fleet.heard_elsewhere`): what a heartbeat another
router heard may change here, on an injected clock (no sockets, no database)."""

from __future__ import annotations

import msgspec
import pytest

from federation import Heartbeat, NodeModel
from router import Fleet, HealthConfig
from router._private.shared_members import SharedBeat

EU = frozenset({"eu-west"})
# HealthConfig's defaults: 1 s beats, down after 3 missed.
DOWN_AFTER_S = 3.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beat(
    node: str = "eu-1", *, sequence: int = 1, boot: str = "boot-1", queue: int = 0
) -> Heartbeat:
    served = NodeModel(
        id="m", device_class="gpu", context_length=2048, ready=True, queue_depth=queue
    )
    return Heartbeat(
        node_id=node,
        region="eu-west",
        url=f"https://{node}.test:1",
        version="t",
        models=[served],
        sequence=sequence,
        boot_id=boot,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(clock: Clock) -> Fleet:
    return Fleet(HealthConfig(), clock=clock)


def test_a_node_heard_only_elsewhere_joins_and_is_picked(fleet: Fleet, clock: Clock) -> None:
    node = fleet.heard_elsewhere(beat(), serial=42, age_s=0.4)
    assert node is not None
    assert fleet.state(node) == "up"
    assert node.serial == 42
    assert node.last_beat == pytest.approx(clock.now - 0.4)
    picked = fleet.pick("m", EU, ["gpu"])
    assert picked is not None
    assert picked.id == "eu-1"


def test_a_fresh_row_keeps_a_node_up_that_this_router_no_longer_hears(
    fleet: Fleet, clock: Clock
) -> None:
    fleet.beat(beat(sequence=1))
    for sequence in range(2, 12):
        clock.now += 1.0
        fleet.heard_elsewhere(beat(sequence=sequence), serial=0, age_s=0.3)
        assert fleet.sweep() == []
    assert fleet.state(fleet.nodes["eu-1"]) == "up"


def test_rows_going_stale_let_the_node_go_down(fleet: Fleet, clock: Clock) -> None:
    fleet.heard_elsewhere(beat(), serial=0, age_s=0.0)
    clock.now += DOWN_AFTER_S + 0.5
    # The same row read again is older now: it refreshes nothing.
    assert fleet.heard_elsewhere(beat(), serial=0, age_s=DOWN_AFTER_S + 0.5) is None
    down = fleet.sweep()
    assert [node.id for node in down] == ["eu-1"]


def test_a_row_older_than_the_down_limit_never_registers(fleet: Fleet) -> None:
    assert fleet.heard_elsewhere(beat(), serial=0, age_s=DOWN_AFTER_S + 0.1) is None
    assert fleet.nodes == {}


def test_figures_change_only_with_a_newer_sequence(fleet: Fleet, clock: Clock) -> None:
    fleet.beat(beat(sequence=5, queue=1))
    clock.now += 1.0
    node = fleet.heard_elsewhere(beat(sequence=4, queue=9), serial=0, age_s=0.1)
    assert node is not None
    assert node.models["m"].queue_depth == 1
    assert node.last_beat == pytest.approx(clock.now - 0.1)
    clock.now += 1.0
    node = fleet.heard_elsewhere(beat(sequence=6, queue=7), serial=0, age_s=0.1)
    assert node is not None
    assert node.models["m"].queue_depth == 7


def test_a_row_older_than_the_last_beat_heard_here_changes_nothing(
    fleet: Fleet, clock: Clock
) -> None:
    fleet.beat(beat(sequence=1, queue=1))
    clock.now += 0.2
    assert fleet.heard_elsewhere(beat(sequence=9, queue=5), serial=0, age_s=0.5) is None
    assert fleet.nodes["eu-1"].models["m"].queue_depth == 1


def test_an_older_row_never_brings_back_a_previous_process(fleet: Fleet, clock: Clock) -> None:
    fleet.beat(beat(boot="boot-1"))
    clock.now += 1.0
    fleet.beat(beat(boot="boot-2"))  # restarted, heard here
    restarts = fleet.nodes["eu-1"].restarts
    clock.now += 0.1
    # Another router's row from before the restart.
    assert fleet.heard_elsewhere(beat(boot="boot-1"), serial=0, age_s=0.9) is None
    assert fleet.nodes["eu-1"].boot_id == "boot-2"
    assert fleet.nodes["eu-1"].restarts == restarts


def test_a_restart_heard_elsewhere_is_a_restart_here(fleet: Fleet, clock: Clock) -> None:
    fleet.beat(beat(boot="boot-1", sequence=30))
    clock.now += 1.0
    node = fleet.heard_elsewhere(beat(boot="boot-2", sequence=1), serial=0, age_s=0.2)
    assert node is not None
    assert node.boot_id == "boot-2"
    assert node.restarts == 1
    assert fleet.state(node) == "ejected"  # waits for its half-open probe, as a restart does


def test_a_node_down_here_comes_back_with_a_newer_row(fleet: Fleet, clock: Clock) -> None:
    fleet.beat(beat(sequence=1))
    clock.now += DOWN_AFTER_S + 1.0
    assert [node.id for node in fleet.sweep()] == ["eu-1"]
    node = fleet.heard_elsewhere(beat(sequence=2), serial=0, age_s=0.1)
    assert node is not None
    assert not node.down
    assert fleet.state(node) == "ejected"  # back through the half-open probe


def test_the_stored_form_round_trips() -> None:
    stored = msgspec.json.encode(SharedBeat(heartbeat=beat(sequence=3), serial=7))
    decoded = msgspec.json.decode(stored, type=SharedBeat)
    assert decoded.serial == 7
    assert decoded.heartbeat.sequence == 3
    assert decoded.heartbeat.node_id == "eu-1"
