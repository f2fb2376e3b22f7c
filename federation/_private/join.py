"""The lab join secret: HMAC-signed fleet messages over plain HTTP, for test labs only.

Fleets authenticate with certificates (mTLS, see `pki`): a node's identity is its
certificate. This module is the explicit, off-by-default exception, kept so that a lab can
put plain-HTTP hops beside mTLS ones (the router benchmark does): with
`PALISADE_LAB_JOIN_SECRET` set, the router also accepts heartbeats without a certificate
when they carry `X-Palisade-Signature: t=<unix seconds>,v1=<hex>`, an HMAC-SHA256 over
`<t>.<body>` keyed with the shared secret, and an unenrolled appliance joins that way,
taking its node id and region from its flags. Nothing is encrypted and anyone holding the
secret can claim any node id and region: never use it outside a lab. A signature older
than the tolerance is refused, so a captured heartbeat cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable

from federation._private.errors import AuthenticationError, ConfigError

JOIN_SECRET_ENV = "PALISADE_LAB_JOIN_SECRET"  # noqa: S105 - the variable name, not a secret
SIGNATURE_HEADER = "X-Palisade-Signature"
_TOLERANCE_S = 30.0
_MIN_SECRET_CHARS = 16


log = logging.getLogger("palisade.fleet")


def join_secret(*, required: bool) -> bytes | None:
    """The lab join secret from `PALISADE_LAB_JOIN_SECRET`; a clear error if it is too weak.

    Whoever turns it on is told, loudly, what it gives up (`announce_lab_secret`)."""
    value = os.environ.get(JOIN_SECRET_ENV, "")
    if not value:
        if required:
            raise ConfigError(
                f"{JOIN_SECRET_ENV} is not set. It is a lab switch for plain-HTTP fleets; real "
                "fleets enroll their nodes (`palisade fleet token create`, `palisade node "
                "enroll`)."
            )
        return None
    if len(value) < _MIN_SECRET_CHARS:
        raise ConfigError(
            f"{JOIN_SECRET_ENV} is {len(value)} characters; use at least {_MIN_SECRET_CHARS} "
            "(for example `secrets.token_urlsafe(32)`)."
        )
    return value.encode()


def announce_lab_secret(role: str) -> None:
    log.warning(
        "LAB MODE (%s is set): this %s accepts plain-HTTP fleet members that prove only "
        "the shared secret, with whatever node id and region they claim. Insecure: for test "
        "labs only; unset it and enroll nodes for a real fleet.",
        JOIN_SECRET_ENV,
        role,
    )


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
