"""The appliance's model administration (system admins): pricing; adding, reloading and
removing models (`model_admin_routes`)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, put
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from appliance._private.http.model_admin_routes import model_admin_routes
from appliance._private.http.rendering import json_response
from appliance._private.node import Node
from federation import Action, Caller, Pricing, Tenancy, decode_request, require

_PRICING_DECODER = msgspec.json.Decoder(Pricing)


def admin_routes(node: Node, tenancy: Tenancy) -> list[HTTPRouteHandler]:
    caller_dependency = {"caller": Provide(tenancy.admin_caller)}

    @put("/admin/v1/models/{model_id:str}/pricing", dependencies=caller_dependency)
    async def set_pricing(
        model_id: FromPath[str], request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        require(caller.user.role, Action.MANAGE_MODELS, actor_org=caller.user.org, target_org=None)
        served = node.any_model(model_id)
        pricing = decode_request(await request.body(), _PRICING_DECODER)
        served.config = msgspec.structs.replace(served.config, pricing=pricing)
        payload = {"model": model_id, **msgspec.to_builtins(pricing)}
        await tenancy.store.record_event("model_pricing_changed", caller.user.id, None, payload)
        return json_response(served.card(node.config.region))

    return [set_pricing, *model_admin_routes(node, tenancy)]
