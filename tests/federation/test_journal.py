"""The admission journal and budget leases: what a killed process leaves is settled once.

A "crash" here drops a `Gate` without `stop()`: its pending usage records and reservations
vanish with it, exactly as with SIGKILL, and only the journal file and policy.db remain.
(tests/e2e/test_crash_books.py does the same with real processes and real signals.)
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Coroutine
from pathlib import Path

import msgspec
import pytest

from compliance import Recorder, read_entries
from federation import (
    INTERRUPTED,
    REQUEST_ID_HEADER,
    Admission,
    Gate,
    Journal,
    LeaseBook,
    Principal,
    RateLimitError,
    RequestRecord,
    ServiceUnavailableError,
    TenancyStore,
    UsageRecord,
)
from federation._private import gate as gate_module
from federation._private.admin_wire import OrgCreate
from tests.federation.tenants import BACKENDS, policy_database

ORG = "acme"
BUDGET = 1600
PRINCIPAL = Principal(org=ORG, user="usr_1", key_id=None)


def run(body: Callable[[], Coroutine[None, None, None]]) -> None:
    asyncio.run(body())


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest) -> str | None:
    """The policy store: None for SQLite (policy.db beside the journal), else a migrated
    PostgreSQL database's URL (the journal still lives in the server's home)."""
    return policy_database(request, request.param)


async def open_gate(
    home: Path, *, budget: int | None = BUDGET, database: str | None = None
) -> tuple[TenancyStore, Gate]:
    store = await TenancyStore.open(home / "policy.db", database=database)
    if ORG not in store.orgs:
        await store.create_org(
            OrgCreate(name=ORG, regions=["eu-west"], budget_tokens=budget), "system"
        )
    gate = Gate(store, region="eu-west", node="n1")
    await gate.start()
    return store, gate


async def crash(store: TenancyStore, gate: Gate) -> None:
    """What SIGKILL leaves: the journal and policy.db, nothing held in memory."""
    if gate._flusher is not None:
        gate._flusher.cancel()
    if gate.slices is not None and gate.slices._renewer is not None:
        gate.slices._renewer.cancel()  # its slices stay in the database, as a dead one's do
    gate._journal.close()
    await store.close()


def settle(gate: Gate, admission: Admission, tokens: int) -> None:
    gate.settle(admission, model="m", input_tokens=tokens, output_tokens=0, status="ok", cost=0.0)


def by_request(records: list[UsageRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        assert record.request_id is not None
        counts[record.request_id] = counts.get(record.request_id, 0) + 1
    return counts


def test_a_crash_settles_in_flight_requests_at_their_reservation_exactly_once(
    tmp_path: Path, database: str | None
) -> None:
    async def body() -> None:
        store, gate = await open_gate(tmp_path, database=database)
        flushed = await gate.admit_async(PRINCIPAL, 100, model="m")
        unflushed = await gate.admit_async(PRINCIPAL, 100, model="m")
        in_flight = await gate.admit_async(PRINCIPAL, 300, model="m")
        assert in_flight.headers[REQUEST_ID_HEADER] == in_flight.id
        settle(gate, flushed, 40)
        await gate.flush()
        settle(gate, unflushed, 60)  # in memory only when the process dies
        await crash(store, gate)

        store, gate = await open_gate(tmp_path, database=database)
        records = await store.usage_records(ORG)
        assert by_request(records) == {flushed.id: 1, unflushed.id: 1, in_flight.id: 1}
        statuses = {r.request_id: (r.status, r.input_tokens) for r in records}
        assert statuses[unflushed.id] == ("ok", 60)
        assert statuses[in_flight.id] == (INTERRUPTED, 300)
        assert gate.budget_state(ORG)[1:] == (40 + 60 + 300, 0)
        assert (await store.month_usage(gate.budget_state(ORG)[0]))[ORG] == 400

        await crash(store, gate)  # nothing new: a second recovery adds nothing
        store, gate = await open_gate(tmp_path, database=database)
        assert by_request(await store.usage_records(ORG)) == by_request(records)
        assert gate.budget_state(ORG)[1] == 400
        await gate.stop()
        await store.close()

    run(body)


def test_recovering_the_same_journal_twice_counts_nothing_twice(
    tmp_path: Path, database: str | None
) -> None:
    """A crash after recovery committed, before it replaced the journal."""

    async def body() -> None:
        store, gate = await open_gate(tmp_path, budget=None, database=database)
        await gate.admit_async(PRINCIPAL, 70, model="m")
        zero = Principal(org=ORG, user="usr_2", logging_mode="zero")
        settle(gate, await gate.admit_async(zero, 50), 20)  # zero logging: counters only, no row
        await crash(store, gate)
        journal = (tmp_path / "admissions.journal").read_bytes()

        store, gate = await open_gate(tmp_path, budget=None, database=database)
        await crash(store, gate)
        (tmp_path / "admissions.journal").write_bytes(journal)

        store, gate = await open_gate(tmp_path, budget=None, database=database)
        assert gate.budget_state(ORG)[1] == 70 + 20
        assert [r.status for r in await store.usage_records(ORG)] == [INTERRUPTED]
        await gate.stop()
        await store.close()

    run(body)


def test_a_clean_stop_leaves_nothing_to_recover(tmp_path: Path, database: str | None) -> None:
    async def body() -> None:
        store, gate = await open_gate(tmp_path, database=database)
        settle(gate, await gate.admit_async(PRINCIPAL, 100, model="m"), 30)
        await gate.stop()
        await store.close()
        lines = Journal(tmp_path / "admissions.journal").read()
        assert lines is not None
        assert len(lines) == 1
        assert json.loads(lines[0])["clean"] is True

        store, gate = await open_gate(tmp_path, database=database)
        assert gate.budget_state(ORG)[1] == 30
        assert len(await store.usage_records(ORG)) == 1
        await gate.stop()
        await store.close()

    run(body)


def test_rotation_keeps_what_is_open_and_what_is_unflushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gate_module, "_ROTATE_BYTES", 2000)

    async def body() -> None:
        store, gate = await open_gate(tmp_path, budget=None)
        admitted: list[Admission] = []
        for round_ in range(30):
            admitted += [gate.admit(PRINCIPAL, 10, model="m") for _ in range(3)]
            settle(gate, admitted[-3], 5)
            if round_ % 4 == 0:
                await gate.flush()
        lines = Journal(tmp_path / "admissions.journal").read()
        await crash(store, gate)
        assert lines is not None
        assert len(lines) < 90  # rotated: of 121 lines, only those still needed are kept

        store, gate = await open_gate(tmp_path, budget=None)
        records = await store.usage_records(ORG)
        assert by_request(records) == {admission.id: 1 for admission in admitted}
        assert sum(r.status == INTERRUPTED for r in records) == 60
        assert gate.budget_state(ORG)[1] == 30 * 5 + 60 * 10
        await gate.stop()
        await store.close()

    run(body)


def test_a_full_disk_refuses_admission_with_503_and_takes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        store, gate = await open_gate(tmp_path)
        admitted = gate.admit(PRINCIPAL, 100, model="m")
        journal = gate._journal
        assert journal._fd is not None
        os.close(journal._fd)
        journal._fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
        journal.flush()  # what the loop does after this iteration: the write fails
        with pytest.raises(ServiceUnavailableError) as refused:
            gate.admit(PRINCIPAL, 100, model="m")
        assert refused.value.code == "journal_unavailable"
        assert gate.budget_state(ORG)[1:] == (0, 100)  # only the first reservation
        settle(gate, admitted, 30)  # settling still works: the books in memory are right
        assert gate.budget_state(ORG)[1:] == (30, 0)
        await gate.stop()
        await store.close()

    run(body)


def test_admissions_stay_within_a_durable_lease_below_the_budget(tmp_path: Path) -> None:
    async def body() -> None:
        store, gate = await open_gate(tmp_path)
        admitted = [gate.admit(PRINCIPAL, 150, model="m") for _ in range(10)]
        with pytest.raises(RateLimitError):
            gate.admit(PRINCIPAL, 150, model="m")
        month = admitted[0].month
        lease = LeaseBook(tmp_path / "budget.leases").leases[(ORG, month)]
        assert 10 * 150 <= lease <= BUDGET  # read back from disk: fsynced before admitting
        for admission in admitted:
            settle(gate, admission, 10)
        await gate.stop()
        await store.close()

    run(body)


def test_after_a_reboot_the_org_is_charged_up_to_its_lease_never_past_its_budget(
    tmp_path: Path,
) -> None:
    """A power cut: the journal's unsynced lines are gone, only the lease is known."""

    async def body() -> None:
        store, gate = await open_gate(tmp_path)
        for _ in range(5):
            gate.admit(PRINCIPAL, 150, model="m")
        month = gate.budget_state(ORG)[0]
        await crash(store, gate)
        lease = LeaseBook(tmp_path / "budget.leases").leases[(ORG, month)]
        (tmp_path / "admissions.journal").write_bytes(b"")  # lost with the page cache

        store, gate = await open_gate(tmp_path)
        used = gate.budget_state(ORG)[1]
        assert used == min(lease, BUDGET)
        assert 5 * 150 <= used <= BUDGET
        with pytest.raises(RateLimitError):
            gate.admit(PRINCIPAL, BUDGET - used + 1, model="m")
        await gate.stop()
        await store.close()

    run(body)


def test_the_recorder_appends_each_lost_row_once(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, origin="n1")
    row = RequestRecord(
        id="done",
        org=ORG,
        user="u",
        key_id=None,
        model="m",
        region="eu",
        node="n1",
        input_tokens=9,
        output_tokens=0,
        status=INTERRUPTED,
    )
    recorder.begin("metadata", row)
    recorder.begin("metadata", msgspec.structs.replace(row, id="open"))
    recorder.request("metadata", msgspec.structs.replace(row, status="ok"))
    recorder.begin("zero", msgspec.structs.replace(row, id="unlogged"))
    recorder.log.close()  # the process dies: the journal is not reset
    journal = tmp_path / "audit.journal"
    lost = {**row.row(), "id": "queued", "status": "ok"}  # ended, its row still in the queue
    with journal.open("ab") as out:
        out.write(msgspec.json.encode({"t": "e", "row": lost}) + b"\n")

    recovered = []
    for _ in range(2):  # the second start finds everything in the log already
        recorder = Recorder(tmp_path, origin="n1")
        recovered.append(recorder.recovered)
        recorder.close()
    assert recovered == [2, 0]
    statuses = [
        (entry["id"], entry["status"])
        for entry in map(json.loads, read_entries(tmp_path / "audit.db"))
        if entry["kind"] == "request"
    ]
    assert sorted(statuses) == [("done", "ok"), ("open", INTERRUPTED), ("queued", "ok")]
