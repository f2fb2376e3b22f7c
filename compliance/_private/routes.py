"""The /admin/v1/audit routes: signed exports and residency reports of this server's log.

Mounted by a standalone appliance (its own log) and by the router (management events and
the routing row of every request it forwarded, with the region and node that served it).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from litestar import MediaType, Response, get
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler

from compliance._private.export import Scope, build_export, build_residency
from compliance._private.recorder import Recorder
from federation import Action, Caller, require, require_everywhere

if TYPE_CHECKING:
    from federation import Tenancy


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

    return [export, residency]
