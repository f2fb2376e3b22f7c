"""Signed policy snapshots: what verifies, what is refused, what counts as a change."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from federation import (
    AuthenticationError,
    KeyLimits,
    KeyPolicy,
    NodeIdentity,
    OrgPolicy,
    PolicySnapshot,
    UserPolicy,
    content_digest,
    sign_policy,
    verify_policy,
)


def snapshot(version: int = 1, **changes: Any) -> PolicySnapshot:
    base = PolicySnapshot(
        version=version,
        issued_at=1_700_000_000.0,
        fleet_id="fleet-0123abcd",
        router_id="router-1",
        orgs=[
            OrgPolicy(
                name="acme",
                regions=["eu-west"],
                logging_mode="metadata",
                budget_tokens=1000,
                month="2026-11",
                used_tokens=10,
            )
        ],
        keys=[
            KeyPolicy(
                key_id="abcdef012345",
                secret_hash="00" * 32,
                org="acme",
                user="usr_1",
                role="org_user",
                regions=None,
                limits=KeyLimits(requests_per_minute=60),
                expires_at=None,
                revoked=False,
            )
        ],
        users=[UserPolicy(id="usr_1", email="a@acme.test", role="org_user", org="acme")],
        revoked_serials=[7],
        crl_pem="-----BEGIN X509 CRL-----\n...\n-----END X509 CRL-----\n",
    )
    return msgspec.structs.replace(base, **changes)


@pytest.fixture
def router(tmp_path: Path) -> NodeIdentity:
    return NodeIdentity.load_or_create(tmp_path / "router")


def test_a_signed_snapshot_verifies_with_the_routers_key(router: NodeIdentity) -> None:
    original = snapshot(version=42)
    assert verify_policy(router.public_key, sign_policy(router, original)) == original


def test_a_snapshot_signed_by_another_key_is_refused(router: NodeIdentity, tmp_path: Path) -> None:
    other = NodeIdentity.load_or_create(tmp_path / "other")
    blob = sign_policy(other, snapshot())
    with pytest.raises(AuthenticationError) as refused:
        verify_policy(router.public_key, blob)
    assert refused.value.code == "policy_signature_invalid"
    assert refused.value.status_code == 401


def test_a_tampered_payload_is_refused(router: NodeIdentity) -> None:
    signed = json.loads(sign_policy(router, snapshot(version=3)))
    payload = json.loads(base64.b64decode(signed["payload"]))
    payload["version"] = 4_000_000  # e.g. to outrank every later snapshot
    payload["keys"][0]["revoked"] = False
    signed["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(AuthenticationError) as refused:
        verify_policy(router.public_key, json.dumps(signed).encode())
    assert refused.value.code == "policy_signature_invalid"


def test_a_flipped_signature_bit_is_refused(router: NodeIdentity) -> None:
    signed = json.loads(sign_policy(router, snapshot()))
    signature = bytearray(base64.b64decode(signed["signature"]))
    signature[0] ^= 1
    signed["signature"] = base64.b64encode(bytes(signature)).decode()
    with pytest.raises(AuthenticationError) as refused:
        verify_policy(router.public_key, json.dumps(signed).encode())
    assert refused.value.code == "policy_signature_invalid"


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"not json",
        b"[]",
        b'{"payload": "!!!", "signature": "AAAA"}',
        b'{"payload": "e30=", "signature": "AAAA", "extra": 1}',
    ],
)
def test_malformed_blobs_are_refused_with_the_same_code(router: NodeIdentity, blob: bytes) -> None:
    with pytest.raises(AuthenticationError) as refused:
        verify_policy(router.public_key, blob)
    assert refused.value.code == "policy_signature_invalid"


def test_a_signature_over_other_content_does_not_verify_a_snapshot(router: NodeIdentity) -> None:
    """The signed bytes carry a context prefix: a signature the router made over the bare
    payload (as it signs other kinds of messages) is not a policy signature."""
    payload = msgspec.json.encode(snapshot())
    bare = router.sign(payload)
    blob = json.dumps(
        {
            "payload": base64.b64encode(payload).decode(),
            "signature": base64.b64encode(bare).decode(),
        }
    ).encode()
    with pytest.raises(AuthenticationError):
        verify_policy(router.public_key, blob)


def test_the_content_digest_ignores_version_issue_time_and_spent_budget() -> None:
    first = snapshot(version=1)
    later = snapshot(
        version=9,
        issued_at=1_800_000_000.0,
        orgs=[msgspec.structs.replace(first.orgs[0], used_tokens=999, month="2026-12")],
    )
    assert content_digest(first) == content_digest(later)


@pytest.mark.parametrize(
    "change",
    [
        {"revoked_serials": [7, 8]},
        {"crl_pem": "another"},
        {"users": []},
        {"grace_s": 60.0},
    ],
)
def test_the_content_digest_sees_every_grant(change: dict[str, Any]) -> None:
    assert content_digest(snapshot(**change)) != content_digest(snapshot())


def test_the_content_digest_sees_a_revoked_key_and_a_changed_budget() -> None:
    base = snapshot()
    revoked = [msgspec.structs.replace(base.keys[0], revoked=True)]
    budget = [msgspec.structs.replace(base.orgs[0], budget_tokens=5)]
    assert content_digest(snapshot(keys=revoked)) != content_digest(base)
    assert content_digest(snapshot(orgs=budget)) != content_digest(base)


def test_a_key_policy_never_shows_its_hash_in_a_repr() -> None:
    key = snapshot().keys[0]
    assert key.secret_hash not in repr(key)
