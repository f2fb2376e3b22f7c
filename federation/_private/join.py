"""The fleet join secret: HMAC-signed fleet messages, so the secret never crosses the wire.

Every fleet request and reply carries `X-Palisade-Signature: t=<unix seconds>,v1=<hex>`,
an HMAC-SHA256 over `<t>.<body>` keyed with the join secret shared by the router and its
appliances (`PALISADE_JOIN_SECRET`). A signature older than the tolerance is refused, so a
captured heartbeat cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable

from federation._private.errors import AuthenticationError, ConfigError

JOIN_SECRET_ENV = "PALISADE_JOIN_SECRET"  # noqa: S105 - the variable name, not a secret
SIGNATURE_HEADER = "X-Palisade-Signature"
_TOLERANCE_S = 30.0
_MIN_SECRET_CHARS = 16


def join_secret(*, required: bool) -> bytes | None:
    """The fleet join secret from `PALISADE_JOIN_SECRET`; a clear error if it is too weak."""
    value = os.environ.get(JOIN_SECRET_ENV, "")
    if not value:
        if required:
            raise ConfigError(
                f"{JOIN_SECRET_ENV} is not set. The router and its appliances share this secret; "
                "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'` "
                "and export it for both."
            )
        return None
    if len(value) < _MIN_SECRET_CHARS:
        raise ConfigError(
            f"{JOIN_SECRET_ENV} is {len(value)} characters; use at least {_MIN_SECRET_CHARS} "
            "(for example `secrets.token_urlsafe(32)`)."
        )
    return value.encode()


def sign_fleet_message(secret: bytes, body: bytes, *, now: float | None = None) -> str:
    stamp = int(time.time() if now is None else now)
    return f"t={stamp},v1={_mac(secret, stamp, body)}"


def verify_fleet_message(
    secret: bytes,
    body: bytes,
    header: str | None,
    *,
    clock: Callable[[], float] = time.time,
) -> None:
    """Raise `AuthenticationError` unless `header` signs `body` with `secret`, recently."""
    if not header:
        raise _refused(f"the {SIGNATURE_HEADER} header is missing")
    fields = dict(part.partition("=")[::2] for part in header.split(","))
    try:
        stamp = int(fields["t"])
        given = fields["v1"]
    except (KeyError, ValueError):
        raise _refused(f"the {SIGNATURE_HEADER} header is malformed") from None
    if abs(clock() - stamp) > _TOLERANCE_S:
        raise _refused(
            f"the signature is {abs(clock() - stamp):.0f} s away from this clock "
            f"(tolerance {_TOLERANCE_S:.0f} s); check both machines' clocks"
        )
    if not hmac.compare_digest(_mac(secret, stamp, body), given):
        raise _refused(f"the signature does not match; check that {JOIN_SECRET_ENV} is the same")


def _mac(secret: bytes, stamp: int, body: bytes) -> str:
    return hmac.new(secret, str(stamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def _refused(reason: str) -> AuthenticationError:
    return AuthenticationError(f"Fleet message refused: {reason}.", code="invalid_join_signature")
