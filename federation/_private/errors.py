"""Errors shared by every Palisade package.

    PalisadeError                      root of everything Palisade raises on purpose
    ├── ConfigError                    a config file or flag is wrong (names the key)
    └── APIError                       answered over HTTP in the OpenAI error shape
        ├── InvalidRequestError        400 invalid_request_error
        ├── AuthenticationError        401 authentication_error
        ├── PermissionDeniedError      403 permission_error
        ├── NotFoundError              404 not_found_error
        ├── RateLimitError             429 rate_limit_error (carries Retry-After)
        └── ServiceUnavailableError    503 service_unavailable (carries Retry-After)
            └── StoreError             503 store_unavailable: the policy database failed
                                       (database.py; at start-up, the server exits)

Each package draws its own tree under `PalisadeError`; an HTTP-facing error there also
inherits the matching `APIError` class so one handler renders every error the same way.
"""

from __future__ import annotations

from typing import ClassVar


class PalisadeError(Exception):
    """Root of every error Palisade raises on purpose."""


class ConfigError(PalisadeError):
    """A configuration file or flag is wrong; the message names the key and the fix."""


class APIError(PalisadeError):
    """An error answered over HTTP as `{"error": {"message", "type", "code", "param"}}`."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.retry_after = retry_after


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class NotFoundError(APIError):
    status_code = 404
    error_type = "not_found_error"
    default_code = "not_found"


class RateLimitError(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"
