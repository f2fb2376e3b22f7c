"""`engine = "onnx"`: an ONNX graph run in-process by ONNX Runtime (tensors in, tensors out)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from appliance._private.engines.config import ModelConfigBase

# ONNX Runtime's execution provider names ("CUDAExecutionProvider").
ProviderName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9]+ExecutionProvider$")]
# TensorRT first, then CUDA, then the CPU: the first one this onnxruntime has is used.
PROVIDER_PREFERENCE: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


class OnnxModel(ModelConfigBase, tag="onnx", forbid_unknown_fields=True, kw_only=True):
    """An `.onnx` file at `path`, served on `POST /api/v1/models/{id}/predict`."""

    # Execution providers in order of preference; None: those of PROVIDER_PREFERENCE that
    # this onnxruntime has. Naming one it lacks fails the load, listing what it has.
    providers: Annotated[list[ProviderName], Meta(min_length=1, max_length=8)] | None = None
    intra_op_threads: Annotated[int, Meta(ge=0, le=1024)] = 0  # 0: ONNX Runtime's default
    max_concurrency: Annotated[int, Meta(ge=1, le=1024)] = 1  # predictions run at once
    # The most input elements one request may carry (all inputs together).
    max_elements: Annotated[int, Meta(ge=1, le=1 << 30)] = 1 << 20

    def check(self, where: str, source: str) -> None:
        self.requires_path(where, source, "the .onnx file")
