"""GPU offload for llama.cpp: the `Llama(...)` arguments a model's config asks for, the
refusal of a GPU config on a CPU-only build, and how the offload is reported.

A model certified for a GPU must not quietly run on the CPU: with `n_gpu_layers != 0` and a
llama-cpp-python built without a GPU backend, llama.cpp would load every layer on the CPU
without a word, so the load is refused instead.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from appliance._private.engines.llamacpp.config import LlamaCppModel
from appliance._private.errors import ModelLoadError

_SPLIT_MODES = {
    "none": "LLAMA_SPLIT_MODE_NONE",  # the whole model on `main_gpu`
    "layer": "LLAMA_SPLIT_MODE_LAYER",  # layers (and KV) spread over the GPUs
    "row": "LLAMA_SPLIT_MODE_ROW",  # rows of each tensor spread; `main_gpu` keeps the rest
}


def gpu_kwargs(config: LlamaCppModel, lib: ModuleType) -> dict[str, Any]:
    """The `Llama(...)` keyword arguments for `config`'s offload (`lib`: `llama_cpp`)."""
    return {
        "n_gpu_layers": config.n_gpu_layers,
        "main_gpu": config.main_gpu,
        "split_mode": int(getattr(lib, _SPLIT_MODES[config.split_mode])),
    }


def accelerator(config: LlamaCppModel) -> str:
    """Where the model runs, for `Capabilities.accelerator`: "cpu", "gpu:0 (32 layers)",
    "gpu (all layers, layer split)", "gpu:1 (20 layers, row split)"."""
    if config.n_gpu_layers == 0:
        return "cpu"
    layers = "all layers" if config.n_gpu_layers == -1 else f"{config.n_gpu_layers} layers"
    if config.split_mode == "none":
        return f"gpu:{config.main_gpu} ({layers})"
    if config.split_mode == "row":
        return f"gpu:{config.main_gpu} ({layers}, row split)"
    return f"gpu ({layers}, layer split)"  # main_gpu plays no part in a layer split


def check_gpu_offload(config: LlamaCppModel, lib: ModuleType) -> None:
    """Refuse a GPU offload this llama.cpp build cannot do (`ModelLoadError` with the fix)."""
    if config.n_gpu_layers == 0 or lib.llama_supports_gpu_offload():
        return
    raise ModelLoadError(
        f"`{config.id}` asks for GPU offload (n_gpu_layers = {config.n_gpu_layers}), but the "
        "installed llama-cpp-python is a CPU-only build (llama_supports_gpu_offload() is "
        "false), so the model would silently run on the CPU. Install a GPU build, e.g. "
        'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
        "llama-cpp-python (or -DGGML_VULKAN=on, -DGGML_METAL=on), or set n_gpu_layers = 0 "
        "to run this model on the CPU."
    )
