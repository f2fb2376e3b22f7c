"""The appliance's composition root: a `Node` (models, ledger, fleet links) and its HTTP
routes (`http/`) in one Litestar app."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Litestar, Request
from litestar.di import Provide
from litestar.handlers import HTTPRouteHandler

from appliance._private.config import ApplianceConfig
from appliance._private.edge import EdgeGate, HttpRouterLink
from appliance._private.edge_ledger import EdgeLedger
from appliance._private.http.admin_routes import admin_routes
from appliance._private.http.openai_routes import INFERENCE_PATHS, openai_routes
from appliance._private.http.ops_routes import ops_routes
from appliance._private.http.predict_routes import EndpointLabels, predict_routes
from appliance._private.membership import Membership
from appliance._private.node import VERSION, Node
from appliance._private.policy_sync import PolicySync, policy_book_for, policy_offer_routes
from compliance import (
    Recorder,
    audit_routes,
    vouched_content_routes,
    vouched_export_routes,
)
from federation import (
    LOCAL_PRINCIPAL,
    ClientGoneError,
    NodeCredentials,
    Principal,
    Tenancy,
    client_gone_response,
    count_exits,
    error_handlers,
    request_counter,
)

log = logging.getLogger("palisade.appliance")

Authenticator = Callable[[Request[Any, Any, Any]], Awaitable[Principal]]
# The node core's former name, kept for callers that still use it.
ApplianceState = Node

__all__ = ["VERSION", "ApplianceState", "Authenticator", "Node", "create_app", "local_principal"]


async def local_principal() -> Principal:
    """The standalone, unauthenticated principal (replaced by tenancy's authenticator)."""
    return LOCAL_PRINCIPAL


async def _local_caller(request: Request[Any, Any, Any]) -> Principal:
    del request  # every caller is the local principal
    return LOCAL_PRINCIPAL


def create_app(
    config: ApplianceConfig,
    *,
    tenancy: Tenancy | None = None,
    authenticate: Authenticator | None = None,
    demo: bool = False,
    recorder: Recorder | None = None,
    credentials: NodeCredentials | None = None,
    lab_secret: bytes | None = None,
) -> tuple[Litestar, Node]:
    """The appliance app. With `tenancy`, keys are required and /admin/v1 is mounted;
    without it, every caller is the local principal (`--no-auth`) unless `authenticate`
    supplies another. With `config.router_url` and the node's enrolled `credentials` (or,
    in a lab, the `lab_secret`), the appliance joins the router's fleet and also accepts the
    router's signed principal assertions."""
    node = Node(config, tenancy, demo=demo, recorder=recorder)
    node.credentials = credentials
    if credentials is not None and credentials.enrolled:
        node.metrics.watch_certificate(credentials.cert_path)
    if config.router_url is not None and (credentials is not None or lab_secret is not None):
        node.membership = Membership(
            config.router_url,
            home=config.home(),
            node_id=config.node_id,
            snapshot=node.heartbeat,
            credentials=credentials,
            lab_secret=lab_secret if credentials is None else None,
        )
    book = policy_book_for(credentials, logging_floor=config.logging_floor) if credentials else None
    if book is not None and node.membership is not None:
        book.crl_hooks.append(lambda _: node.reload_crl())
        node.policy_sync = PolicySync(book, node.membership)
        node.edge = EdgeGate(
            EdgeLedger(config.home(), node=config.node_id, region=book.region),
            HttpRouterLink(node.membership),
            book,
            region=book.region,
            node=config.node_id,
            grace_s=config.fleet.offline_grace_s,
        )
    admin: list[HTTPRouteHandler] = []
    if tenancy is not None:
        authenticate = node.authenticate
        admin = [*tenancy.routes(), *admin_routes(node, tenancy)]
        if recorder is not None:
            admin += audit_routes(tenancy, recorder, origin=config.node_id)
            if node.membership is not None:
                vouched = (recorder, node.authenticate)
                admin += vouched_content_routes(*vouched, origin=config.node_id)
                admin += vouched_export_routes(*vouched, origin=config.node_id)
    app = Litestar(
        route_handlers=[
            *openai_routes(node, authenticate or _local_caller),
            *predict_routes(node, Provide(authenticate or local_principal)),
            *ops_routes(node),
            *admin,
            *(policy_offer_routes(book) if book is not None else []),
        ],
        exception_handlers={
            **error_handlers("appliance", log, node.metrics.refused),
            ClientGoneError: client_gone_response,
        },
        middleware=[
            count_exits(EndpointLabels(INFERENCE_PATHS), request_counter(node.metrics.requests))
        ],
        on_startup=[node.start],
        on_shutdown=[node.stop],
        request_max_body_size=config.max_body_bytes,
        openapi_config=None,
        logging_config=None,  # the process's logging is the CLI's (`configure_logging`)
        debug=False,
    )
    return app, node
