"""GPU offload for llama.cpp: the `Llama(...)` arguments built from the config, how the
offload is reported, and the refusal of a GPU config on this machine's CPU-only build."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from appliance._private.engines.base import EngineContext
from appliance._private.engines.llamacpp.config import LlamaCppModel
from appliance._private.engines.llamacpp.engine import LlamaCppEngine
from appliance._private.engines.llamacpp.gpu import accelerator, gpu_kwargs
from appliance._private.errors import ModelLoadError
from tests.support import default_model_path, model_toml, run_palisade, write_config


def model(**keys: object) -> LlamaCppModel:
    return LlamaCppModel(id="m", path="m.gguf", **keys)  # type: ignore[arg-type]


def engine(config: LlamaCppModel) -> LlamaCppEngine:
    context = EngineContext(Path("."), default_model_path(), on_finish=lambda *_: None)
    return LlamaCppEngine(config, context)


def test_the_default_config_offloads_nothing() -> None:
    assert gpu_kwargs(model(), llama_cpp) == {
        "n_gpu_layers": 0,
        "main_gpu": 0,
        "split_mode": llama_cpp.LLAMA_SPLIT_MODE_LAYER,  # llama.cpp's own default
    }
    assert accelerator(model()) == "cpu"


@pytest.mark.parametrize(
    ("split", "mode", "label"),
    [
        ("none", llama_cpp.LLAMA_SPLIT_MODE_NONE, "gpu:1 (32 layers)"),
        ("row", llama_cpp.LLAMA_SPLIT_MODE_ROW, "gpu:1 (32 layers, row split)"),
        ("layer", llama_cpp.LLAMA_SPLIT_MODE_LAYER, "gpu (32 layers, layer split)"),
    ],
)
def test_offload_keys_become_llama_arguments_and_the_accelerator(
    split: str, mode: int, label: str
) -> None:
    config = model(n_gpu_layers=32, main_gpu=1, split_mode=split)
    assert gpu_kwargs(config, llama_cpp) == {"n_gpu_layers": 32, "main_gpu": 1, "split_mode": mode}
    assert accelerator(config) == label
    assert engine(config).capabilities.accelerator == label


def test_all_layers_are_named_so() -> None:
    assert accelerator(model(n_gpu_layers=-1, split_mode="none")) == "gpu:0 (all layers)"


@pytest.mark.skipif(
    llama_cpp.llama_supports_gpu_offload(), reason="this llama-cpp-python build can offload"
)
def test_a_gpu_config_is_refused_on_a_cpu_only_build() -> None:
    gpu = engine(model(n_gpu_layers=8))
    with pytest.raises(ModelLoadError) as refused:
        gpu.load()
    message = str(refused.value)
    assert "asks for GPU offload (n_gpu_layers = 8)" in message
    assert "CPU-only build" in message
    assert "-DGGML_CUDA=on" in message
    assert "n_gpu_layers = 0" in message
    assert not gpu.ready
    gpu.close()


@pytest.mark.skipif(
    llama_cpp.llama_supports_gpu_offload(), reason="this llama-cpp-python build can offload"
)
def test_the_appliance_does_not_start_a_gpu_model_on_the_cpu(tmp_path: Path) -> None:
    config = write_config(tmp_path, model_toml(n_gpu_layers=-1, split_mode="none"))
    result = run_palisade(
        "appliance", "serve", "--port", "0", "--no-auth", *config,
        env={"PALISADE_HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "asks for GPU offload (n_gpu_layers = -1)" in result.stderr
