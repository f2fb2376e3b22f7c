"""Prometheus HTTP service discovery: what a Prometheus server scrapes in this fleet.

`GET /federation/v1/prometheus/targets` answers in the `http_sd_configs` format (a list of
`{targets, labels}`): the router itself, then every node the router knows (down ones too,
so that `up` shows them failing), labelled with region, node and device class. It is an
operator endpoint like the fleet view: a key whose role may view the fleet, sent by
Prometheus as `authorization: {credentials_file: ...}`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
from litestar import MediaType, Response, get
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler

from federation import ENCODER, Action, Caller, FleetStatus, require_everywhere

if TYPE_CHECKING:
    from router._private.app import RouterState

SD_PATH = "/federation/v1/prometheus/targets"


class TargetGroup(msgspec.Struct):
    """One entry of Prometheus's HTTP service discovery answer."""

    targets: list[str]
    labels: dict[str, str]


def scrape_targets(router_id: str, router_url: str, status: FleetStatus) -> list[TargetGroup]:
    """The router's own metrics endpoint, then each node's (`__scheme__` per target: a
    lab node serves plain HTTP, an enrolled one HTTPS)."""
    groups = [_group(router_url, {"palisade_role": "router", "router": router_id})]
    for node in status.nodes:
        labels = {
            "palisade_role": "node",
            "node": node.node_id,
            "region": node.region,
            "device_class": ",".join(node.device_classes) or "none",
        }
        groups.append(_group(node.url, labels))
    return groups


def _group(url: str, labels: dict[str, str]) -> TargetGroup:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "127.0.0.1"
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return TargetGroup([address], labels | {"__scheme__": parts.scheme or "http"})


def prometheus_routes(state: RouterState) -> list[HTTPRouteHandler]:
    """The discovery route over the router's fleet view."""

    @get(SD_PATH, dependencies={"caller": Provide(state.tenancy.admin_caller)})
    async def targets(caller: NamedDependency[Caller]) -> Response[Any]:
        require_everywhere(caller.user.role, Action.VIEW_FLEET)
        status = state.fleet.status(state.config.router_id)
        groups = scrape_targets(state.config.router_id, state.url, status)
        return Response(ENCODER.encode(groups), media_type=MediaType.JSON)

    return [targets]
