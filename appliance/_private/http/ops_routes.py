"""Operations endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from prometheus_client import CONTENT_TYPE_LATEST

from appliance._private.errors import ModelNotReadyError
from appliance._private.http.rendering import json_response
from appliance._private.node import Node


def ops_routes(node: Node) -> list[HTTPRouteHandler]:
    config = node.config

    @get(["/healthz", "/health"])  # `/health`: what benchmark clients (guidellm) probe
    async def healthz() -> Response[Any]:
        health = {"status": "ok", "node": config.node_id, "region": config.region}
        if node.membership is not None:  # the image agent commits a slot once joined
            health["router"] = "joined" if node.membership.joined else "unreachable"
        return json_response(health)

    @get("/readyz")
    async def readyz() -> Response[Any]:
        if not node.ready:
            raise ModelNotReadyError("Models are still loading; retry shortly.", retry_after=1)
        ready: dict[str, Any] = {"status": "ready", "models": sorted(node.models.ids())}
        if node.edge is not None:  # an enrolled node: when it lost its router, if it has
            ready["offline_since"] = node.edge.offline_since_iso()
        return json_response(ready)

    @get("/metrics")
    async def metrics() -> Response[Any]:
        engines = [served.engine for served in node.models.all()]
        texts = await asyncio.gather(*(asyncio.to_thread(e.metrics_text) for e in engines))
        body = node.metrics.render(text for text in texts if text)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [healthz, readyz, metrics]
