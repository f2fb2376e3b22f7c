"""The router's exception tree.

federation.PalisadeError
└── RouterError
    ├── NoBackendError              503 no_backend_in_region   (ServiceUnavailableError)
    ├── BackendUnavailableError     502 backend_unavailable    (APIError)
    ├── BackendCrashedError         502 backend_crashed        (APIError)
    └── RegionHeaderError           403 residency_violation    (PermissionDeniedError)

A node the request never reached (refused, no connection in time, already down) is retried
elsewhere in the same residency set; `NoBackendError` and `BackendUnavailableError` are what
the client sees when that runs out. A node that failed while it held the request is not
retried, since the request may be what killed it: `BackendCrashedError`.
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


class BackendCrashedError(RouterError, APIError):
    status_code = 502
    error_type = "server_error"
    default_code = "backend_crashed"

    def __init__(self, node: str, region: str, model: str, reason: str) -> None:
        super().__init__(
            f"Node `{node}` ({region}) failed while handling this request for `{model}` "
            f"({reason}). It was not retried on another node because the request itself may "
            "have caused the failure; if it was not the cause, sending it again is safe."
        )


class RegionHeaderError(RouterError, PermissionDeniedError):
    default_code = "residency_violation"
