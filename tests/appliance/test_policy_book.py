"""The appliance's PolicyBook: newer snapshots only, from the pinned router, kept on disk;
fleet keys authenticated from it with residency (no sockets)."""

from __future__ import annotations

import asyncio
import json
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from appliance._private.fleet_policy_book import PolicyBook
from federation import (
    FLEET_POLICY_VIA,
    APIError,
    KeyLimits,
    KeyPolicy,
    NodeIdentity,
    OrgPolicy,
    PolicySnapshot,
    UserPolicy,
    sign_policy,
)
from federation._private.keys import new_key

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
CRL_V1 = "-----BEGIN X509 CRL-----\nversion one\n-----END X509 CRL-----\n"
CRL_V2 = "-----BEGIN X509 CRL-----\nversion two\n-----END X509 CRL-----\n"


@dataclass
class Key:
    text: str
    policy: KeyPolicy


def make_key(
    org: str = "acme",
    user: str = "usr_alice",
    *,
    regions: list[str] | None = None,
    revoked: bool = False,
    expires_at: datetime | None = None,
) -> Key:
    text, key_id, secret_hash = new_key()
    expiry = expires_at.isoformat(timespec="milliseconds") if expires_at else None
    policy = KeyPolicy(
        key_id=key_id,
        secret_hash=secret_hash.hex(),
        org=org,
        user=user,
        role="org_user",
        regions=regions,
        limits=KeyLimits(),
        expires_at=expiry,
        revoked=revoked,
    )
    return Key(text, policy)


def snapshot(version: int, keys: list[Key], crl: str = CRL_V1) -> PolicySnapshot:
    return PolicySnapshot(
        version=version,
        issued_at=NOW.timestamp(),
        fleet_id="fleet-0badcafe",
        router_id="router-1",
        orgs=[
            OrgPolicy(
                name="acme",
                regions=["eu-west", "us-east"],
                logging_mode="metadata",
                budget_tokens=None,
            ),
            OrgPolicy(name="usco", regions=["us-east"], logging_mode="full", budget_tokens=None),
        ],
        keys=[key.policy for key in keys],
        users=[
            UserPolicy(id="usr_alice", email="alice@acme.test", role="org_user", org="acme"),
            UserPolicy(id="usr_bob", email="bob@usco.test", role="org_user", org="usco"),
            UserPolicy(id="usr_root", email="admin@local", role="system_admin", org=None),
        ],
        revoked_serials=[],
        crl_pem=crl,
    )


@pytest.fixture
def router(tmp_path: Path) -> NodeIdentity:
    return NodeIdentity.load_or_create(tmp_path / "router")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "node"
    path.mkdir()
    return path


def book_for(home: Path, router: NodeIdentity, region: str = "eu-west") -> PolicyBook:
    return PolicyBook(home, router.public_key, region=region, clock=NOW.timestamp)


def refusal(call: object) -> APIError:
    assert callable(call)
    with pytest.raises(APIError) as refused:
        call()
    return refused.value


def test_a_newer_snapshot_is_installed_on_disk_privately(home: Path, router: NodeIdentity) -> None:
    book = book_for(home, router)
    assert book.version == 0
    blob = sign_policy(router, snapshot(1, []))
    assert book.offer(blob).version == 1
    assert book.version == 1
    assert book.path.read_bytes() == blob
    assert stat.S_IMODE(book.path.stat().st_mode) == 0o600
    assert book.crl_path.read_text() == CRL_V1
    assert stat.S_IMODE(book.crl_path.stat().st_mode) == 0o600
    assert book.offer(sign_policy(router, snapshot(5, []))).version == 5


@pytest.mark.parametrize("version", [3, 2])
def test_an_equal_or_lower_version_is_refused_and_the_old_one_stays(
    home: Path, router: NodeIdentity, version: int
) -> None:
    alice = make_key()
    book = book_for(home, router)
    in_force = sign_policy(router, snapshot(3, [alice]))
    book.offer(in_force)
    # The older snapshot would bring the key back without a CRL; it must change nothing.
    older = sign_policy(router, snapshot(version, [], crl=CRL_V2))
    error = refusal(lambda: book.offer(older))
    assert (error.code, error.status_code) == ("policy_rollback", 409)
    assert book.version == 3
    assert book.path.read_bytes() == in_force
    assert book.crl_path.read_text() == CRL_V1
    assert book.principal(alice.text).key_id == alice.policy.key_id


def test_a_snapshot_from_another_key_is_refused_and_the_old_one_stays(
    home: Path, router: NodeIdentity, tmp_path: Path
) -> None:
    alice = make_key()
    book = book_for(home, router)
    in_force = sign_policy(router, snapshot(1, [alice]))
    book.offer(in_force)
    impostor = NodeIdentity.load_or_create(tmp_path / "impostor")
    forged = sign_policy(impostor, snapshot(99, [], crl=CRL_V2))
    error = refusal(lambda: book.offer(forged))
    assert (error.code, error.status_code) == ("policy_signature_invalid", 401)
    assert book.version == 1
    assert book.path.read_bytes() == in_force
    assert book.crl_path.read_text() == CRL_V1


def test_the_snapshot_survives_a_restart(home: Path, router: NodeIdentity) -> None:
    alice = make_key()
    book_for(home, router).offer(sign_policy(router, snapshot(7, [alice])))
    reopened = book_for(home, router)
    assert reopened.version == 7
    assert reopened.principal(alice.text).org == "acme"
    # and the restarted book still refuses to go back
    error = refusal(lambda: reopened.offer(sign_policy(router, snapshot(6, []))))
    assert error.code == "policy_rollback"


def test_a_file_signed_by_another_key_is_not_trusted_at_start(
    home: Path, router: NodeIdentity, tmp_path: Path
) -> None:
    impostor = NodeIdentity.load_or_create(tmp_path / "impostor")
    book = book_for(home, impostor)
    book.offer(sign_policy(impostor, snapshot(50, [make_key()])))
    assert book_for(home, router).version == 0


def test_a_damaged_file_is_ignored_and_the_next_snapshot_replaces_it(
    home: Path, router: NodeIdentity
) -> None:
    book = book_for(home, router)
    book.offer(sign_policy(router, snapshot(2, [])))
    book.path.write_bytes(book.path.read_bytes()[:-10])
    reopened = book_for(home, router)
    assert reopened.version == 0
    assert reopened.offer(sign_policy(router, snapshot(3, []))).version == 3


def test_a_new_crl_is_written_and_the_hooks_are_called(home: Path, router: NodeIdentity) -> None:
    book = book_for(home, router)
    reloads: list[str] = []
    book.crl_hooks.append(lambda path: reloads.append(path.read_text()))
    book.offer(sign_policy(router, snapshot(1, [])))
    book.offer(sign_policy(router, snapshot(2, [])))  # the same CRL: nothing to reload
    book.offer(sign_policy(router, snapshot(3, [], crl=CRL_V2)))
    assert reloads == [CRL_V1, CRL_V2]


def test_a_failing_hook_does_not_undo_the_snapshot(home: Path, router: NodeIdentity) -> None:
    book = book_for(home, router)

    def broken(_: Path) -> None:
        raise RuntimeError("boom")

    book.crl_hooks.append(broken)
    book.offer(sign_policy(router, snapshot(1, [])))
    assert book.version == 1


def test_a_fleet_key_authenticates_with_org_and_key_regions(
    home: Path, router: NodeIdentity
) -> None:
    alice = make_key(regions=["eu-west"])
    book = book_for(home, router)
    book.offer(sign_policy(router, snapshot(1, [alice])))
    principal = book.principal(alice.text)
    assert principal.org == "acme"
    assert principal.user == "usr_alice"
    assert principal.key_id == alice.policy.key_id
    assert principal.regions == frozenset({"eu-west"})
    assert principal.logging_mode == "metadata"
    assert principal.via == FLEET_POLICY_VIA


@pytest.mark.parametrize(
    "presented",
    [
        "pal-sk-nope",
        "",
        "pal-sk-000000000000-" + "A" * 43,  # well-formed, unknown id
    ],
)
def test_unknown_and_malformed_keys_are_refused(
    home: Path, router: NodeIdentity, presented: str
) -> None:
    book = book_for(home, router)
    book.offer(sign_policy(router, snapshot(1, [make_key()])))
    error = refusal(lambda: book.principal(presented))
    assert (error.code, error.status_code) == ("invalid_api_key", 401)


def test_a_wrong_secret_for_a_known_id_is_refused(home: Path, router: NodeIdentity) -> None:
    alice = make_key()
    book = book_for(home, router)
    book.offer(sign_policy(router, snapshot(1, [alice])))
    forged = alice.text[:-1] + ("A" if alice.text[-1] != "A" else "B")
    assert refusal(lambda: book.principal(forged)).code == "invalid_api_key"
    assert alice.text not in refusal(lambda: book.principal(forged)).message


def test_revoked_and_expired_keys_are_refused(home: Path, router: NodeIdentity) -> None:
    revoked = make_key(revoked=True)
    expired = make_key(expires_at=NOW - timedelta(seconds=1))
    current = make_key(expires_at=NOW + timedelta(days=1))
    book = book_for(home, router)
    book.offer(sign_policy(router, snapshot(1, [revoked, expired, current])))
    assert refusal(lambda: book.principal(revoked.text)).code == "invalid_api_key"
    assert refusal(lambda: book.principal(expired.text)).code == "invalid_api_key"
    assert book.principal(current.text).org == "acme"


def test_revoking_a_key_takes_effect_with_the_next_snapshot(
    home: Path, router: NodeIdentity
) -> None:
    alice = make_key()
    book = book_for(home, router)
    book.offer(sign_policy(router, snapshot(1, [alice])))
    assert book.principal(alice.text).org == "acme"
    revoked = Key(alice.text, msgspec.structs.replace(alice.policy, revoked=True))
    book.offer(sign_policy(router, snapshot(2, [revoked])))
    assert refusal(lambda: book.principal(alice.text)).code == "invalid_api_key"


def test_residency_uses_the_certified_region(home: Path, router: NodeIdentity) -> None:
    bob = make_key(org="usco", user="usr_bob")  # usco: us-east only
    eu_only = make_key(regions=["eu-west"])  # acme allows both, the key only eu-west
    blob = sign_policy(router, snapshot(1, [bob, eu_only]))
    eu_book = book_for(home, router, region="eu-west")
    eu_book.offer(blob)
    error = refusal(lambda: eu_book.principal(bob.text))
    assert (error.code, error.status_code) == ("residency_violation", 403)
    assert eu_book.principal(eu_only.text).regions == frozenset({"eu-west"})
    us_book = book_for(home, router, region="us-east")
    assert us_book.principal(bob.text).org == "usco"
    assert refusal(lambda: us_book.principal(eu_only.text)).code == "residency_violation"


def test_a_system_admin_key_may_not_call_inference(home: Path, router: NodeIdentity) -> None:
    root = make_key(org="", user="usr_root")
    snap = snapshot(1, [root])
    snap.orgs.append(OrgPolicy(name="", regions=[], logging_mode="metadata", budget_tokens=None))
    book = book_for(home, router)
    book.offer(sign_policy(router, snap))
    error = refusal(lambda: book.principal(root.text))
    assert (error.code, error.status_code) == ("permission_denied", 403)


def test_without_a_snapshot_every_fleet_key_is_refused(home: Path, router: NodeIdentity) -> None:
    error = refusal(lambda: book_for(home, router).principal(make_key().text))
    assert (error.code, error.status_code) == ("invalid_api_key", 401)


def test_the_file_never_holds_a_secret(home: Path, router: NodeIdentity) -> None:
    alice = make_key()
    book = book_for(home, router)
    book.offer(sign_policy(router, snapshot(1, [alice])))
    text = book.path.read_text()
    secret = alice.text.removeprefix(f"pal-sk-{alice.policy.key_id}-")
    assert secret not in text
    assert secret not in book.path.read_bytes().decode()
    assert json.loads(text).keys() == {"payload", "signature"}


def test_offers_on_the_event_loop_are_taken_one_at_a_time(home: Path, router: NodeIdentity) -> None:
    book = book_for(home, router)
    reloads: list[str] = []
    book.crl_hooks.append(lambda path: reloads.append(path.read_text()))
    newer = sign_policy(router, snapshot(3, [], crl=CRL_V2))
    older = sign_policy(router, snapshot(2, []))

    async def both() -> tuple[PolicySnapshot | BaseException, PolicySnapshot | BaseException]:
        return await asyncio.gather(
            book.offer_async(newer), book.offer_async(older), return_exceptions=True
        )

    accepted, refused = asyncio.run(both())
    assert isinstance(accepted, PolicySnapshot)
    assert accepted.version == 3
    assert isinstance(refused, APIError)
    assert refused.code == "policy_rollback"
    assert book.version == 3
    assert book.path.read_bytes() == newer
    assert reloads == [CRL_V2]
