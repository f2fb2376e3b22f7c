"""The edge node's data plane: engines, scheduling, the OpenAI endpoints and metrics."""

from appliance._private.app import ApplianceState, Node, create_app
from appliance._private.cli import appliance_cli, models_cli
from appliance._private.config import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_ID,
    DEFAULT_PORT,
    ApplianceConfig,
    load_appliance_config,
    palisade_home,
)
from appliance._private.engines.base import (
    Capabilities,
    ChoiceDelta,
    Engine,
    EngineLoad,
    Finish,
    Generation,
    Prompt,
    RequestFeatures,
    SamplingParams,
)
from appliance._private.engines.config import ModelConfigBase
from appliance._private.engines.llamacpp.config import LlamaCppModel
from appliance._private.engines.llamacpp.engine import LlamaCppEngine
from appliance._private.engines.registry import ENGINES, ModelConfig, create_engine
from appliance._private.engines.supervised.engine import ENGINE_PROCESS_SERIES
from appliance._private.engines.upstream.config import UpstreamModel
from appliance._private.engines.upstream.engine import OpenAIUpstreamEngine
from appliance._private.errors import (
    ApplianceError,
    ContextLengthExceededError,
    ModelFetchError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
    RouterRefusedError,
    UnsupportedParameterError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from appliance._private.metrics import ApplianceMetrics
from appliance._private.model_store import (
    DEFAULT_MODEL_SHA256,
    FetchResult,
    InstalledModel,
    fetch_default_model,
    installed_models,
)

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_SHA256",
    "DEFAULT_PORT",
    "ENGINES",
    "ENGINE_PROCESS_SERIES",
    "ApplianceConfig",
    "ApplianceError",
    "ApplianceMetrics",
    "ApplianceState",
    "Capabilities",
    "ChoiceDelta",
    "ContextLengthExceededError",
    "Engine",
    "EngineLoad",
    "FetchResult",
    "Finish",
    "Generation",
    "InstalledModel",
    "LlamaCppEngine",
    "LlamaCppModel",
    "ModelConfig",
    "ModelConfigBase",
    "ModelFetchError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "Node",
    "OpenAIUpstreamEngine",
    "Prompt",
    "QueueFullError",
    "RequestFeatures",
    "RouterRefusedError",
    "SamplingParams",
    "UnsupportedParameterError",
    "UpstreamError",
    "UpstreamModel",
    "UpstreamRejectedError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "appliance_cli",
    "create_app",
    "create_engine",
    "fetch_default_model",
    "installed_models",
    "load_appliance_config",
    "models_cli",
    "palisade_home",
]
