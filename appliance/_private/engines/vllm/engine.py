"""`VllmEngine`: vLLM's OpenAI server, started, supervised and stopped by the appliance."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from appliance._private.engines.base import EngineContext
from appliance._private.engines.supervised.engine import SupervisedEngine
from appliance._private.engines.vllm.config import VllmModel

# What vLLM's API server logs when its engine core goes away under SIGTERM: not a failure.
_SHUTDOWN_NOISE = re.compile(r"EngineDeadError|died unexpectedly")


def vllm_command(config: VllmModel, path: Path, port: int) -> list[str]:
    """`vllm serve <path> …`, or `… --model <path> …` for an entry point such as
    `python -m vllm.entrypoints.openai.api_server` (any command not ending in `serve`)."""
    model = [str(path)] if config.command[-1] == "serve" else ["--model", str(path)]
    command = [*config.command, *model, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--served-model-name", config.served_model_name or config.id]
    command += ["--dtype", config.dtype, "--tensor-parallel-size", str(config.tensor_parallel_size)]
    if config.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", f"{config.gpu_memory_utilization:g}"]
    command += ["--max-model-len", str(config.max_model_len or config.context_length)]
    if config.enforce_eager:
        command.append("--enforce-eager")
    return command + config.extra_args


def vllm_environment(workdir: Path) -> dict[str, str]:
    """vLLM's defaults here: no Hub downloads, its caches in the model's own directory,
    and no usage statistics sent anywhere."""
    return {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(workdir / "cache"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


class VllmEngine(SupervisedEngine):
    shutdown_noise: ClassVar[re.Pattern[str] | None] = _SHUTDOWN_NOISE
    api_key_env: ClassVar[str | None] = "VLLM_API_KEY"  # vLLM's --api-key, unseen in `ps`

    def __init__(self, config: VllmModel, context: EngineContext) -> None:
        self._vllm = config
        super().__init__(config, context)

    @property
    def served_name(self) -> str:
        return self._vllm.served_model_name or self._vllm.id

    def command(self, path: Path, port: int) -> list[str]:
        return vllm_command(self._vllm, path, port)

    def engine_environment(self) -> dict[str, str]:
        return vllm_environment(self.workdir)
