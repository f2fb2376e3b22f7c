"""Wire schema of the predict API (`POST /api/v1/models/{id}/predict`), after KServe v2.

Tensors travel by name, with their shape, datatype and data (numbers, flat in row-major
order or nested as the shape says). Requests forbid unknown fields, as the OpenAI
requests do, so a misspelt key is a 400 naming it rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, get_args

from msgspec import Meta, Struct

# KServe v2's tensor datatypes that carry numbers (BYTES, strings, is not served).
Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]
DATATYPES: Final[tuple[Datatype, ...]] = get_args(Datatype)
TensorName = Annotated[str, Meta(min_length=1, max_length=256)]
Dimension = Annotated[int, Meta(ge=0)]


class InputTensor(Struct, forbid_unknown_fields=True):
    name: TensorName
    shape: Annotated[list[Dimension], Meta(max_length=32)]
    datatype: Datatype
    # Numbers, flat (row-major) or nested as `shape` says; checked against the model.
    data: list[Any]


class RequestedOutput(Struct, forbid_unknown_fields=True):
    """KServe's form of a requested output (`{"name": "y"}`); a plain name works too."""

    name: TensorName


class PredictRequest(Struct, forbid_unknown_fields=True):
    inputs: Annotated[list[InputTensor], Meta(min_length=1, max_length=64)]
    # Which outputs to return (all of them when absent).
    outputs: Annotated[list[TensorName | RequestedOutput], Meta(max_length=64)] | None = None
    id: Annotated[str, Meta(max_length=256)] | None = None  # the client's own request id


class OutputTensor(Struct):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]  # flat, row-major


class PredictResponse(Struct, omit_defaults=True):
    id: str
    model: str
    model_version: str | None
    outputs: list[OutputTensor]
    request_id: str | None = None  # the client's `id`, echoed
