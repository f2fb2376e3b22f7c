"""`OnnxEngine`: an ONNX graph run in-process by ONNX Runtime, for predictions only.

The session runs on the execution provider chosen at load (TensorRT, then CUDA, then the
CPU, by what this onnxruntime has; or the config's `providers`), and that provider is the
model's accelerator in /v1/models, the heartbeat and `X-Palisade-Device`. Predictions run
in a pool of `max_concurrency` threads (ONNX Runtime's `run` releases the interpreter lock
and is safe to call concurrently), behind the shared admission queue: beyond
`max_concurrency` running and `max_queue` waiting, a request gets 503 `queue_full`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, NoReturn

from numpy.typing import NDArray

from appliance._private.engines.admission import AdmissionQueue
from appliance._private.engines.base import (
    Capabilities,
    EngineContext,
    EngineLoad,
    Generation,
    Prompt,
    RequestFeatures,
    SamplingParams,
    TensorSpec,
)
from appliance._private.engines.onnx.config import PROVIDER_PREFERENCE, OnnxModel
from appliance._private.errors import (
    ModelLoadError,
    ModelNotReadyError,
    TensorInputError,
    UnsupportedParameterError,
)
from federation import APIError

log = logging.getLogger("palisade.appliance.onnx")

# ONNX Runtime's element types that the predict API carries, by their wire names.
DATATYPES: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}
_ERROR_LEVEL = 3  # ONNX Runtime's log severity: errors only (0 is verbose)
_MAX_ERROR_TEXT = 400
_ERROR_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ")


def choose_providers(model: str, configured: list[str] | None, available: list[str]) -> list[str]:
    """The execution providers to ask for, best first: the configured ones (each must be
    available), else those of PROVIDER_PREFERENCE this onnxruntime has."""
    if configured is None:
        return [name for name in PROVIDER_PREFERENCE if name in available]
    missing = [name for name in configured if name not in available]
    if missing:
        raise ModelLoadError(
            f"`{model}` asks for the execution provider(s) {', '.join(missing)} (providers), "
            f"but this onnxruntime has only {', '.join(available)}. Install the onnxruntime "
            "build that has them (onnxruntime-gpu for CUDA and TensorRT), or remove "
            "`providers` to use the best one available."
        )
    return list(configured)


class OnnxEngine:
    """Serves `predict` for one ONNX graph; refuses text generation."""

    def __init__(self, config: OnnxModel, context: EngineContext) -> None:
        self._config = config
        self._path = context.path
        self._session: Any = None  # onnxruntime.InferenceSession once loaded
        self._run_options: Any = None
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._accelerator = (config.providers or ["cpu"])[0]
        self._admission = AdmissionQueue(config.id, config.max_concurrency, config.max_queue)
        self._pool: ThreadPoolExecutor | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def context_length(self) -> int:
        return self._config.context_length

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            tokenizes_locally=False,
            early_errors=True,
            generates=False,
            predict=True,
            accelerator=self._accelerator,
        )

    @property
    def max_elements(self) -> int:
        return self._config.max_elements

    # --- lifecycle (in a worker thread) ------------------------------------------------

    def load(self) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ModelLoadError(
                f"`{self._config.id}` needs ONNX Runtime, which is not installed: "
                "pip install 'palisade[onnx]' (or onnxruntime-gpu for CUDA and TensorRT)."
            ) from exc
        path = self._model_file()
        providers = choose_providers(
            self._config.id, self._config.providers, onnxruntime.get_available_providers()
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self._config.intra_op_threads
        options.log_severity_level = _ERROR_LEVEL
        # Idle worker threads sleep instead of spinning: the appliance's other models
        # (llama.cpp decoding on the same cores) need the CPU more than a prediction's
        # first microseconds do.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=providers
            )
        except _runtime_errors() as exc:
            raise ModelLoadError(
                f"ONNX Runtime cannot load `{self._config.id}` from {path}: {_short(exc)}. "
                "Check that the file is a complete ONNX model (not truncated, not another "
                "format)."
            ) from exc
        self._inputs = [self._spec(arg, "input") for arg in session.get_inputs()]
        self._outputs = self._served_outputs(session.get_outputs())
        run_options = onnxruntime.RunOptions()
        run_options.log_severity_level = 4  # a refused input is answered, not logged as E
        self._session, self._run_options = session, run_options
        self._accelerator = session.get_providers()[0]
        self._pool = ThreadPoolExecutor(
            self._config.max_concurrency, thread_name_prefix=f"onnx-{self._config.id}"
        )
        self._ready = True
        log.info(
            "model %s: ONNX graph on %s, inputs %s",
            self._config.id,
            self._accelerator,
            ", ".join(f"{spec.name} {spec.datatype} {spec.shape_text()}" for spec in self._inputs),
        )

    def close(self) -> None:
        self._ready = False
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._session = None

    def _model_file(self) -> Path:
        path = self._path
        if path is None or not path.is_file():
            raise ModelLoadError(
                f"The ONNX model file for `{self._config.id}` was not found at {path}; fix "
                "`path` in the appliance config."
            )
        return path

    def _spec(self, arg: Any, role: str) -> TensorSpec:
        datatype = DATATYPES.get(arg.type)
        if datatype is None:
            raise ModelLoadError(
                f"The {role} `{arg.name}` of `{self._config.id}` is {arg.type}, which the "
                f"predict API does not carry (it carries {', '.join(DATATYPES)})."
            )
        dims = list(arg.shape or [])
        return TensorSpec(
            name=arg.name,
            datatype=datatype,
            shape=tuple(dim if isinstance(dim, int) else None for dim in dims),
            dim_names=tuple(dim if isinstance(dim, str) and dim else None for dim in dims),
        )

    def _served_outputs(self, args: list[Any]) -> list[TensorSpec]:
        """The numeric tensor outputs; others (sequences, maps) are left out, with a note."""
        served = [self._spec(arg, "output") for arg in args if arg.type in DATATYPES]
        skipped = [f"{arg.name} ({arg.type})" for arg in args if arg.type not in DATATYPES]
        if skipped:
            log.warning("model %s: outputs not served: %s", self._config.id, ", ".join(skipped))
        if not served:
            raise ModelLoadError(
                f"`{self._config.id}` has no tensor output the predict API can carry "
                f"(its outputs: {', '.join(skipped)})."
            )
        return served

    # --- predictions -------------------------------------------------------------------

    def signature(self) -> list[TensorSpec]:
        return list(self._inputs)

    def output_signature(self) -> list[TensorSpec]:
        return list(self._outputs)

    async def predict(
        self, inputs: dict[str, NDArray[Any]], outputs: list[str] | None = None
    ) -> dict[str, NDArray[Any]]:
        pool = self._pool
        if not self._ready or pool is None:
            raise ModelNotReadyError(
                f"The model `{self._config.id}` is not loaded yet; retry shortly.", retry_after=1
            )
        names = outputs or [spec.name for spec in self._outputs]
        self._admission.admit()
        async with self._admission.slot():  # as many slots as pool threads
            running = asyncio.get_running_loop().run_in_executor(pool, self._run, inputs, names)
            results = await _unstoppable(running)
        return dict(zip(names, results, strict=True))

    def _run(self, inputs: dict[str, NDArray[Any]], names: list[str]) -> list[NDArray[Any]]:
        """One graph run, in a pool thread."""
        try:
            results: list[NDArray[Any]] = self._session.run(names, inputs, self._run_options)
        except _runtime_errors() as exc:
            self._refuse(exc)
        return results

    def _refuse(self, exc: Exception) -> NoReturn:
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        if isinstance(exc, InvalidArgument):  # the values (an index out of range, ...)
            raise TensorInputError(
                f"`{self._config.id}` refused the inputs: {_short(exc)}.", param="inputs"
            ) from exc
        log.warning("model %s: ONNX Runtime failed: %s", self._config.id, _short(exc))
        raise APIError(
            f"The engine failed while predicting: {_short(exc)}.", code="engine_error"
        ) from exc

    def load_now(self) -> EngineLoad:
        return self._admission.load()

    def metrics_text(self) -> str | None:
        return None

    # --- no text generation ------------------------------------------------------------

    def _no_text(self, param: str = "model") -> NoReturn:
        raise UnsupportedParameterError(
            param,
            f"`{self._config.id}` is an ONNX model: it serves predictions "
            f"(POST /api/v1/models/{self._config.id}/predict), not text.",
        )

    async def prepare_chat(
        self, messages: list[dict[str, Any]], features: RequestFeatures | None = None
    ) -> Prompt:
        del messages, features
        self._no_text()

    async def prepare_text(self, source: str | list[int], param: str = "prompt") -> Prompt:
        del source, param
        self._no_text()

    def detokenize(self, tokens: list[int], param: str = "input") -> str:
        del tokens
        self._no_text(param)

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        on_done: Any = None,
    ) -> Generation:
        del prompt, params, on_done
        self._no_text()

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        del texts
        self._no_text()


async def _unstoppable(running: asyncio.Future[list[NDArray[Any]]]) -> list[NDArray[Any]]:
    """The run's result; a cancelled caller (the appliance stopping) still waits for the
    graph to end, so its slot is freed only when its thread is."""
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait([running])
        raise


def _runtime_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's exception classes (they share no base class but Exception)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
        "ModelLoadCanceled",
        "ModelRequiresCompilation",
        "NotFound",
        "DeviceReset",
    )
    found = tuple(getattr(state, name) for name in names if hasattr(state, name))
    return (*found, RuntimeError)


def _short(exc: Exception) -> str:
    """ONNX Runtime's message without its `[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :`."""
    text = _ERROR_PREFIX.sub("", str(exc))
    return " ".join(text.split())[:_MAX_ERROR_TEXT].rstrip(".")
