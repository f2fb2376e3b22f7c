"""`engine = "vllm"`: a Hugging Face model directory served by vLLM, run by the appliance."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from appliance._private.engines.supervised.config import Argument, SupervisedModel

VllmDtype = Literal["auto", "bfloat16", "float16", "float32"]


class VllmModel(SupervisedModel, tag="vllm", forbid_unknown_fields=True, kw_only=True):
    """`vllm serve <path>` on a private port (or `--model <path>` when `command` is an
    entry point such as `python -m vllm.entrypoints.openai.api_server`)."""

    command: Annotated[list[Argument], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["vllm", "serve"]
    )
    served_model_name: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    dtype: VllmDtype = "auto"
    tensor_parallel_size: Annotated[int, Meta(ge=1, le=64)] = 1
    # Fraction of each GPU's memory vLLM may take; unset: vLLM's own default (0.9).
    gpu_memory_utilization: Annotated[float, Meta(gt=0, le=1)] | None = None
    # Longest prompt plus completion; unset: context_length.
    max_model_len: Annotated[int, Meta(ge=64, le=10_485_760)] | None = None
    enforce_eager: bool = False  # no CUDA graphs (slower, starts faster, less memory)

    owned_flags: ClassVar[dict[str, str | None]] = {
        "--host": None,
        "--port": None,
        "--api-key": None,
        "--model": "path",
        "--served-model-name": "served_model_name",
        "--dtype": "dtype",
        "--tensor-parallel-size": "tensor_parallel_size",
        "-tp": "tensor_parallel_size",
        "--gpu-memory-utilization": "gpu_memory_utilization",
        "--max-model-len": "max_model_len",
        "--enforce-eager": "enforce_eager",
    }
