"""Principal assertions: how the router tells an appliance who is calling.

The router authenticates the API key, computes the effective regions, and forwards the
request with `X-Palisade-Assertion: <claims>.<signature>` (both base64url): the principal
(org, user, key id, regions, logging mode), the node it is meant for, and a short
lifetime, signed with the router's Ed25519 key. The appliance verifies it with the
router's public key; a wrong key, another node's assertion or an expired one is refused.

Both sides cache: the router reuses an assertion for the same principal and node for half
its lifetime, and the appliance remembers assertions it has already verified, so the
Ed25519 work is paid about once per principal per node per 15 s, not once per request.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable

import msgspec
from msgspec import Struct

from federation._private.errors import AuthenticationError
from federation._private.identity import NodeIdentity, signature_valid
from federation._private.principal import Principal

ASSERTION_HEADER = "X-Palisade-Assertion"
DEFAULT_TTL_S = 30.0
_SKEW_S = 5.0
_CACHE_LIMIT = 10_000


class Claims(Struct, array_like=True, forbid_unknown_fields=True):
    org: str
    user: str
    key_id: str | None
    regions: list[str]
    role: str
    logging_mode: str
    audience: str
    issuer: str
    issued_at: float
    expires_at: float


_ENCODER = msgspec.json.Encoder()
_CLAIMS = msgspec.json.Decoder(Claims)


class AssertionSigner:
    """The router's side: one signed assertion per (principal, node), refreshed at half-life."""

    def __init__(
        self,
        identity: NodeIdentity,
        issuer: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._identity = identity
        self._issuer = issuer
        self._ttl = ttl_s
        self._clock = clock
        self._cache: dict[tuple[Principal, str], tuple[str, float]] = {}

    def assertion(self, principal: Principal, node_id: str) -> str:
        now = self._clock()
        cached = self._cache.get((principal, node_id))
        if cached is not None and cached[1] > now:
            return cached[0]
        claims = Claims(
            org=principal.org,
            user=principal.user,
            key_id=principal.key_id,
            regions=sorted(principal.regions or ()),
            role=principal.role,
            logging_mode=principal.logging_mode,
            audience=node_id,
            issuer=self._issuer,
            issued_at=now,
            expires_at=now + self._ttl,
        )
        payload = _ENCODER.encode(claims)
        token = _b64(payload) + "." + _b64(self._identity.sign(payload))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[(principal, node_id)] = (token, now + self._ttl / 2)
        return token


class AssertionVerifier:
    """The appliance's side: checks signature, audience and lifetime; caches what passed."""

    def __init__(
        self,
        public_key: bytes,
        node_id: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.public_key = public_key
        self._node_id = node_id
        self._clock = clock
        self._cache: dict[str, tuple[Principal, float]] = {}

    def principal(self, token: str) -> Principal:
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            if cached[1] + _SKEW_S >= now:
                return cached[0]
            del self._cache[token]
        claims = self._verified_claims(token)
        if claims.audience != self._node_id:
            raise _refused(f"it was issued for node `{claims.audience}`, not this one")
        if claims.expires_at + _SKEW_S < now:
            raise _refused("it has expired; the router issues fresh ones, so check both clocks")
        if claims.issued_at - _SKEW_S > now:
            raise _refused("it was issued in the future; check both machines' clocks")
        principal = Principal(
            org=claims.org,
            user=claims.user,
            key_id=claims.key_id,
            regions=frozenset(claims.regions),
            role=claims.role,
            logging_mode=claims.logging_mode,
            via=claims.issuer,
        )
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (principal, claims.expires_at)
        return principal

    def _verified_claims(self, token: str) -> Claims:
        payload_text, dot, signature_text = token.partition(".")
        try:
            payload, signature = _unb64(payload_text), _unb64(signature_text)
        except (binascii.Error, ValueError):
            raise _refused("it is not two base64url parts") from None
        if not dot or not signature_valid(self.public_key, signature, payload):
            raise _refused("its signature does not verify with the router's public key")
        try:
            return _CLAIMS.decode(payload)
        except msgspec.DecodeError:
            raise _refused("its claims are malformed") from None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _refused(reason: str) -> AuthenticationError:
    return AuthenticationError(
        f"The router's principal assertion was refused: {reason}.", code="invalid_assertion"
    )
