"""`GET /federation/v1/policy`: appliances fetch the newest signed policy snapshot.

A long poll: `after` is the version the appliance holds, `wait_s` (at most 30) how long
the router may hold the request. The answer is 200 with the signed snapshot as soon as the
router has a version above `after`, else 204 once `wait_s` is over. Only an enrolled node
may ask: its client certificate (verified by the TLS handshake against the fleet CA) must
have role `node` and must not be revoked. A keep-alive connection outlives a CRL update,
so revocation is checked here on every request too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from litestar import MediaType, Request, Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter

from router._private.policy_publisher import MAX_WAIT_S, PolicyPublisher

POLICY_PATH = "/federation/v1/policy"
# A version an appliance may report: JSON-safe, and far above anything a router reaches.
_MAX_VERSION = 2**53


def policy_routes(
    publisher: PolicyPublisher, authorize: Callable[[Request[Any, Any, Any]], object]
) -> list[HTTPRouteHandler]:
    """The route; `authorize(request)` refuses anything but an enrolled, unrevoked node."""

    @get(POLICY_PATH)
    async def policy(
        request: Request[Any, Any, Any],
        after: Annotated[int, Parameter(ge=0, le=_MAX_VERSION)] = 0,
        wait_s: Annotated[float, Parameter(ge=0, le=MAX_WAIT_S)] = 0.0,
    ) -> Response[Any]:
        authorize(request)
        await publisher.catch_up(after)
        blob = await _unless_gone(request, publisher.wait_newer(after, wait_s))
        if blob is None:
            return Response(b"", status_code=204)
        return Response(blob, media_type=MediaType.JSON)

    return [policy]


async def _unless_gone(
    request: Request[Any, Any, Any], answer: Coroutine[Any, Any, bytes | None]
) -> bytes | None:
    """`answer`, or None as soon as the node hangs up (a stopped node's poll must not hold
    the router for the rest of its wait)."""
    waiting = asyncio.ensure_future(answer)
    hangup = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((waiting, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        waiting.cancel()
    return waiting.result() if waiting.done() and not waiting.cancelled() else None


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
