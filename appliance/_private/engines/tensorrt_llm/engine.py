"""`TensorRTLLMEngine`: `trtllm-serve` for a prebuilt engine, supervised by the appliance."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from appliance._private.engines.base import EngineContext
from appliance._private.engines.supervised.engine import SupervisedEngine
from appliance._private.engines.tensorrt_llm.config import TensorRTLLMModel


def trtllm_command(
    config: TensorRTLLMModel, path: Path, port: int, tokenizer: Path | None
) -> list[str]:
    """`trtllm-serve <engine dir> --tokenizer … --host 127.0.0.1 --port N --backend trt …`."""
    command = [*config.command, str(path)]
    if tokenizer is not None:
        command += ["--tokenizer", str(tokenizer)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if config.backend is not None:
        command += ["--backend", config.backend]
    if config.max_batch_size is not None:
        command += ["--max_batch_size", str(config.max_batch_size)]
    if config.max_num_tokens is not None:
        command += ["--max_num_tokens", str(config.max_num_tokens)]
    command += ["--tp_size", str(config.tp_size)]
    fraction = f"{config.kv_cache_free_gpu_memory_fraction:g}"
    command += ["--kv_cache_free_gpu_memory_fraction", fraction]
    return command + config.extra_args


class TensorRTLLMEngine(SupervisedEngine):
    # trtllm-serve's /metrics is JSON iteration statistics; Prometheus text is here.
    metrics_path: ClassVar[str | None] = "/prometheus/metrics"

    def __init__(self, config: TensorRTLLMModel, context: EngineContext) -> None:
        self._trt = config
        super().__init__(config, context)

    @property
    def served_name(self) -> str:
        # trtllm-serve names the model after its engine directory (and, unlike vLLM, does
        # not check the name a request gives).
        path = self._context.path
        return path.name if path is not None else self._trt.id

    def command(self, path: Path, port: int) -> list[str]:
        return trtllm_command(self._trt, path, port, self.tokenizer_path())

    def tokenizer_path(self) -> Path | None:
        if self._trt.tokenizer is None:
            return None
        tokenizer = Path(self._trt.tokenizer).expanduser()
        return tokenizer if tokenizer.is_absolute() else self._context.home / tokenizer

    def engine_environment(self) -> dict[str, str]:
        return {"HF_HUB_OFFLINE": "1"}
