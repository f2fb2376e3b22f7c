"""Signed, versioned policy snapshots: what every appliance of a fleet knows of its tenancy.

The router publishes a `PolicySnapshot` (orgs with their regions, budgets and logging
modes, users, API key ids with their secret hashes, roles and limits, and the revoked node
certificates with the CRL that lists them), signed with its Ed25519 identity key. An
appliance keeps the latest one on disk, checks the signature against the router key pinned
at enrollment, and refuses a version lower than or equal to the one it holds, so a replayed
old snapshot can never bring back a revoked key.

On the wire and on disk a snapshot is `SignedPolicy` JSON: the snapshot's JSON encoding in
`payload` and the Ed25519 signature over `CONTEXT + payload` in `signature`, both base64.
The signature covers the exact bytes that are decoded, so no canonical encoding is needed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

import msgspec
from msgspec import Struct, field

from federation._private.admin_wire import KeyLimits
from federation._private.errors import APIError, AuthenticationError
from federation._private.identity import NodeIdentity, signature_valid
from federation._private.keys import parse_key, secret_matches
from federation._private.store import _invalid_key

# Signed messages of different kinds can never be taken for one another.
CONTEXT = b"palisade-policy-snapshot-v1\n"
# How a principal authenticated from a snapshot is marked (`Principal.via`): the router
# vouched for the key through the snapshot, not per request, so the appliance itself admits
# and meters it.
FLEET_POLICY_VIA = "fleet-policy"
DEFAULT_GRACE_S = 24 * 3600.0


class PolicyRollbackError(APIError):
    """409 `policy_rollback`: a snapshot no newer than the one in force was offered."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "policy_rollback"


class OrgPolicy(Struct, kw_only=True, forbid_unknown_fields=True):
    """An org as the router knows it when it issues the snapshot."""

    name: str
    regions: list[str]
    logging_mode: str
    budget_tokens: int | None
    key_limits: KeyLimits = field(default_factory=KeyLimits)
    # Budget spent this month (`month`, UTC) as of `issued_at`: informative, not content.
    month: str = ""
    used_tokens: int = 0


class UserPolicy(Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    email: str
    role: str
    org: str | None


class KeyPolicy(Struct, kw_only=True, forbid_unknown_fields=True):
    """An API key: never the secret, only its SHA-256 (hex), as the router stores it."""

    key_id: str
    secret_hash: str
    org: str
    user: str
    role: str
    regions: list[str] | None
    limits: KeyLimits
    expires_at: str | None  # ISO 8601 UTC, as the tenancy store keeps it
    revoked: bool

    def __repr__(self) -> str:
        return f"KeyPolicy(key_id={self.key_id!r}, org={self.org!r}, revoked={self.revoked})"


class PolicySnapshot(Struct, kw_only=True, forbid_unknown_fields=True):
    version: int
    issued_at: float
    fleet_id: str
    router_id: str
    orgs: list[OrgPolicy]
    keys: list[KeyPolicy]
    users: list[UserPolicy]
    revoked_serials: list[int]
    crl_pem: str
    grace_s: float = DEFAULT_GRACE_S


class SignedPolicy(Struct, kw_only=True, forbid_unknown_fields=True):
    payload: str
    signature: str


_ENCODER = msgspec.json.Encoder()
_SNAPSHOT = msgspec.json.Decoder(PolicySnapshot)
_SIGNED = msgspec.json.Decoder(SignedPolicy)


def sign_policy(identity: NodeIdentity, snapshot: PolicySnapshot) -> bytes:
    """The snapshot as `SignedPolicy` JSON, signed with the router's identity key."""
    payload = _ENCODER.encode(snapshot)
    signature = identity.sign(CONTEXT + payload)
    signed = SignedPolicy(
        payload=base64.b64encode(payload).decode("ascii"),
        signature=base64.b64encode(signature).decode("ascii"),
    )
    return _ENCODER.encode(signed)


def verify_policy(public_key: bytes, blob: bytes) -> PolicySnapshot:
    """The snapshot in `blob` if `public_key` (raw Ed25519) signed it, else 401
    `policy_signature_invalid` (malformed blobs included)."""
    try:
        signed = _SIGNED.decode(blob)
        payload = base64.b64decode(signed.payload, validate=True)
        signature = base64.b64decode(signed.signature, validate=True)
    except (msgspec.DecodeError, binascii.Error, ValueError) as exc:
        raise _invalid("it is not a signed policy snapshot") from exc
    if not signature_valid(public_key, signature, CONTEXT + payload):
        raise _invalid("its signature does not verify with the router's pinned key")
    try:
        return _SNAPSHOT.decode(payload)
    except msgspec.DecodeError as exc:  # signed by the router, yet not a snapshot we know
        raise _invalid(f"its payload is not a policy snapshot ({exc})") from exc


def content_digest(snapshot: PolicySnapshot) -> str:
    """SHA-256 of what the snapshot says, leaving out its version, its issue time and the
    budget spent so far: two snapshots with the same digest grant exactly the same things."""
    stripped = msgspec.structs.replace(
        snapshot,
        version=0,
        issued_at=0.0,
        orgs=[msgspec.structs.replace(org, month="", used_tokens=0) for org in snapshot.orgs],
    )
    return hashlib.sha256(_ENCODER.encode(stripped)).hexdigest()


@dataclass(frozen=True, slots=True)
class FleetCaller:
    """A fleet API key authenticated from a snapshot, with its user and org."""

    key: KeyPolicy
    user: UserPolicy
    org: OrgPolicy


class PolicyIndex:
    """A snapshot's keys, users and orgs by id: what authenticating a fleet key needs."""

    def __init__(self, snapshot: PolicySnapshot) -> None:
        self.snapshot = snapshot
        self._keys = {key.key_id: key for key in snapshot.keys}
        self._hashes = {key.key_id: _hash_bytes(key.secret_hash) for key in snapshot.keys}
        self._users = {user.id: user for user in snapshot.users}
        self._orgs = {org.name: org for org in snapshot.orgs}

    def caller(self, presented: str, now: str) -> FleetCaller:
        """The caller behind `presented` as of `now` (ISO 8601 UTC), or 401
        `invalid_api_key` for an unknown, wrong, revoked or expired key, exactly as the
        router's tenancy store refuses it."""
        parsed = parse_key(presented)
        key = self._keys.get(parsed.key_id) if parsed is not None else None
        stored = self._hashes.get(parsed.key_id) if parsed is not None else None
        if parsed is None or key is None or not stored or not secret_matches(parsed.secret, stored):
            raise _invalid_key()
        if key.revoked or (key.expires_at is not None and key.expires_at <= now):
            raise _invalid_key()
        user = self._users.get(key.user)
        org = self._orgs.get(key.org)
        if user is None or org is None:
            raise _invalid_key()
        return FleetCaller(key, user, org)


def _hash_bytes(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""  # matches no secret


def _invalid(reason: str) -> AuthenticationError:
    return AuthenticationError(
        f"Refused a policy snapshot: {reason}. The snapshot in force is unchanged.",
        code="policy_signature_invalid",
    )
