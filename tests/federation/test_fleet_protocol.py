"""The fleet join secret and the router's principal assertions, with an injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation import (
    JOIN_SECRET_ENV,
    AssertionSigner,
    AssertionVerifier,
    AuthenticationError,
    ConfigError,
    NodeIdentity,
    Principal,
    join_secret,
    sign_fleet_message,
    verify_fleet_message,
)

SECRET = b"fleet-secret-0123456789"
BODY = b'{"node_id":"n1"}'
ALICE = Principal(
    org="acme",
    user="usr_1",
    key_id="k1",
    regions=frozenset({"eu-west"}),
    role="org_user",
    logging_mode="metadata",
)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_signed_fleet_message_verifies_and_any_change_is_refused() -> None:
    clock = Clock()
    header = sign_fleet_message(SECRET, BODY, now=clock.now)
    verify_fleet_message(SECRET, BODY, header, clock=clock)
    cases = {
        "wrong secret": (b"another-secret-01234567", BODY, header),
        "edited body": (SECRET, BODY + b" ", header),
        "no header": (SECRET, BODY, None),
        "malformed": (SECRET, BODY, "v1=abc"),
    }
    for name, (secret, body, value) in cases.items():
        with pytest.raises(AuthenticationError) as caught:
            verify_fleet_message(secret, body, value, clock=clock)
        assert caught.value.code == "invalid_join_signature", name
    assert SECRET.decode() not in header


def test_an_old_fleet_message_cannot_be_replayed() -> None:
    clock = Clock()
    header = sign_fleet_message(SECRET, BODY, now=clock.now)
    clock.now += 31
    with pytest.raises(AuthenticationError, match="check both machines' clocks"):
        verify_fleet_message(SECRET, BODY, header, clock=clock)


def test_the_join_secret_must_be_set_and_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(JOIN_SECRET_ENV, raising=False)
    assert join_secret(required=False) is None
    with pytest.raises(ConfigError, match="PALISADE_JOIN_SECRET is not set"):
        join_secret(required=True)
    monkeypatch.setenv(JOIN_SECRET_ENV, "short")
    with pytest.raises(ConfigError, match="at least 16"):
        join_secret(required=True)
    monkeypatch.setenv(JOIN_SECRET_ENV, SECRET.decode())
    assert join_secret(required=True) == SECRET


@pytest.fixture
def router_identity(tmp_path: Path) -> NodeIdentity:
    return NodeIdentity.load_or_create(tmp_path / "router")


def test_an_assertion_carries_the_principal_to_the_node_it_names(
    router_identity: NodeIdentity,
) -> None:
    clock = Clock()
    signer = AssertionSigner(router_identity, "r1", clock=clock)
    verifier = AssertionVerifier(router_identity.public_key, "node-a", clock=clock)
    principal = verifier.principal(signer.assertion(ALICE, "node-a"))
    assert principal.org == "acme"
    assert principal.key_id == "k1"
    assert principal.regions == frozenset({"eu-west"})
    assert principal.logging_mode == "metadata"
    assert principal.via == "r1"


def test_assertions_for_another_node_with_another_key_expired_or_edited_are_refused(
    router_identity: NodeIdentity, tmp_path: Path
) -> None:
    clock = Clock()
    signer = AssertionSigner(router_identity, "r1", ttl_s=30, clock=clock)
    token = signer.assertion(ALICE, "node-a")
    impostor = NodeIdentity.load_or_create(tmp_path / "impostor")
    forged = AssertionSigner(impostor, "r1", clock=clock).assertion(ALICE, "node-a")
    payload, _, signature = token.partition(".")
    cases = {
        "another node": (
            AssertionVerifier(router_identity.public_key, "node-b", clock=clock),
            token,
        ),
        "another key": (
            AssertionVerifier(router_identity.public_key, "node-a", clock=clock),
            forged,
        ),
        "edited claims": (
            AssertionVerifier(router_identity.public_key, "node-a", clock=clock),
            payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + signature,
        ),
        "garbage": (AssertionVerifier(router_identity.public_key, "node-a", clock=clock), "x.y.z"),
    }
    for name, (verifier, value) in cases.items():
        with pytest.raises(AuthenticationError) as caught:
            verifier.principal(value)
        assert caught.value.code == "invalid_assertion", name
    late = AssertionVerifier(router_identity.public_key, "node-a", clock=clock)
    clock.now += 36  # 30 s lifetime + 5 s skew allowance
    with pytest.raises(AuthenticationError, match="expired"):
        late.principal(token)


def test_signer_and_verifier_reuse_work_within_the_lifetime(
    router_identity: NodeIdentity,
) -> None:
    clock = Clock()
    signer = AssertionSigner(router_identity, "r1", ttl_s=30, clock=clock)
    verifier = AssertionVerifier(router_identity.public_key, "node-a", clock=clock)
    first = signer.assertion(ALICE, "node-a")
    clock.now += 10
    assert signer.assertion(ALICE, "node-a") == first  # reused for half its lifetime
    assert signer.assertion(ALICE, "node-b") != first
    assert verifier.principal(first) is verifier.principal(first)  # cached once verified
    clock.now += 6
    fresh = signer.assertion(ALICE, "node-a")
    assert fresh != first
    assert verifier.principal(fresh).org == "acme"
    clock.now += 30  # the first has expired; even the cache refuses it now
    with pytest.raises(AuthenticationError, match="expired"):
        verifier.principal(first)
