"""Fleet rollouts without sockets: batches, what stops a rollout, what a hostile node cannot
do, and that it all survives a router restart (`RolloutBook` on an injected clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation import APIError, FleetNode, FleetStatus, ImageReport, RolloutOutcome
from router._private.rollout import RolloutBook, with_images

V1, V2 = "1.0.0", "2.0.0"
DIGEST = "ab" * 32
BUNDLE = "cd" * 32
EU = ["n1", "n2", "n3"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def book(tmp_path: Path) -> RolloutBook:
    return RolloutBook(tmp_path, Clock())


def start(book: RolloutBook, nodes: list[str] = EU, *, batch: int = 1, region: str = "eu") -> str:
    rollout_id = book.new_id()
    book.create(
        rollout_id,
        region=region,
        version=V2,
        sha256=BUNDLE,
        size=4096,
        batch=batch,
        nodes=nodes,
        created_by="admin",
    )
    return rollout_id


def report(
    version: str, rollout: str | None = None, state: str = "committed", *, committed: bool = True
) -> ImageReport:
    outcome = None
    if rollout is not None:
        outcome = RolloutOutcome(rollout=rollout, state=state, detail=f"{state} here")  # type: ignore[arg-type]
    return ImageReport(
        version=version, slot="B", digest=DIGEST, committed=committed, outcome=outcome
    )


def offered(book: RolloutBook, region: str = "eu", nodes: list[str] = EU) -> list[str]:
    return [node for node in nodes if book.next_for(node, region) is not None]


def steps(book: RolloutBook, rollout_id: str) -> dict[str, str]:
    return {node.node_id: node.step for node in book.get(rollout_id).nodes}


def refused(code: str, call: object, *args: object) -> None:
    assert callable(call)
    with pytest.raises(APIError) as caught:
        call(*args)
    assert caught.value.code == code, caught.value.message


def test_batches_of_one_offer_each_node_in_turn_until_all_commit(book: RolloutBook) -> None:
    rollout_id = start(book)
    for position, node in enumerate(EU):
        assert offered(book) == [node]
        offer = book.next_for(node, "eu")  # asking again is the same offer
        assert offer is not None
        assert (offer.rollout, offer.version, offer.sha256) == (rollout_id, V2, BUNDLE)
        assert book.report(node, "eu", report(V2, rollout_id, "trial", committed=False)) is None
        assert offered(book) == [node]  # a node on trial still holds its batch
        ended = book.report(node, "eu", report(V2, rollout_id))
        rollout = book.get(rollout_id)
        assert rollout.done == position + 1
        assert rollout.total == len(EU)
        assert (ended is not None) == (node == EU[-1])
    rollout = book.get(rollout_id)
    assert rollout.state == "completed"
    assert set(steps(book, rollout_id).values()) == {"committed"}
    assert offered(book) == []


def test_a_batch_of_two_waits_for_both_before_the_third(book: RolloutBook) -> None:
    rollout_id = start(book, batch=2)
    assert offered(book) == ["n1", "n2"]
    book.report("n1", "eu", report(V2, rollout_id))
    assert offered(book) == ["n2"]
    book.report("n2", "eu", report(V2, rollout_id))
    assert offered(book) == ["n3"]


def test_a_rollback_stops_the_rollout_and_the_rest_are_never_offered(book: RolloutBook) -> None:
    rollout_id = start(book)
    assert offered(book) == ["n1"]
    book.report("n1", "eu", report(V2, rollout_id, "installing", committed=False))
    ended = book.report("n1", "eu", report(V1, rollout_id, "rolled_back"))
    assert ended is not None
    assert ended.state == "stopped"
    assert "n1" in ended.reason
    assert "rolled_back" in ended.reason
    assert offered(book) == []
    assert steps(book, rollout_id) == {"n1": "rolled_back", "n2": "pending", "n3": "pending"}
    refused("rollout_not_running", book.bundle_for, "n1", rollout_id)
    refused("update_not_offered", book.bundle_for, "n2", rollout_id)
    # The node's later reports are still recorded; the rollout stays stopped.
    book.report("n1", "eu", report(V1))
    assert book.images()["n1"].version == V1
    assert book.get(rollout_id).state == "stopped"


def test_a_failed_install_stops_it_too(book: RolloutBook) -> None:
    rollout_id = start(book)
    offered(book)
    book.report("n1", "eu", report(V1, rollout_id, "failed"))
    assert book.get(rollout_id).state == "stopped"
    assert offered(book) == []


def test_a_node_already_running_the_version_counts_as_done(book: RolloutBook) -> None:
    book.report("n1", "eu", report(V2))
    book.report("n2", "eu", report(V2, committed=False))  # on trial: not done
    rollout_id = start(book)
    assert steps(book, rollout_id)["n1"] == "current"
    assert offered(book) == ["n2"]
    everyone = start(book, ["n1"], region="us")
    assert book.get(everyone).state == "completed"


def test_a_commit_without_an_outcome_counts_for_an_offered_node(book: RolloutBook) -> None:
    rollout_id = start(book)
    offered(book)
    book.report("n1", "eu", report(V2))
    assert steps(book, rollout_id)["n1"] == "committed"
    assert offered(book) == ["n2"]


def test_a_node_that_got_the_version_meanwhile_is_not_waited_for(book: RolloutBook) -> None:
    rollout_id = start(book)
    offered(book)
    book.report("n2", "eu", report(V2, committed=False))  # on trial: still to be offered
    assert steps(book, rollout_id)["n2"] == "pending"
    book.report("n2", "eu", report(V2))  # flashed by hand and committed, before its batch
    assert steps(book, rollout_id)["n2"] == "current"
    book.report("n1", "eu", report(V2, rollout_id))
    assert offered(book) == ["n3"]


def test_a_late_report_does_not_undo_a_commit(book: RolloutBook) -> None:
    rollout_id = start(book)
    offered(book)
    book.report("n1", "eu", report(V2, rollout_id))
    book.report("n1", "eu", report(V2, rollout_id, "trial", committed=False))
    assert steps(book, rollout_id)["n1"] == "committed"
    assert offered(book) == ["n2"]


def test_a_node_cannot_speak_for_a_rollout_it_was_not_offered(book: RolloutBook) -> None:
    rollout_id = start(book)
    offered(book)
    refused("update_not_offered", book.report, "n2", "eu", report(V2, rollout_id))
    refused("update_not_offered", book.report, "n2", "eu", report(V1, rollout_id, "rolled_back"))
    refused("update_not_offered", book.report, "n1", "eu", report(V2, "upd-unknown"))
    refused("update_not_offered", book.bundle_for, "n2", rollout_id)
    refused("update_not_offered", book.bundle_for, "n9", rollout_id)
    assert book.get(rollout_id).state == "running"
    assert "n2" not in book.images()  # a refused report records nothing
    assert book.bundle_for("n1", rollout_id) == book.bundle_path(rollout_id)


def test_a_commit_claim_must_match_what_the_node_runs(book: RolloutBook) -> None:
    rollout_id = start(book)
    offered(book)
    bad = [report(V1, rollout_id), report(V2, rollout_id, committed=False)]
    for claim in bad:
        refused("image_report_inconsistent", book.report, "n1", "eu", claim)
    assert steps(book, rollout_id)["n1"] == "offered"


def test_nodes_of_another_region_are_never_offered(book: RolloutBook) -> None:
    start(book)
    assert offered(book, "us", ["u1", "n1"]) == []


def test_one_running_rollout_per_region(book: RolloutBook) -> None:
    first = start(book)
    refused("rollout_in_progress", start, book)
    start(book, ["u1"], region="us")
    book.stop(first, "stopped by admin")
    start(book)
    refused("region_has_no_nodes", book.check_can_start, "ap", [])


def test_an_operator_stop_ends_offers_and_cannot_repeat(book: RolloutBook) -> None:
    rollout_id = start(book)
    offered(book)
    stopped = book.stop(rollout_id, "stopped by admin")
    assert (stopped.state, stopped.reason) == ("stopped", "stopped by admin")
    assert offered(book) == []
    refused("rollout_not_running", book.stop, rollout_id, "again")
    refused("rollout_not_found", book.get, "upd-none")


def test_a_revoked_node_does_not_hold_up_its_batch(book: RolloutBook) -> None:
    rollout_id = start(book)
    assert offered(book) == ["n1"]
    book.revoked("n1")
    assert steps(book, rollout_id)["n1"] == "revoked"
    assert offered(book) == ["n2"]


def test_rollouts_and_images_survive_a_restart(tmp_path: Path) -> None:
    book = RolloutBook(tmp_path, Clock())
    rollout_id = start(book)
    offered(book)
    book.report("n1", "eu", report(V2, rollout_id))
    again = RolloutBook(tmp_path, Clock())
    assert steps(again, rollout_id) == {"n1": "committed", "n2": "pending", "n3": "pending"}
    assert offered(again) == ["n2"]
    assert again.images()["n1"].version == V2
    assert [rollout.id for rollout in again.list()] == [rollout_id]
    assert (tmp_path / "fleet" / "rollouts.db").stat().st_mode & 0o077 == 0


def test_fleet_status_shows_each_nodes_image(book: RolloutBook) -> None:
    book.report("n1", "eu", report(V2, committed=False))
    rows = [_row("n1"), _row("n2")]
    status = with_images(FleetStatus(router_id="r", nodes=rows), book.images())
    first, second = status.nodes
    assert (first.image_version, first.image_committed, first.image_slot) == (V2, False, "B")
    assert second.image_version is None


def _row(node_id: str) -> FleetNode:
    return FleetNode(
        node_id=node_id,
        region="eu",
        url=f"https://{node_id}",
        device_classes=[],
        models=[],
        state="up",
        in_flight=0,
        queue_depth=0,
        ttft_p50_ms=None,
        heartbeat_age_s=0.0,
        version="0.1.0",
    )
