"""`engine = "tensorrt_llm"`: a prebuilt TensorRT-LLM engine served by `trtllm-serve`."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from appliance._private.engines.supervised.config import Argument, SupervisedModel

# "trt" (alias "tensorrt"): a prebuilt engine directory; None leaves the flag out (releases
# before 0.19, where the TensorRT path was the default and only "pytorch" was accepted).
TrtBackend = Literal["trt", "tensorrt", "pytorch", "_autodeploy"]


class TensorRTLLMModel(
    SupervisedModel, tag="tensorrt_llm", forbid_unknown_fields=True, kw_only=True
):
    """`trtllm-serve <path> --tokenizer <tokenizer> …` on a private port; `path` is the
    engine directory `trtllm-build` wrote."""

    command: Annotated[list[Argument], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["trtllm-serve"]
    )
    # The Hugging Face tokenizer directory (relative: under the state directory); unset:
    # trtllm-serve looks in the engine directory.
    tokenizer: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    backend: TrtBackend | None = "trt"
    # Unset: what the engine was built with.
    max_batch_size: Annotated[int, Meta(ge=1, le=1_048_576)] | None = None
    max_num_tokens: Annotated[int, Meta(ge=1, le=16_777_216)] | None = None
    tp_size: Annotated[int, Meta(ge=1, le=64)] = 1
    # Fraction of the GPU memory left after the weights that the KV cache may take.
    kv_cache_free_gpu_memory_fraction: Annotated[float, Meta(gt=0, le=1)] = 0.9

    owned_flags: ClassVar[dict[str, str | None]] = {
        "--host": None,
        "--port": None,
        "--tokenizer": "tokenizer",
        "--backend": "backend",
        "--max_batch_size": "max_batch_size",
        "--max_num_tokens": "max_num_tokens",
        "--tp_size": "tp_size",
        "--kv_cache_free_gpu_memory_fraction": "kv_cache_free_gpu_memory_fraction",
    }
