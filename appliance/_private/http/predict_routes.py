"""`POST /api/v1/models/{id}/predict`: tensors in, tensors out (after KServe v2), for
models whose engine predicts (`Capabilities.predict`).

The inputs are checked against the model's graph before anything is admitted (names,
datatypes, shapes, data), so a malformed request is a 400 that costs nothing. A prediction
then goes through the node's ledger like every request: limits and budget (admitted as one
unit, settled with no tokens and the cost of one request), usage, the audit row.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import MediaType, Request, Response, post
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from appliance._private.engines.base import Predictor
from appliance._private.errors import UnsupportedParameterError
from appliance._private.tensors import requested_outputs, tensors_in, tensors_out
from federation import (
    ENCODER,
    APIError,
    OutputTensor,
    PredictRequest,
    PredictResponse,
    Principal,
    decode_request,
    read_body,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from appliance._private.ledger import Ledger, Ticket
    from appliance._private.node import Node
    from appliance._private.served import ServedModel

PREDICT_PATH = "/api/v1/models/{model_id:str}/predict"
PREDICT_ENDPOINT = "/api/v1/models/{id}/predict"  # its label in the request counter
_PREDICT_PATH = re.compile(r"/api/v1/models/[^/]+/predict")
_DECODER = msgspec.json.Decoder(PredictRequest)
# What one prediction reserves against limits and budgets before it runs (one request).
PREDICTION_ESTIMATE = 1


def predict_routes(node: Node, principal: Provide) -> list[HTTPRouteHandler]:
    @post(PREDICT_PATH, dependencies={"principal": principal}, status_code=200)
    async def predict(
        model_id: FromPath[str],
        request: Request[Any, Any, Any],
        principal: NamedDependency[Principal],
    ) -> Response[Any]:
        body = decode_request(await read_body(request), _DECODER)
        served = node.model(model_id, principal)
        with node.ledger.holding(principal, served, "pred", kind="prediction") as ticket:
            predictor = predictor_of(served)
            inputs = tensors_in(
                body, predictor.signature(), model=served.id, max_elements=predictor.max_elements
            )
            wanted = requested_outputs(body, predictor.output_signature(), model=served.id)
            await node.ledger.admit(ticket, PREDICTION_ESTIMATE)
            outputs = await _run(node.ledger, ticket, predictor, inputs, wanted)
        keep = node.ledger.content_keeper(principal, ticket.record_id, await read_body(request))
        if keep is not None:
            keep(msgspec.to_builtins(outputs))
        headers = node.receipt(served) | ticket.headers
        response = PredictResponse(
            id=ticket.record_id,
            model=served.id,
            model_version=served.version,
            outputs=outputs,
            request_id=body.id,
        )
        return Response(ENCODER.encode(response), media_type=MediaType.JSON, headers=headers)

    return [predict]


def predictor_of(served: ServedModel) -> Predictor:
    """The model's engine as a `Predictor`, or a 400 for a model that does not predict."""
    engine = served.engine
    if engine.capabilities.predict and isinstance(engine, Predictor):
        return engine
    raise UnsupportedParameterError(
        "model",
        f"The model `{served.id}` does not serve predictions (tensors in, tensors out); it "
        "generates text: use /v1/chat/completions or /v1/completions.",
    )


async def _run(
    ledger: Ledger,
    ticket: Ticket,
    predictor: Predictor,
    inputs: dict[str, NDArray[Any]],
    wanted: list[str] | None,
) -> list[OutputTensor]:
    """Predict, and end the admitted request however that goes: usage with no tokens (the
    cost of one request), the audit row, the model's counters."""
    status = "error"
    try:
        outputs = tensors_out(await predictor.predict(inputs, wanted))
        status = "ok"
    except APIError as exc:
        status = exc.code
        raise
    except asyncio.CancelledError:
        status = "cancelled"
        raise
    finally:
        reason = {"ok": "stop", "cancelled": "cancelled"}.get(status, "error")
        ledger.finished(ticket, status, 0, 0, reason=reason)
    return outputs


class EndpointLabels(Mapping[str, str]):
    """The request counter's endpoint labels: `paths` as they are, and every model's
    predict path as the one endpoint `/api/v1/models/{id}/predict`."""

    def __init__(self, paths: Mapping[str, str]) -> None:
        self._paths = paths

    def __getitem__(self, path: str) -> str:
        label = self._paths.get(path)
        if label is not None:
            return label
        if _PREDICT_PATH.fullmatch(path):
            return PREDICT_ENDPOINT
        raise KeyError(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)
