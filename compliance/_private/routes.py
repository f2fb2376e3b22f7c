"""The /admin/v1/audit routes: signed exports and residency reports of this server's log, and
read-back of the request content this server sealed (`full` logging).

Mounted by a standalone appliance (its own log) and by the router (management events and
the routing row of every request it forwarded, with the region and node that served it).
Content is sealed by the node that served the request, so it is read back there: directly,
or through the router (`vouched_content_routes` on the node answers the router's forwarding).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import MediaType, Request, Response, get
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from compliance._private.export import Scope, build_export, build_residency
from compliance._private.recorder import Recorder
from federation import (
    ASSERTION_HEADER,
    Action,
    AuthenticationError,
    Caller,
    NotFoundError,
    Principal,
    allowed,
    require,
    require_everywhere,
)

if TYPE_CHECKING:
    from federation import Tenancy

# On a fleet node: where the router forwards an auditor's read-back.
VOUCHED_CONTENT_PATH = "/federation/v1/audit/content"
# On a fleet node: where the router forwards an auditor's export of an org's rows.
VOUCHED_EXPORT_PATH = "/federation/v1/audit/export"


def audit_routes(tenancy: Tenancy, recorder: Recorder, *, origin: str) -> list[HTTPRouteHandler]:
    caller_dependency = {"caller": Provide(tenancy.admin_caller)}

    @get("/admin/v1/audit/export", dependencies=caller_dependency)
    async def export(
        caller: NamedDependency[Caller],
        org: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> Response[Any]:
        if org is None:
            require_everywhere(caller.user.role, Action.VIEW_AUDIT)
        else:
            require(caller.user.role, Action.VIEW_AUDIT, actor_org=caller.user.org, target_org=org)
        scope = Scope(org=org, since=since, until=until)
        data = await asyncio.to_thread(
            build_export, recorder.db, recorder.identity, origin=origin, scope=scope
        )
        return Response(data, media_type=MediaType.JSON)

    @get("/admin/v1/audit/residency", dependencies=caller_dependency)
    async def residency(
        caller: NamedDependency[Caller], org: str, since: str | None = None
    ) -> Response[Any]:
        require(caller.user.role, Action.VIEW_AUDIT, actor_org=caller.user.org, target_org=org)
        data = await asyncio.to_thread(
            build_residency, recorder.db, recorder.identity, origin=origin, org=org, since=since
        )
        return Response(data, media_type=MediaType.JSON)

    @get("/admin/v1/audit/content/{request_id:str}", dependencies=caller_dependency)
    async def content(request_id: FromPath[str], caller: NamedDependency[Caller]) -> Response[Any]:
        """A request's sealed content, to a role that may read its org's; the read is audited."""
        user = caller.user
        return await read_back(recorder, request_id, user.role, user.org, user.id, origin=origin)

    return [export, residency, content]


def vouched_content_routes(
    recorder: Recorder,
    authenticate: Callable[[Request[Any, Any, Any]], Awaitable[Principal]],
    *,
    origin: str,
) -> list[HTTPRouteHandler]:
    """On a fleet node: the read-back for a caller the router vouches for (the router's
    `/admin/v1/fleet/nodes/{node}/audit/content/{id}`); the node checks the role itself."""

    @get(VOUCHED_CONTENT_PATH + "/{request_id:str}")
    async def vouched_content(
        request: Request[Any, Any, Any], request_id: FromPath[str]
    ) -> Response[Any]:
        principal = await vouched_principal(request, authenticate, "/admin/v1/audit/content")
        # A fleet-wide role has no org: the router names it by the empty org.
        org = principal.org or None
        return await read_back(
            recorder, request_id, principal.role, org, principal.user, origin=origin
        )

    return [vouched_content]


def vouched_export_routes(
    recorder: Recorder,
    authenticate: Callable[[Request[Any, Any, Any]], Awaitable[Principal]],
    *,
    origin: str,
) -> list[HTTPRouteHandler]:
    """On a fleet node: its signed export of an org's rows for a caller the router vouches
    for (the router's `/admin/v1/fleet/nodes/{node}/audit/export`, which `palisade audit
    export --fleet` collects); the node checks the role itself."""

    @get(VOUCHED_EXPORT_PATH)
    async def vouched_export(request: Request[Any, Any, Any], org: str) -> Response[Any]:
        principal = await vouched_principal(request, authenticate, "/admin/v1/audit/export")
        require(principal.role, Action.VIEW_AUDIT, actor_org=principal.org or None, target_org=org)
        scope = Scope(org=org)
        data = await asyncio.to_thread(
            build_export, recorder.db, recorder.identity, origin=origin, scope=scope
        )
        return Response(data, media_type=MediaType.JSON)

    return [vouched_export]


async def vouched_principal(
    request: Request[Any, Any, Any],
    authenticate: Callable[[Request[Any, Any, Any]], Awaitable[Principal]],
    local_path: str,
) -> Principal:
    """The caller the router's signed assertion names (a vouched route takes nothing else)."""
    if request.headers.get(ASSERTION_HEADER) is None:
        raise AuthenticationError(
            "This route answers the fleet's router only (a signed principal assertion); "
            f"use {local_path} with a local key instead.",
            code="invalid_assertion",
        )
    return await authenticate(request)


async def read_back(
    recorder: Recorder,
    request_id: str,
    role: str,
    actor_org: str | None,
    actor: str,
    *,
    origin: str,
) -> Response[Any]:
    """The sealed content of `request_id` if `role` may read its org's (the read audited
    first); 404 `content_not_found` alike for none and for another org's."""
    require(role, Action.READ_CONTENT, actor_org=actor_org, target_org=None)
    found = await recorder.read_content(
        request_id,
        actor,
        visible=lambda org: allowed(role, Action.READ_CONTENT, actor_org=actor_org, target_org=org),
    )
    if found is None:
        raise NotFoundError(
            f"No sealed content for request `{request_id}` here: it was not logged in "
            "`full` mode, it is past its retention, another node served it, or it belongs "
            "to an organization you may not read.",
            code="content_not_found",
            param="request_id",
        )
    body = ContentReadBack(
        id=found.id,
        org=found.org,
        sealed_at=found.sealed_at,
        node=origin,
        content=msgspec.Raw(found.content),
    )
    return Response(msgspec.json.encode(body), media_type=MediaType.JSON)


class ContentReadBack(msgspec.Struct, kw_only=True):
    """`GET /admin/v1/audit/content/{id}`: the sealed `{"request", "response"}` as sealed."""

    id: str
    org: str
    sealed_at: str
    node: str
    content: msgspec.Raw
