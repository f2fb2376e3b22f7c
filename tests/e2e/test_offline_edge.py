"""The offline edge, end to end: a router and an enrolled appliance (real processes, mTLS on
every fleet hop), the router killed with SIGKILL.

Offline, the appliance keeps serving a valid fleet key from its last snapshot, refuses a
key revoked before the kill and a key of an org not allowed in its region, and never spends
more than the budget share it leased (a concurrent burst). It is SIGKILLed too, with
streams in flight, and started again, still offline. When the router is back, the usage it
counts for the appliance equals the appliance's own audit rows, to the token, each once;
and once the appliance is gone, `palisade fleet status` shows it down, offline since its
last heartbeat.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from compliance import read_entries
from federation import INTERRUPTED
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, running_fleet, upstream_toml
from tests.support import Server, run_palisade, start_server, wait_for

NODE, REGION = "edge-1", "eu-west"
ORG = "acme"
BUDGET = 8_000  # a lease asks for an eighth: the appliance holds 1,000 tokens when offline
MAX_TOKENS = 64
BURST = 40


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def chat(member: Server, key: str) -> httpx.Response:
    body = {
        "model": UPSTREAM_MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": MAX_TOKENS,
    }
    return httpx.post(
        f"{member.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        verify=member.verify,
        timeout=30,
    )


def serves(member: Server, key: str) -> bool:
    return chat(member, key).status_code == 200


def code_of(response: httpx.Response) -> str | None:
    if response.status_code == 200:
        return None
    code: str = response.json()["error"]["code"]
    return code


def readyz(member: Server) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(
        f"{member.url}/readyz", verify=member.verify, timeout=10
    ).json()
    return data


def share_of(member: Server) -> int:
    """The budget share the appliance holds for the org this month (its edge ledger)."""
    totals = [0]
    for line in (member.home / "edge.journal").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("t") == "l" and entry["org"] == ORG:
            totals.append(entry["total"])
    return max(totals)


def own_rows(member: Server) -> dict[str, int]:
    """The appliance's own record of what it served for the org: its audit log's rows."""
    rows: dict[str, int] = {}
    for body in read_entries(member.home / "audit.db"):
        entry = json.loads(body)
        if entry.get("kind") == "request" and entry.get("org") == ORG:
            assert entry["id"] not in rows, f"{entry['id']} twice in the appliance's audit log"
            rows[entry["id"]] = entry["input_tokens"] + entry["output_tokens"]
    return rows


def router_rows(fleet: Fleet) -> list[dict[str, Any]]:
    listing = fleet.admin.ok("GET", "/admin/v1/usage/records", org=ORG)
    return [row for row in listing["data"] if row["node"] == NODE]


def reconciled(fleet: Fleet, member: Server) -> bool:
    """Whether the router holds a usage row for every row of the appliance's audit log."""
    return {row["request_id"] for row in router_rows(fleet)} == set(own_rows(member))


def kill(server: Server) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=30)


def test_an_appliance_serves_offline_within_its_share_and_every_row_counts_once(
    tmp_path: Path,
) -> None:
    router_args = ("--port", str(free_port()), "--fleet-port", str(free_port()))
    with running_fleet(tmp_path, *router_args) as fleet:
        standin = fleet.standin("upstream", token_ms=60, tokens=8)
        config = upstream_toml(standin, "cpu")
        member = fleet.start_member(NODE, REGION, config)
        fleet.wait_joined(NODE)
        admin = fleet.admin
        admin.create_org(ORG, [REGION], budget=BUDGET)
        good = admin.member(ORG, "org_admin", "owner@acme.test").key
        doomed = admin.member(ORG, "org_user", "doomed@acme.test")
        foreign = fleet.org_key("usco", ["us-east"])
        wait_for(lambda: serves(member, good), timeout=30)  # the snapshot has reached it
        wait_for(lambda: serves(member, doomed.key), timeout=30)
        admin.ok("DELETE", f"/admin/v1/keys/{doomed.key_id}")
        wait_for(lambda: chat(member, doomed.key).status_code == 401, timeout=30)
        wait_for(lambda: reconciled(fleet, member), timeout=30)  # online: within a second

        # --- the router dies ---------------------------------------------------------------
        kill(fleet.router)
        wait_for(lambda: readyz(member).get("offline_since") is not None, timeout=30)
        lost_at = readyz(member)["offline_since"]
        assert chat(member, good).status_code == 200
        assert code_of(chat(member, doomed.key)) == "invalid_api_key"
        assert code_of(chat(member, foreign)) == "residency_violation"
        share = share_of(member)
        assert 0 < share < BUDGET

        # --- the appliance dies too, with streams in flight, and comes back offline --------
        started = threading.Barrier(4)
        streams = [
            threading.Thread(target=_stream_until_killed, args=(member, good, started))
            for _ in range(3)
        ]
        for thread in streams:
            thread.start()
        started.wait(timeout=30)
        kill(member)
        for thread in streams:
            thread.join(timeout=30)
        member = fleet.start_member(NODE, REGION, config)
        member.wait_ready(60)
        assert readyz(member)["offline_since"] == lost_at  # the outage is remembered
        assert share_of(member) == share
        before = own_rows(member)
        interrupted = [row_id for row_id in before if _status(member, row_id) == INTERRUPTED]
        assert len(interrupted) == 3

        # --- a concurrent burst: never past the share ------------------------------------
        with ThreadPoolExecutor(BURST) as pool:
            burst = list(pool.map(lambda _: chat(member, good), range(BURST)))
        codes = [code_of(response) for response in burst]
        assert set(codes) == {None, "budget_share_exhausted"}, codes
        served = len(before) + codes.count(None)
        wait_for(lambda: len(own_rows(member)) == served)  # the audit log writes behind
        own = own_rows(member)
        assert sum(own.values()) <= share  # all it served, online and offline, from its share
        print(  # noqa: T201 - the acceptance figures, for the report
            f"\noffline burst of {BURST}: {codes.count(None)} served, "
            f"{codes.count('budget_share_exhausted')} refused budget_share_exhausted; "
            f"{sum(own.values())} of the {share}-token share spent ({len(own)} rows)"
        )

        # --- the router is back: every row counted once, to the token ----------------------
        fleet.router = start_server("router", tmp_path / "router", *router_args)
        fleet.stack.callback(fleet.router.stop)
        fleet.router.wait_ready(30)
        anonymous = httpx.post(f"{fleet.router.url}/federation/v1/usage", json={"rows": []})
        assert code_of(anonymous) == "client_certificate_required"
        wait_for(lambda: reconciled(fleet, member), timeout=60)
        assert own_rows(member) == own  # nothing new since
        counted = router_rows(fleet)
        assert len(counted) == len(own)  # once each
        assert {r["request_id"]: r["input_tokens"] + r["output_tokens"] for r in counted} == own
        assert {(r["node"], r["region"]) for r in counted} == {(NODE, REGION)}
        budget = admin.ok("GET", f"/admin/v1/orgs/{ORG}/budget")
        assert budget["used_tokens"] == sum(own.values())
        assert budget["used_tokens"] + budget["reserved_tokens"] <= BUDGET
        wait_for(lambda: readyz(member).get("offline_since") is None, timeout=30)
        datetime.fromisoformat(lost_at)  # an ISO 8601 time, as shown

        # --- `fleet status` shows a node that went away offline since its last heartbeat ---
        fleet.wait_state("up", NODE)  # its heartbeats reach the new router too
        kill(member)
        fleet.wait_state("down", NODE)
        shown = run_palisade(
            "fleet", "status", "--url", fleet.router.url,
            env={"PALISADE_HOME": str(fleet.router.home)},
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert "down (offline since 20" in shown.stdout, shown.stdout
        since = fleet.status()[NODE]["offline_since"]
        assert since is not None
        assert abs(since - time.time()) < 60


def _stream_until_killed(member: Server, key: str, started: threading.Barrier) -> None:
    """A streamed request that is still running when the appliance is killed."""
    body = {
        "model": UPSTREAM_MODEL,
        "messages": [{"role": "user", "content": "Count slowly."}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.stream(
            "POST", f"{member.url}/v1/chat/completions", json=body, headers=headers,
            verify=member.verify, timeout=30,
        ) as response:  # fmt: skip
            lines = response.iter_lines()
            next(lines)  # the first chunk: admitted and generating
            started.wait(timeout=30)
            for _ in lines:
                pass
    except httpx.HTTPError:
        pass  # the appliance was killed mid-stream, as intended


def _status(member: Server, row_id: str) -> str:
    for body in read_entries(member.home / "audit.db"):
        entry = json.loads(body)
        if entry.get("id") == row_id:
            return str(entry["status"])
    return ""
