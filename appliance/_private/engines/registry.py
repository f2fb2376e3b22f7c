"""Which engines exist: `engine` tag → config Struct → factory, imported only when used.

Adding an engine is a directory under `engines/` (its `config.py` with a
`ModelConfigBase` subclass tagged with its name, and the engine class) and one line in
`ENGINES`. Config decoding, startup, validation and the HTTP layer find it from here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from appliance._private.engines.base import Engine, EngineContext
from appliance._private.engines.config import ModelConfigBase
from appliance._private.engines.llamacpp.config import LlamaCppModel
from appliance._private.engines.onnx.config import OnnxModel
from appliance._private.engines.scripted.config import ScriptedModel
from appliance._private.engines.tensorrt_llm.config import TensorRTLLMModel
from appliance._private.engines.upstream.config import UpstreamModel
from appliance._private.engines.vllm.config import VllmModel


@dataclass(frozen=True, slots=True)
class EngineEntry:
    config: type[ModelConfigBase]
    factory: str  # "module:Class" under this package, called as Class(config, context)

    @property
    def tag(self) -> str:
        return str(self.config.__struct_config__.tag)


ENGINES: dict[str, EngineEntry] = {
    entry.tag: entry
    for entry in (
        EngineEntry(LlamaCppModel, "llamacpp.engine:LlamaCppEngine"),
        EngineEntry(UpstreamModel, "upstream.engine:OpenAIUpstreamEngine"),
        EngineEntry(ScriptedModel, "scripted.engine:ScriptedEngine"),
        EngineEntry(VllmModel, "vllm.engine:VllmEngine"),
        EngineEntry(TensorRTLLMModel, "tensorrt_llm.engine:TensorRTLLMEngine"),
        EngineEntry(OnnxModel, "onnx.engine:OnnxEngine"),
    )
}

if TYPE_CHECKING:
    ModelConfig = ModelConfigBase
else:
    # msgspec decodes `[[models]]` by the `engine` tag into one of these.
    ModelConfig = Union[tuple(entry.config for entry in ENGINES.values())]  # noqa: UP007


def create_engine(config: ModelConfigBase, context: EngineContext) -> Engine:
    """The engine for `config`, its module imported now (not at startup of the CLI)."""
    module, _, name = ENGINES[config.engine].factory.partition(":")
    factory: Any = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    engine: Engine = factory(config, context)
    return engine
