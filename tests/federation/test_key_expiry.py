"""A key with an expiry authenticates until that moment and never after (the store reads
its clock only for keys that expire); a key without one is unaffected by time. On both
stores: SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from federation import AuthenticationError
from federation._private.admin_wire import KeyCreate
from federation._private.store import TenancyStore
from tests.federation.tenants import BACKENDS, policy_database


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 31, 23, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def _expiry_outcomes(path: Path, database: str | None) -> list[str | None]:
    """How the expiring key and the lasting one fare: before the expiry, one millisecond
    before it, at it, and a year later."""
    clock = Clock()
    store = await TenancyStore.open(path, database=database, clock=clock)
    try:
        lasting = await store.bootstrap_admin()
        assert lasting is not None
        admin = next(iter(store.users.values()))
        created = await store.create_key(admin, KeyCreate(name="day", expires_in_days=1), "t")
        expiry = clock.now + timedelta(days=1)
        outcomes = []
        for moment in (
            clock.now,
            expiry - timedelta(milliseconds=1),
            expiry,
            expiry.replace(year=2027),
        ):
            clock.now = moment
            outcomes.append(_refusal(store, created.key))
            outcomes.append(_refusal(store, lasting))
        return outcomes
    finally:
        await store.close()


def _refusal(store: TenancyStore, key: str) -> str | None:
    """The code `key` is refused with, None when it authenticates."""
    try:
        store.authenticate(key)
    except AuthenticationError as refused:
        return refused.code
    return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_expires_at_its_moment_and_a_key_without_expiry_never(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    database = policy_database(request, backend)
    outcomes = asyncio.run(_expiry_outcomes(tmp_path / "policy.db", database))
    refused = "invalid_api_key"
    assert outcomes == [None, None, None, None, refused, None, refused, None]
