"""A node's audit evidence, served through the router.

`GET /admin/v1/fleet/nodes/{node_id}/audit/export?org=O` answers node `node_id`'s signed
export of org O's rows, byte for byte as the node signed it.
`GET /admin/v1/fleet/nodes/{node_id}/audit/content/{request_id}` answers an auditor's
read-back of content the node sealed; the node records the read in its own audit log.
(Which node served a request is in the router's residency report and audit export.)
The router checks the caller's role (view the org's audit log; read content) and vouches
for the caller to the node with a signed principal assertion, as it does for inference;
the node (`compliance.vouched_export_routes`, `vouched_content_routes`) checks the
assertion and the same role itself. So an auditor needs no appliance key, and the router
cannot forge what the node signed: `palisade audit verify` checks each export against its
own node's key.

`forward_to_node` is the one way an admin request reaches a node through the router.

Several routers sharing one store each keep their own audit log, signed by their own key,
so the evidence of an org is spread over every router too.
`GET /admin/v1/fleet/routers?org=O` lists the live routers (the `routers` table:
`live_routers`; only this router when the store is its own) and
`GET /admin/v1/fleet/routers/{router_id}/audit/export?org=O` answers router `router_id`'s
signed export of org O's rows, byte for byte, so `palisade audit export --fleet` collects
every router's log through the one it asks. Router to router, the caller's own key is
forwarded (its Authorization header, as received, over the other router's public URL):
the other router authenticates it against the same store and applies the same role check,
so no router can fetch more than its caller could fetch directly, and no new credential
exists between routers. The key never reaches a log. The public URL is checked against the
default trust store plus the fleet CA (a router's public certificate is the operator's or
the fleet's). The URLs come from the `routers` table, as trusted as the store itself.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import msgspec
from litestar import MediaType, Request, Response, get
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from compliance import VOUCHED_CONTENT_PATH, VOUCHED_EXPORT_PATH
from federation import (
    ASSERTION_HEADER,
    Action,
    APIError,
    Caller,
    NotFoundError,
    Principal,
    require,
)
from router._private.proxy import tls_name
from router._private.shared_members import live_routers

if TYPE_CHECKING:
    from router._private.app import RouterState

_TIMEOUT = aiohttp.ClientTimeout(total=300.0)  # a busy node's export is large


class NodeUnreachableError(APIError):
    status_code = 502
    error_type = "server_error"
    default_code = "node_unreachable"


class RouterUnreachableError(APIError):
    status_code = 502
    error_type = "server_error"
    default_code = "router_unreachable"


class LiveRouter(msgspec.Struct):
    router_id: str
    url: str


class RouterListing(msgspec.Struct):
    """The live routers of this router's store; `router_id` is the one answering."""

    router_id: str
    data: list[LiveRouter]


def evidence_routes(state: RouterState) -> list[HTTPRouteHandler]:
    caller_dependency = {"caller": Provide(state.tenancy.admin_caller)}

    @get("/admin/v1/fleet/nodes/{node_id:str}/audit/export", dependencies=caller_dependency)
    async def node_export(
        caller: NamedDependency[Caller], node_id: FromPath[str], org: str
    ) -> Response[Any]:
        require(caller.user.role, Action.VIEW_AUDIT, actor_org=caller.user.org, target_org=org)
        return await forward_to_node(state, caller, node_id, VOUCHED_EXPORT_PATH, {"org": org})

    @get(
        "/admin/v1/fleet/nodes/{node_id:str}/audit/content/{request_id:str}",
        dependencies=caller_dependency,
    )
    async def node_content(
        caller: NamedDependency[Caller], node_id: FromPath[str], request_id: FromPath[str]
    ) -> Response[Any]:
        user = caller.user
        require(user.role, Action.READ_CONTENT, actor_org=user.org, target_org=None)
        path = f"{VOUCHED_CONTENT_PATH}/{quote(request_id, safe='')}"
        return await forward_to_node(state, caller, node_id, path, {})

    @get("/admin/v1/fleet/routers", dependencies=caller_dependency)
    async def routers(caller: NamedDependency[Caller], org: str) -> Response[Any]:
        require(caller.user.role, Action.VIEW_AUDIT, actor_org=caller.user.org, target_org=org)
        listing = RouterListing(state.config.router_id, await _live(state))
        return Response(msgspec.json.encode(listing), media_type=MediaType.JSON)

    @get("/admin/v1/fleet/routers/{router_id:str}/audit/export", dependencies=caller_dependency)
    async def router_export(
        request: Request[Any, Any, Any],
        caller: NamedDependency[Caller],
        router_id: FromPath[str],
        org: str,
    ) -> Response[Any]:
        require(caller.user.role, Action.VIEW_AUDIT, actor_org=caller.user.org, target_org=org)
        authorization = request.headers.get("authorization", "")
        return await _forward_to_router(state, authorization, router_id, {"org": org})

    return [node_export, node_content, routers, router_export]


async def _live(state: RouterState) -> list[LiveRouter]:
    """Every live router of a shared store; this one alone on a store of its own."""
    if not state.tenancy.store.shared:
        return [LiveRouter(state.config.router_id, state.url)]
    found = await live_routers(state.tenancy.store.database)
    return [LiveRouter(router, url) for router, url in found]


async def _forward_to_router(
    state: RouterState, authorization: str, router_id: str, params: dict[str, str]
) -> Response[Any]:
    """Router `router_id`'s own export, asked with the caller's key; its answer unchanged
    (the other router checks the key and the role itself)."""
    target = next((live for live in await _live(state) if live.router_id == router_id), None)
    if target is None:
        raise NotFoundError(
            f"No live router `{router_id}` shares this router's store "
            "(`GET /admin/v1/fleet/routers` lists them).",
            code="router_not_found",
            param="router_id",
        )
    connector = aiohttp.TCPConnector(ssl=_router_trust(state))
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=_TIMEOUT) as session,
            session.get(
                target.url.rstrip("/") + "/admin/v1/audit/export",
                params=params,
                headers={"Authorization": authorization},
            ) as reply,
        ):
            body = await reply.read()
            media_type = reply.headers.get("Content-Type", MediaType.JSON)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RouterUnreachableError(
            f"Router `{router_id}` could not be reached at {target.url} "
            f"({type(exc).__name__}); retry when it is up.",
            retry_after=5,
        ) from None
    return Response(body, status_code=reply.status, media_type=media_type)


def _router_trust(state: RouterState) -> ssl.SSLContext:
    """The system's trust and the fleet CA: a router's public listener has either's cert."""
    context = ssl.create_default_context()
    if state.tls is not None:
        context.load_verify_locations(cafile=str(state.tls.ca_path))
    return context


async def forward_to_node(
    state: RouterState, caller: Caller, node_id: str, path: str, params: dict[str, str]
) -> Response[Any]:
    """GET `path` on node `node_id` for `caller` (vouched for by an assertion); the node's
    answer, its status and body unchanged. The node checks the caller's role again."""
    node = state.fleet.nodes.get(node_id)
    if node is None:
        raise NotFoundError(
            f"No node `{node_id}` is in this fleet (`palisade fleet status` lists them).",
            code="node_not_found",
            param="node_id",
        )
    headers = {ASSERTION_HEADER: state.signer.assertion(_principal(caller), node.id)}
    try:
        async with state.forwarder.session.get(
            node.url + path,
            params=params,
            headers=headers,
            timeout=_TIMEOUT,
            server_hostname=tls_name(node),
        ) as reply:
            body = await reply.read()
            media_type = reply.headers.get("Content-Type", MediaType.JSON)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NodeUnreachableError(
            f"Node `{node_id}` ({node.region}) could not be reached ({type(exc).__name__}); "
            "retry when it is up.",
            retry_after=5,
        ) from None
    return Response(body, status_code=reply.status, media_type=media_type)


def _principal(caller: Caller) -> Principal:
    """The caller as an assertion names it: the node applies the same role checks."""
    return Principal(
        org=caller.user.org or caller.org.name,
        user=caller.user.id,
        key_id=caller.key.id,
        regions=caller.org.regions,
        role=caller.user.role,
        logging_mode=caller.org.logging_mode,
    )
