"""The router's PolicyPublisher on a real Tenancy (no sockets): versions move only when
what the snapshot grants changes, survive restarts, and wake long polls at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from federation import (
    NodeIdentity,
    PolicySnapshot,
    Principal,
    Tenancy,
    content_digest,
    verify_policy,
)
from federation._private.admin_wire import KeyCreate, OrgCreate
from router._private.policy_publisher import CRL_FILE, FLEET_ID_FILE, STATE_FILE, PolicyPublisher
from router._private.postgres import PostgresCluster
from tests.postgres import migrated_database

GRACE_S = 3600.0


def run(body: Callable[[], Coroutine[None, None, None]]) -> None:
    asyncio.run(body())


@asynccontextmanager
async def publishing(
    home: Path, *, check_interval_s: float = 0.25
) -> AsyncIterator[tuple[Tenancy, PolicyPublisher]]:
    tenancy = Tenancy(home, region="global", node="router-1")
    await tenancy.start()
    identity = NodeIdentity.load_or_create(home)
    publisher = PolicyPublisher(
        tenancy,
        identity,
        home=home,
        router_id="router-1",
        grace_s=GRACE_S,
        check_interval_s=check_interval_s,
    )
    await publisher.start()
    try:
        yield tenancy, publisher
    finally:
        await publisher.stop()
        await tenancy.close()


def current(home: Path, publisher: PolicyPublisher) -> PolicySnapshot:
    return verify_policy(NodeIdentity.load_or_create(home).public_key, publisher.blob)


async def add_member(tenancy: Tenancy, org: str = "acme") -> str:
    """A new org user with a key; returns the key id."""
    store = tenancy.store
    if org not in store.orgs:
        await store.create_org(OrgCreate(name=org, regions=["eu-west"]), "system")
    user = await store.add_user(f"{org}-{len(store.users)}@test", "org_user", org, "system")
    created = await store.create_key(user, KeyCreate(name="k"), "system")
    return created.info.id


async def caught_up(tenancy: Tenancy, publisher: PolicyPublisher) -> int:
    """Publish whatever is committed now; the version then in force."""
    await tenancy.store.settled()
    await publisher.rebuild()
    return publisher.version


def write_crl(home: Path, serials: list[int]) -> None:
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(key, algorithm=None)
    (home / CRL_FILE).parent.mkdir(parents=True, exist_ok=True)
    (home / CRL_FILE).write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def test_the_first_snapshot_holds_the_tenancy_and_is_signed(tmp_path: Path) -> None:
    async def body() -> None:
        (tmp_path / "fleet").mkdir()
        (tmp_path / FLEET_ID_FILE).write_text("fleet-00c0ffee\n")
        write_crl(tmp_path, [11, 5])
        async with publishing(tmp_path) as (tenancy, publisher):
            key_id = await add_member(tenancy)
            version = await caught_up(tenancy, publisher)
            snapshot = current(tmp_path, publisher)
            assert snapshot.version == version > 1
            assert snapshot.fleet_id == "fleet-00c0ffee"
            assert snapshot.router_id == "router-1"
            assert snapshot.grace_s == GRACE_S
            assert snapshot.revoked_serials == [5, 11]
            assert snapshot.crl_pem == (tmp_path / CRL_FILE).read_text()
            assert [org.name for org in snapshot.orgs] == ["acme"]
            key = next(k for k in snapshot.keys if k.key_id == key_id)
            record = tenancy.store.keys[key_id]
            assert key.secret_hash == record.secret_hash.hex()
            assert (key.org, key.user, key.role, key.revoked) == (
                "acme",
                record.user_id,
                "org_user",
                False,
            )
            admin = next(k for k in snapshot.keys if k.key_id != key_id)
            assert admin.role == "system_admin"

    run(body)


def test_nothing_new_means_no_new_version(tmp_path: Path) -> None:
    async def body() -> None:
        async with publishing(tmp_path) as (tenancy, publisher):
            key_id = await add_member(tenancy)
            version = await caught_up(tenancy, publisher)
            blob = publisher.blob
            assert await publisher.rebuild() is False
            # budget spent is informative only: no new version for it
            record = tenancy.store.keys[key_id]
            spender = Principal(org="acme", user=record.user_id, key_id=key_id)
            gate = tenancy.gate
            admission = gate.admit(spender, 10, request_id="req-1", model="m")
            gate.settle(admission, model="m", input_tokens=7, output_tokens=0, status="ok", cost=0)
            assert publisher.build(version).orgs[0].used_tokens == 7
            assert await publisher.rebuild() is False
            assert (publisher.version, publisher.blob) == (version, blob)
            assert await publisher.wait_newer(version, 0.05) is None

    run(body)


def test_a_revoked_key_wakes_a_waiting_long_poll_with_the_revocation(tmp_path: Path) -> None:
    async def body() -> None:
        # No periodic check in this test's lifetime: only the store's announcement can wake it.
        async with publishing(tmp_path, check_interval_s=600) as (tenancy, publisher):
            key_id = await add_member(tenancy)
            before = await caught_up(tenancy, publisher)
            waiter = asyncio.create_task(publisher.wait_newer(before, 30))
            await asyncio.sleep(0)  # the poll is waiting before the change
            started = time.monotonic()
            await tenancy.store.revoke_key(key_id, "system")
            blob = await asyncio.wait_for(waiter, 30)
            elapsed = time.monotonic() - started
            assert blob is not None
            snapshot = verify_policy(NodeIdentity.load_or_create(tmp_path).public_key, blob)
            assert snapshot.version == before + 1
            assert next(k for k in snapshot.keys if k.key_id == key_id).revoked
            assert elapsed < 30, elapsed

    run(body)


def test_each_change_that_grants_something_new_is_one_new_version(tmp_path: Path) -> None:
    async def body() -> None:
        async with publishing(tmp_path) as (tenancy, publisher):
            store = tenancy.store
            key_id = await add_member(tenancy)
            first = await caught_up(tenancy, publisher)
            changes = [
                store.set_budget("acme", 1000, "system"),
                store.set_regions("acme", ["eu-west", "us-east"], "system"),
                store.set_limits(key_id, store.keys[key_id].limits, "system"),  # same limits
                store.remove_user(store.keys[key_id].user_id, "system"),
            ]
            versions = []
            for change in changes:
                await change
                versions.append(await caught_up(tenancy, publisher))
            snapshot = current(tmp_path, publisher)
            acme = snapshot.orgs[0]
            assert (acme.budget_tokens, acme.regions) == (1000, ["eu-west", "us-east"])
            assert next(k for k in snapshot.keys if k.key_id == key_id).revoked  # user removed
            # four changes, one of which granted nothing new
            assert versions == [first + 1, first + 2, first + 2, first + 3]
            assert snapshot.version == first + 3

    run(body)


def test_a_new_crl_is_published_with_its_serials(tmp_path: Path) -> None:
    async def body() -> None:
        async with publishing(tmp_path) as (_, publisher):
            assert current(tmp_path, publisher).revoked_serials == []
            version = publisher.version
            write_crl(tmp_path, [42])
            publisher.changed()  # what the revoking code calls
            assert await publisher.wait_newer(version, 5) is not None
            assert current(tmp_path, publisher).revoked_serials == [42]
            assert publisher.revoked_serials == frozenset({42})

    run(body)


def test_a_crl_written_without_notice_is_picked_up_by_the_periodic_check(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with publishing(tmp_path) as (_, publisher):
            version = publisher.version
            write_crl(tmp_path, [7])
            assert await publisher.wait_newer(version, 5) is not None
            assert publisher.revoked_serials == frozenset({7})

    run(body)


def test_the_version_survives_a_restart_and_moves_only_on_change(tmp_path: Path) -> None:
    async def body() -> None:
        async with publishing(tmp_path) as (tenancy, publisher):
            key_id = await add_member(tenancy)
            version = await caught_up(tenancy, publisher)
        state = json.loads((tmp_path / STATE_FILE).read_text())
        assert state["version"] == version
        async with publishing(tmp_path) as (tenancy, publisher):
            assert publisher.version == version  # same content: same version
            assert current(tmp_path, publisher).version == version
            await tenancy.store.revoke_key(key_id, "system")
            assert await publisher.wait_newer(version, 5) is not None
            assert publisher.version == version + 1

    run(body)


def test_a_router_that_lost_its_state_continues_above_what_appliances_hold(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with publishing(tmp_path) as (tenancy, publisher):
            await add_member(tenancy)
            await caught_up(tenancy, publisher)
        (tmp_path / STATE_FILE).unlink()
        async with publishing(tmp_path) as (_, publisher):
            assert publisher.version == 1
            await publisher.catch_up(40)  # an appliance reports version 40
            assert publisher.version == 41
            assert current(tmp_path, publisher).version == 41
            assert json.loads((tmp_path / STATE_FILE).read_text())["version"] == 41
            await publisher.catch_up(3)  # lower: nothing to do
            assert publisher.version == 41

    run(body)


def test_long_polls_end_when_the_server_starts_shutting_down(tmp_path: Path) -> None:
    async def body() -> None:
        async with publishing(tmp_path) as (_, publisher):
            shutting_down = False
            publisher.stopping = lambda: shutting_down
            waiter = asyncio.create_task(publisher.wait_newer(publisher.version, 25))
            await asyncio.sleep(0)
            shutting_down = True
            started = time.monotonic()
            assert await asyncio.wait_for(waiter, 5) is None
            assert time.monotonic() - started < 1.0  # within a check interval, not 25 s
            assert await publisher.wait_newer(publisher.version, 25) is None  # and later ones

    run(body)


# --- routers sharing a store and a fleet directory ------------------------------------------


def test_routers_sharing_a_store_give_one_content_one_version(
    postgres: PostgresCluster,
    tmp_path: Path,
) -> None:
    """Two publishers on one store and one fleet directory, changes made through either,
    rebuilt at random moments and at once: whatever each publishes, a version never names
    two contents, and a later version never holds fewer keys than an earlier one."""

    async def body() -> None:
        url = await migrated_database(postgres, "publishing")
        fleet_dir = tmp_path / "fleet"
        fleet_dir.mkdir()
        identity = NodeIdentity.load_or_create(tmp_path)
        tenancies = [
            Tenancy(tmp_path / f"r{n}", region="global", node=f"router-{n}", database=url)
            for n in (1, 2)
        ]
        for tenancy in tenancies:
            tenancy.home.mkdir()
            await tenancy.start()
        publishers = [
            PolicyPublisher(
                tenancy,
                identity,
                home=tenancy.home,
                router_id=f"router-{n}",
                fleet_dir=fleet_dir,
                grace_s=GRACE_S,
            )
            for n, tenancy in enumerate(tenancies, start=1)
        ]
        seen: dict[int, set[str]] = {}
        sizes: dict[int, int] = {}

        async def publish(publisher: PolicyPublisher) -> None:
            await publisher.rebuild()
            snapshot = verify_policy(identity.public_key, publisher.blob)
            granted = msgspec.structs.replace(snapshot, router_id="")
            seen.setdefault(snapshot.version, set()).add(content_digest(granted))
            sizes[snapshot.version] = len(snapshot.keys)

        try:
            for publisher in publishers:
                await publisher.start()
            for round_ in range(12):
                await add_member(tenancies[round_ % 2])
                await asyncio.gather(*(publish(p) for p in publishers))
            for publisher in publishers:
                await publish(publisher)
        finally:
            for publisher in publishers:
                await publisher.stop()
            for tenancy in tenancies:
                await tenancy.close()
        assert all(len(digests) == 1 for digests in seen.values()), seen
        versions = sorted(sizes)
        assert [sizes[v] for v in versions] == sorted(sizes[v] for v in versions)
        assert publishers[0].version == publishers[1].version
        assert sizes[versions[-1]] == 12 + 1  # every key made, the bootstrap admin's too

    run(body)
