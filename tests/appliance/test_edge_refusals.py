"""Rows the router refuses: the appliance forgets them, never sends them again, and says so
once in its log.

As in test_edge: the appliance's `EdgeGate` talks to the router's real `EdgeLeases` through
an in-process link. The node's snapshot (an old one, or one an attacker wrote) lets org
`usco` run in eu-west; the router knows usco only in us-east, so it refuses those rows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest

from federation import FLEET_POLICY_VIA, OrgPolicy, Principal
from federation._private.admin_wire import OrgCreate
from tests.appliance.test_edge import (
    FLEET_KEY,
    MONTH,
    ORG,
    Clock,
    Link,
    Policy,
    admit,
    crash,
    open_edge,
    open_router,
    router_totals,
    run,
    settle,
    snapshot,
)

FOREIGN = "usco"
FOREIGN_KEY = Principal(org=FOREIGN, user="usr_2", key_id="key_1", via=FLEET_POLICY_VIA)


def lenient_snapshot() -> Policy:
    """The node's policy, which (unlike the router's) allows usco in eu-west."""
    current = snapshot()
    usco = OrgPolicy(name=FOREIGN, regions=["eu-west"], logging_mode="metadata", budget_tokens=None)
    return Policy(msgspec.structs.replace(current, orgs=[*current.orgs, usco]))


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "palisade.appliance.edge" and "refused" in record.getMessage()
    ]


def test_refused_rows_are_dropped_logged_once_and_never_sent_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="palisade.appliance.edge")

    async def body() -> None:
        clock = Clock()
        router = await open_router(tmp_path / "router", clock)
        try:
            await router.store.create_org(OrgCreate(name=FOREIGN, regions=["us-east"]), "system")
            link = Link(router.leases)
            edge = open_edge(tmp_path / "edge", link, clock, policy=lenient_snapshot())
            await edge.prepare(FLEET_KEY, 100)
            settle(edge, admit(edge, 100, "own-1"), 40)
            foreign = edge.admit(FOREIGN_KEY, 30, request_id="usco-1", model="m", audit=None)
            edge.settle(
                foreign,
                model="m",
                input_tokens=30,
                output_tokens=0,
                status="ok",
                cost=0.0,
                audit={"id": "usco-1", "org": FOREIGN, "status": "ok"},
            )
            assert set(edge.ledger.unacked) == {"own-1", "usco-1"}

            assert await edge.sync() == 2  # both answered: one counted, one refused
            assert edge.ledger.unacked == {}
            assert await router_totals(router) == {"own-1": 40}
            assert await router.store.usage_records(FOREIGN) == []
            [line] = refusal_lines(caplog)
            assert "1 usage rows (30 tokens)" in line
            assert "usco: residency_violation" in line

            assert await edge.sync() == 0  # nothing left to send, nothing logged again
            crash(edge)  # and a restarted node does not send them either
            edge = open_edge(tmp_path / "edge", link, clock, policy=lenient_snapshot())
            assert edge.ledger.unacked == {}
            assert await edge.sync() == 0
            assert len(refusal_lines(caplog)) == 1
            events = [e.event for e in await router.store.audit_events(None)]
            assert events.count("edge_usage_refused") == 1
            assert router.gate.budget_state(ORG)[:2] == (MONTH, 40)
            edge.ledger.stop()
        finally:
            await router.close()

    run(body)
