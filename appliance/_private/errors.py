"""The appliance's exception tree.

federation.PalisadeError
└── ApplianceError
    ├── ModelFetchError                    the default model could not be fetched or verified
    ├── ModelLoadError                     a GGUF file is missing or llama.cpp refused it
    ├── ModelNotFoundError                 404 model_not_found        (NotFoundError)
    ├── ContextLengthExceededError         400 context_length_exceeded (InvalidRequestError)
    ├── UnsupportedParameterError          400 unsupported_parameter  (InvalidRequestError)
    ├── QueueFullError                     503 queue_full             (ServiceUnavailableError)
    └── ModelNotReadyError                 503 model_not_ready        (ServiceUnavailableError)
"""

from __future__ import annotations

from federation import (
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
