"""The offline edge's fleet routes: budget-share leases and usage reports (see `leases.py`).

Both take the node from its client certificate (`node_of`: the router's `certified_node`,
which also refuses a revoked one: a keep-alive connection can outlive a CRL update), never
from the body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar import MediaType, Request, Response, post
from litestar.handlers import HTTPRouteHandler

from federation import (
    ENCODER,
    LEASE_REQUEST_DECODER,
    USAGE_REPORT_DECODER,
    PeerIdentity,
    decode_request,
    read_body,
)
from router._private.leases import EdgeLeases

NodeOf = Callable[[Request[Any, Any, Any]], PeerIdentity]


def edge_routes(leases: Callable[[], EdgeLeases], node_of: NodeOf) -> list[HTTPRouteHandler]:
    @post("/federation/v1/lease", status_code=200)
    async def lease(request: Request[Any, Any, Any]) -> Response[Any]:
        node = node_of(request)
        asked = decode_request(await read_body(request), LEASE_REQUEST_DECODER)
        grant = await leases().grant(node, asked.org, asked.tokens)
        return Response(ENCODER.encode(grant), media_type=MediaType.JSON)

    @post("/federation/v1/usage", status_code=200)
    async def usage(request: Request[Any, Any, Any]) -> Response[Any]:
        node = node_of(request)
        report = decode_request(await read_body(request), USAGE_REPORT_DECODER)
        ack = await leases().report(node, report.rows)
        return Response(ENCODER.encode(ack), media_type=MediaType.JSON)

    return [lease, usage]
