"""The router's exception tree.

federation.PalisadeError
└── RouterError
    ├── NoBackendError              503 no_backend_in_region   (ServiceUnavailableError)
    ├── BackendUnavailableError     502 backend_unavailable    (APIError)
    └── RegionHeaderError           403 residency_violation    (PermissionDeniedError)

A node that fails before the first byte reaches the client is retried elsewhere (in the
same residency set); these errors are what the client sees when that runs out.
"""

from __future__ import annotations

from federation import APIError, PalisadeError, PermissionDeniedError, ServiceUnavailableError


class RouterError(PalisadeError):
    """Root of every error the router raises on purpose."""


class NoBackendError(RouterError, ServiceUnavailableError):
    default_code = "no_backend_in_region"

    def __init__(self, model: str, regions: frozenset[str], tried: int = 0) -> None:
        where = ", ".join(sorted(regions)) or "no region"
        detail = f"; {tried} tried did not answer" if tried else ""
        super().__init__(
            f"No healthy node serves `{model}` in the regions this key may use ({where}){detail}. "
            "Requests never leave those regions; retry shortly, or ask an operator to bring a "
            "node up there (`palisade fleet status`).",
            retry_after=1,
        )


class BackendUnavailableError(RouterError, APIError):
    status_code = 502
    error_type = "server_error"
    default_code = "backend_unavailable"

    def __init__(self, model: str, tried: list[str]) -> None:
        super().__init__(
            f"{len(tried)} nodes serving `{model}` failed before answering "
            f"({', '.join(tried)}); retry shortly.",
            retry_after=1,
        )


class RegionHeaderError(RouterError, PermissionDeniedError):
    default_code = "residency_violation"
