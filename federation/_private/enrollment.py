"""Enrollment tokens and the wire of `/federation/v1/enroll` and `/federation/v1/renew`.

An operator creates a token on the router (`palisade fleet token create`) and gives it
to whoever installs the node. The token is `pet1.<claims>.<signature>`: base64url JSON
claims, signed with the router's Ed25519 identity key. It is not a secret key to the
fleet (the router also keeps it in its registry, counts its uses and refuses one it does
not know), but it lets its holder enroll one node, so it is never logged.

A node reads the claims without verifying them (`read_token`): it learns the fleet URL
and the CA fingerprint it must pin. The router verifies them (`verify_token`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta, Struct

from federation._private.errors import (
    APIError,
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
)
from federation._private.fleet_wire import Name
from federation._private.identity import NodeIdentity, signature_valid
from federation._private.vocabulary import DeviceClass

TOKEN_PREFIX = "pet1"  # noqa: S105 - the format tag, not a secret
MAX_TOKEN_LENGTH = 4096
MAX_CSR_LENGTH = 16384


class TokenClaims(Struct, kw_only=True):
    """What an enrollment token allows: one region, maybe one node id and device class."""

    id: str
    fleet_id: str
    router_id: str
    region: str
    expires_at: float
    uses: int
    ca_fingerprint: str
    fleet_url: str
    node_id: str | None = None
    device_class: str | None = None


class EnrollmentConflictError(APIError):
    """409: the node id is already enrolled with another key."""

    status_code = 409
    error_type: ClassVar[str] = "conflict_error"
    default_code: ClassVar[str] = "node_key_mismatch"


def invalid_enrollment_token(reason: str) -> AuthenticationError:
    return AuthenticationError(
        f"The enrollment token is not valid: {reason}. Ask the fleet operator for a new "
        "one (`palisade fleet token create`).",
        code="invalid_enrollment_token",
        param="token",
    )


def enrollment_token_expired() -> AuthenticationError:
    return AuthenticationError(
        "The enrollment token has expired. Ask the fleet operator for a new one.",
        code="enrollment_token_expired",
        param="token",
    )


def enrollment_token_used() -> AuthenticationError:
    return AuthenticationError(
        "The enrollment token has already been used as many times as it allows. Ask the "
        "fleet operator for a new one.",
        code="enrollment_token_used",
        param="token",
    )


def enrollment_region_mismatch(token_region: str, region: str) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"The enrollment token is for region `{token_region}`, but this node is configured "
        f"for region `{region}`. Use a token for `{region}` or re-run `palisade node init`.",
        code="enrollment_region_mismatch",
        param="region",
    )


def enrollment_node_mismatch(field: str, allowed: str, asked: str | None) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"The enrollment token is for {field} `{allowed}`, but this node asks for "
        f"`{asked or 'any'}`.",
        code="enrollment_node_mismatch",
        param=field,
    )


def invalid_csr(reason: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The certificate request is not valid: {reason}.", code="invalid_csr", param="csr"
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_token(identity: NodeIdentity, claims: TokenClaims) -> str:
    body = f"{TOKEN_PREFIX}.{_b64(msgspec.json.encode(claims))}"
    return f"{body}.{_b64(identity.sign(body.encode('ascii')))}"


def _split(token: str) -> tuple[str, TokenClaims, bytes]:
    if len(token) > MAX_TOKEN_LENGTH:
        raise invalid_enrollment_token("it is too long")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise invalid_enrollment_token(
            f"it does not look like `{TOKEN_PREFIX}.<claims>.<signature>`"
        )
    try:
        claims = msgspec.json.decode(_unb64(parts[1]), type=TokenClaims)
        signature = _unb64(parts[2])
    except (binascii.Error, ValueError, msgspec.ValidationError) as exc:
        raise invalid_enrollment_token("it is malformed") from exc
    return f"{parts[0]}.{parts[1]}", claims, signature


def read_token(token: str) -> TokenClaims:
    """The claims, unverified: what a node learns from a token (fleet URL, CA pin)."""
    return _split(token)[1]


def token_signed_by(public_key: bytes, token: str) -> bool:
    """Whether `public_key` signed the token (expired or not): how a node checks that the
    router which answered its enrollment is the one that issued its token."""
    body, _claims, signature = _split(token)
    return signature_valid(public_key, signature, body.encode("ascii"))


def verify_token(public_key: bytes, token: str, now: float) -> TokenClaims:
    """The claims of a token signed by `public_key` that has not expired at `now`."""
    body, claims, signature = _split(token)
    if not signature_valid(public_key, signature, body.encode("ascii")):
        raise invalid_enrollment_token("it was not issued by this router")
    if now >= claims.expires_at:
        raise enrollment_token_expired()
    return claims


class EnrollRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """A node asks to join: its token, its certificate request, its node.toml identity."""

    token: Annotated[str, Meta(min_length=1, max_length=MAX_TOKEN_LENGTH)]
    csr: Annotated[str, Meta(min_length=1, max_length=MAX_CSR_LENGTH)]
    node_id: Name
    region: Name
    device_class: DeviceClass | None = None


class RenewRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """An enrolled node (known by its client certificate) asks for a fresh certificate."""

    csr: Annotated[str, Meta(min_length=1, max_length=MAX_CSR_LENGTH)]


class EnrollResponse(Struct, kw_only=True):
    """The node's certificate and what it pins: the CA, the router's key, the CRL."""

    certificate: str
    ca: str
    crl: str
    fleet_id: str
    router_id: str
    router_public_key: str
    node_id: str
    region: str
    device_class: str | None
    serial: int
    not_after: float
