"""Who is calling: the one thing every inference route asks for before doing work."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of a request.

    `regions` is the set of regions the caller may be served in; `None` means the
    principal is not region-restricted (a local, single-user appliance). `via` names the
    router that authenticated the caller and vouched for it in a signed assertion; that
    router enforces limits and budgets and meters usage, so the appliance does not again.
    """

    org: str
    user: str
    key_id: str | None = None
    regions: frozenset[str] | None = None
    role: str = "org_user"
    logging_mode: str = "metadata"
    via: str | None = None


LOCAL_PRINCIPAL = Principal(org="local", user="local")
