"""The appliance's exception tree.

federation.PalisadeError
└── ApplianceError
    ├── ModelFetchError                    the default model could not be fetched or verified
    ├── ModelLoadError                     a GGUF file is missing or llama.cpp refused it
    │   └── ModelLoadFailedError           422 model_load_failed      (APIError) a runtime
    │       │                              add/reload could not load; the old version serves
    │       └── ModelDigestMismatchError   422 model_digest_mismatch  the file is not `sha256`
    ├── ModelConflictError                 409 model_exists / last_model (APIError)
    ├── ModelNotFoundError                 404 model_not_found        (NotFoundError)
    ├── ContextLengthExceededError         400 context_length_exceeded (InvalidRequestError)
    ├── UnsupportedParameterError          400 unsupported_parameter  (InvalidRequestError)
    ├── TensorInputError                   400 invalid_tensor, unknown_input, missing_input,
    │                                      shape_mismatch, dtype_mismatch, unknown_output
    │                                      (InvalidRequestError) bad predict inputs
    ├── QueueFullError                     503 queue_full             (ServiceUnavailableError)
    ├── ModelNotReadyError                 503 model_not_ready        (ServiceUnavailableError)
    ├── UpstreamUnavailableError           503 upstream_unavailable   (ServiceUnavailableError)
    │                                      the upstream refused the connection or did not
    │                                      accept it in time: the request never reached it
    ├── RouterRefusedError                 the router refused a heartbeat (logged, retried)
    ├── UpstreamRejectedError              4xx as the upstream said   (InvalidRequestError)
    └── UpstreamError                      502 upstream_error         (APIError) bad upstream reply
        └── UpstreamTimeoutError           504 upstream_timeout       no answer within the timeout

The `Upstream*` errors come from an OpenAI-compatible upstream engine (engines/upstream). An
`UpstreamRejectedError` keeps the upstream's status and code (a 400
`context_length_exceeded` stays one); its message says that the upstream refused.
"""

from __future__ import annotations

import functools

from federation import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    PalisadeError,
    ServiceUnavailableError,
)


class ApplianceError(PalisadeError):
    """Root of every error the appliance raises on purpose."""


class ModelFetchError(ApplianceError):
    """The default model could not be downloaded, extracted or verified."""


class ModelLoadError(ApplianceError):
    """A model file is missing or the engine could not load it."""


class ModelLoadFailedError(ModelLoadError, APIError):
    """A model (a runtime add or reload, or one at startup) could not be loaded; whatever
    served before keeps serving."""

    status_code = 422
    error_type = "invalid_request_error"
    default_code = "model_load_failed"


class ModelDigestMismatchError(ModelLoadFailedError):
    """The model's file (or directory manifest) does not have the configured `sha256`."""

    default_code = "model_digest_mismatch"

    def __init__(self, model: str, path: str, expected: str, actual: str) -> None:
        super().__init__(
            f"The model `{model}` was not loaded: {path} has SHA-256 {actual}, but its config "
            f"says sha256 = {expected}. The file is not the one configured (corrupted, or "
            "replaced); fix the file or the `sha256` key.",
            param="sha256",
        )


class ModelConflictError(ApplianceError, APIError):
    """A model change that contradicts what is served (an id already added, the last model
    removed)."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "model_conflict"


class ModelNotFoundError(ApplianceError, NotFoundError):
    default_code = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(
            f"The model `{model}` does not exist on this appliance. "
            f"Available models: {', '.join(available) or 'none'} (see GET /v1/models).",
            param="model",
        )


class ContextLengthExceededError(ApplianceError, InvalidRequestError):
    default_code = "context_length_exceeded"


class UnsupportedParameterError(ApplianceError, InvalidRequestError):
    default_code = "unsupported_parameter"

    def __init__(self, param: str, why: str) -> None:
        super().__init__(f"Unsupported parameter `{param}`: {why}", param=param)


class QueueFullError(ApplianceError, ServiceUnavailableError):
    default_code = "queue_full"


class ModelNotReadyError(ApplianceError, ServiceUnavailableError):
    default_code = "model_not_ready"


class UpstreamRejectedError(ApplianceError, InvalidRequestError):
    """The upstream engine refused the request (4xx): its status and code pass through."""

    default_code = "upstream_rejected"

    @staticmethod
    def for_status(
        status: int, message: str, code: str, param: str | None = None
    ) -> UpstreamRejectedError:
        retry_after = 1 if status == 429 else None
        return _rejected_class(status)(message, code=code, param=param, retry_after=retry_after)


@functools.cache
def _rejected_class(status: int) -> type[UpstreamRejectedError]:
    if status == 400:
        return UpstreamRejectedError
    error_type = "rate_limit_error" if status == 429 else "invalid_request_error"
    attributes = {"status_code": status, "error_type": error_type}
    return type(f"UpstreamRejected{status}Error", (UpstreamRejectedError,), attributes)


class UpstreamError(ApplianceError, APIError):
    """The upstream engine failed (5xx) or answered something that is not the OpenAI API."""

    status_code = 502
    error_type = "server_error"
    default_code = "upstream_error"


class UpstreamUnavailableError(ApplianceError, ServiceUnavailableError):
    """The upstream could not be reached at all. A 503 (with Retry-After), because the
    request never reached the upstream: the router may safely try another node, which it
    never does after a 502 (the request itself may have caused that failure)."""

    default_code = "upstream_unavailable"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, retry_after=1)


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    default_code = "upstream_timeout"


class RouterRefusedError(ApplianceError):
    """The fleet's router answered a heartbeat with an error (wrong secret, bad message)."""


class TensorInputError(ApplianceError, InvalidRequestError):
    """A predict request's tensors do not fit the model's graph: an unknown or missing
    input (`unknown_input`, `missing_input`), a shape or datatype the graph does not take
    (`shape_mismatch`, `dtype_mismatch`), an unknown output (`unknown_output`), or data
    that is not a tensor of its declared shape (`invalid_tensor`)."""

    default_code = "invalid_tensor"
