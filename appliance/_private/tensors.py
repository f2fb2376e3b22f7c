"""Predict API tensors: wire tensors checked against a graph's `TensorSpec`s into NumPy
arrays, and arrays back into wire tensors.

Every way a request can fail to fit the graph is a 400 `TensorInputError` whose code says
which (`unknown_input`, `missing_input`, `dtype_mismatch`, `shape_mismatch`,
`invalid_tensor`, `unknown_output`) and whose message names what the graph expects, so
nothing malformed reaches the runtime.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from appliance._private.engines.base import TensorSpec
from appliance._private.errors import TensorInputError
from federation import DATATYPES, InputTensor, OutputTensor, PredictRequest

# The NumPy type of each wire datatype (federation.Datatype).
NUMPY_TYPES: Final[dict[str, np.dtype[Any]]] = {
    name: np.dtype(kind)
    for name, kind in zip(
        DATATYPES,
        (
            "bool",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "int8",
            "int16",
            "int32",
            "int64",
            "float16",
            "float32",
            "float64",
        ),
        strict=True,
    )
}
_DATATYPE_OF: Final[dict[np.dtype[Any], str]] = {kind: name for name, kind in NUMPY_TYPES.items()}
# NumPy's kinds of the values a JSON array may hold for each kind of datatype: integers
# are refused for booleans and fractions for integers (no silent rounding).
_ACCEPTED_KINDS: Final[dict[str, str]] = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}


def tensors_in(
    request: PredictRequest, specs: list[TensorSpec], *, model: str, max_elements: int
) -> dict[str, NDArray[Any]]:
    """The request's inputs as arrays of the graph's types and shapes, every input given."""
    by_name = {spec.name: spec for spec in specs}
    arrays: dict[str, NDArray[Any]] = {}
    elements = 0
    for index, tensor in enumerate(request.inputs):
        where = f"inputs[{index}]"
        spec = _spec_for(tensor, by_name, model, where)
        if tensor.name in arrays:
            raise TensorInputError(
                f"The input `{tensor.name}` is given twice; send each input once.",
                param=f"{where}.name",
            )
        _check_datatype(tensor, spec, model, where)
        _check_shape(tensor, spec, model, where)
        elements += math.prod(tensor.shape)
        if elements > max_elements:
            raise TensorInputError(
                f"The inputs hold more than {max_elements} elements, the most `{model}` takes "
                "in one request; split the batch into smaller requests.",
                param=f"{where}.shape",
            )
        arrays[tensor.name] = _array(tensor, spec, where)
    missing = [spec for spec in specs if spec.name not in arrays]
    if missing:
        raise TensorInputError(
            f"`{model}` needs the input(s) {_listing(missing)}; add them to `inputs`.",
            code="missing_input",
            param="inputs",
        )
    _check_shared_dimensions(specs, arrays)
    return arrays


def requested_outputs(
    request: PredictRequest, specs: list[TensorSpec], *, model: str
) -> list[str] | None:
    """The output names asked for (None: every output), each one the graph has."""
    if request.outputs is None:
        return None
    known = {spec.name for spec in specs}
    names = [item if isinstance(item, str) else item.name for item in request.outputs]
    for index, name in enumerate(names):
        if name not in known:
            raise TensorInputError(
                f"`{model}` has no output `{name}`; its outputs are {_listing(specs)}.",
                code="unknown_output",
                param=f"outputs[{index}]",
            )
    return list(dict.fromkeys(names))


def tensors_out(arrays: dict[str, NDArray[Any]]) -> list[OutputTensor]:
    """Arrays as wire tensors: flat row-major data, the datatype named as on the wire."""
    return [
        OutputTensor(
            name=name,
            shape=list(array.shape),
            datatype=_DATATYPE_OF[array.dtype],
            data=array.ravel().tolist(),
        )
        for name, array in arrays.items()
    ]


def _spec_for(
    tensor: InputTensor, by_name: dict[str, TensorSpec], model: str, where: str
) -> TensorSpec:
    spec = by_name.get(tensor.name)
    if spec is None:
        raise TensorInputError(
            f"`{model}` has no input `{tensor.name}`; its inputs are "
            f"{_listing(list(by_name.values()))}.",
            code="unknown_input",
            param=f"{where}.name",
        )
    return spec


def _check_datatype(tensor: InputTensor, spec: TensorSpec, model: str, where: str) -> None:
    if tensor.datatype != spec.datatype:
        raise TensorInputError(
            f"The input `{spec.name}` of `{model}` is {spec.datatype}; got {tensor.datatype}.",
            code="dtype_mismatch",
            param=f"{where}.datatype",
        )


def _check_shape(tensor: InputTensor, spec: TensorSpec, model: str, where: str) -> None:
    fits = len(tensor.shape) == len(spec.shape) and all(
        want is None or want == got for want, got in zip(spec.shape, tensor.shape, strict=True)
    )
    if not fits:
        raise TensorInputError(
            f"The input `{spec.name}` of `{model}` has shape {spec.shape_text()}; got "
            f"{_shape_text(tensor.shape)}.",
            code="shape_mismatch",
            param=f"{where}.shape",
        )


def _array(tensor: InputTensor, spec: TensorSpec, where: str) -> NDArray[Any]:
    """The data as an array of the declared shape and the graph's type, or a 400."""
    param = f"{where}.data"
    try:
        raw = np.array(tensor.data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise TensorInputError(
            f"`{param}` is not a tensor: its nested lists are ragged (each level must have "
            "lists of one length) or too deep.",
            param=param,
        ) from exc
    target = NUMPY_TYPES[spec.datatype]
    if raw.size and raw.dtype.kind not in _ACCEPTED_KINDS[target.kind]:
        wanted = {"b": "true or false", "u": "integers", "i": "integers"}.get(target.kind)
        raise TensorInputError(
            f"`{param}` must hold {wanted or 'numbers'} only ({spec.datatype}).",
            param=param,
        )
    shape = tuple(tensor.shape)
    if raw.ndim != 1 and raw.shape != shape:
        raise TensorInputError(
            f"`{param}` is nested as {_shape_text(raw.shape)}, but `shape` says "
            f"{_shape_text(shape)}; send the data flat or nested exactly as the shape.",
            param=param,
        )
    if raw.size != math.prod(shape):
        raise TensorInputError(
            f"`{param}` holds {raw.size} values, but `shape` {_shape_text(shape)} needs "
            f"{math.prod(shape)}.",
            param=param,
        )
    return _cast(raw, target, spec.datatype, param).reshape(shape)


def _cast(raw: NDArray[Any], target: np.dtype[Any], datatype: str, param: str) -> NDArray[Any]:
    """`raw` as `target`, refusing values the type cannot hold (no wrapping, no inf)."""
    if raw.size and target.kind in "iu":
        limits = np.iinfo(target)
        if int(raw.min()) < limits.min or int(raw.max()) > limits.max:
            raise TensorInputError(
                f"`{param}` holds values outside {datatype}'s range [{limits.min}, {limits.max}].",
                param=param,
            )
    if not raw.size:
        return raw.astype(target)
    with np.errstate(over="ignore"):
        cast = raw.astype(target)
    if target.kind == "f" and not np.isfinite(cast).all():
        raise TensorInputError(f"`{param}` holds values too large for {datatype}.", param=param)
    return cast


def _check_shared_dimensions(specs: list[TensorSpec], arrays: dict[str, NDArray[Any]]) -> None:
    """Dynamic dimensions the graph names alike (`batch`) must be one size in every input."""
    sizes: dict[str, tuple[int, str]] = {}
    for spec in specs:
        for dim_name, size in zip(spec.dim_names, arrays[spec.name].shape, strict=False):
            if dim_name is None:
                continue
            first = sizes.setdefault(dim_name, (size, spec.name))
            if first[0] != size:
                raise TensorInputError(
                    f"The dimension `{dim_name}` is {first[0]} in `{first[1]}` but {size} in "
                    f"`{spec.name}`; the model needs it the same in both.",
                    code="shape_mismatch",
                    param="inputs",
                )


def _listing(specs: list[TensorSpec]) -> str:
    return ", ".join(f"`{spec.name}` {spec.datatype} {spec.shape_text()}" for spec in specs)


def _shape_text(shape: tuple[int, ...] | list[int]) -> str:
    return f"[{', '.join(str(size) for size in shape)}]"
