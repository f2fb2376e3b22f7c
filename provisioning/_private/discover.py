"""`palisade node enroll --discover`: the router's fleet URL from its zeroconf announcement.

Only the URL comes from the network. The router must announce the fleet id and CA
fingerprint that the token names; enrollment then checks the CA it downloads against that
fingerprint (and `--ca-fingerprint`, if given) and talks TLS verified against it, exactly
as with `--router`. An announcement with another CA is ignored (and logged).
"""

from __future__ import annotations

from federation import PalisadeError, find_router, read_token
from provisioning._private.bringup import BringupError

DISCOVER_TIMEOUT_S = 10.0


def discovered_fleet_url(
    token: str, interfaces: list[str], timeout_s: float = DISCOVER_TIMEOUT_S
) -> str:
    """The fleet URL announced by a router of the token's fleet with the token's CA."""
    try:
        claims = read_token(token)
    except PalisadeError as exc:
        raise BringupError(str(exc), code="invalid_enrollment_token") from None
    pin = claims.ca_fingerprint
    try:
        found = find_router(claims.fleet_id, timeout_s, ca_fingerprint=pin, interfaces=interfaces)
    except (ValueError, OSError) as exc:  # not one IPv4 address, or none of this machine's
        raise BringupError(f"--interface: {exc}.", code="invalid_interface") from None
    if found is None:
        raise BringupError(
            f"No router of fleet {claims.fleet_id} announcing CA {pin} answered on "
            f"{', '.join(interfaces)} within {timeout_s:.0f} s. Check that the router runs "
            "with discovery on (`[discovery] enabled = true`) on this network, or pass "
            "--router with its fleet URL.",
            code="router_not_found",
        )
    return found.url
