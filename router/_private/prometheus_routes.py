"""Prometheus HTTP service discovery: what a Prometheus server scrapes in this fleet.

`GET /federation/v1/prometheus/targets` answers in the `http_sd_configs` format (a list of
`{targets, labels}`): the router itself, then every node the router knows (down ones too,
so that `up` shows them failing), labelled with region, node and device class. A node is
scraped through the router (`/federation/v1/prometheus/nodes/<node>/metrics`): the router
reaches it over the fleet's mTLS as it forwards requests, so Prometheus needs no route to
the nodes and no fleet certificate of its own (scraping a node directly, with a `monitor`
certificate, works too: tests/e2e/test_prometheus_direct.py). Both take a key whose role may
`read metrics and scrape targets` (the `monitor`'s, which may do nothing else, or a system
admin's), sent by Prometheus as `authorization: {type: Bearer, credentials_file: ...}`.
A system admin issues monitor keys at `POST /federation/v1/monitor/keys` (`palisade monitor
key`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec
from litestar import MediaType, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from federation import (
    ENCODER,
    Action,
    Caller,
    FleetStatus,
    NotFoundError,
    ServiceUnavailableError,
    require_everywhere,
)
from router._private.proxy import tls_name

if TYPE_CHECKING:
    from router._private.app import RouterState

SD_PATH = "/federation/v1/prometheus/targets"
NODE_METRICS_PATH = "/federation/v1/prometheus/nodes/{node_id}/metrics"
MONITOR_KEYS_PATH = "/federation/v1/monitor/keys"
_NODE_SCRAPE_TIMEOUT_S = 10.0


class TargetGroup(msgspec.Struct):
    """One entry of Prometheus's HTTP service discovery answer."""

    targets: list[str]
    labels: dict[str, str]


def scrape_targets(router_id: str, router_url: str, status: FleetStatus) -> list[TargetGroup]:
    """The router's own metrics endpoint, then each node's through the router (its
    `instance` is the node's own address)."""
    address, scheme = _address(router_url)
    groups = [
        TargetGroup(
            [address], {"palisade_role": "router", "router": router_id, "__scheme__": scheme}
        )
    ]
    for node in status.nodes:
        labels = {
            "palisade_role": "node",
            "node": node.node_id,
            "region": node.region,
            "device_class": ",".join(node.device_classes) or "none",
            "instance": _address(node.url)[0],
            "__scheme__": scheme,
            "__metrics_path__": NODE_METRICS_PATH.format(node_id=quote(node.node_id)),
        }
        groups.append(TargetGroup([address], labels))
    return groups


def _address(url: str) -> tuple[str, str]:
    """host:port and scheme of `url`."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "127.0.0.1"
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), parts.scheme or "http"


def prometheus_routes(state: RouterState) -> list[HTTPRouteHandler]:
    """The discovery route over the router's fleet view, each node's metrics through the
    router, and the monitor keys Prometheus sends to both."""

    @get(SD_PATH, dependencies={"caller": Provide(state.tenancy.admin_caller)})
    async def targets(caller: NamedDependency[Caller]) -> Response[Any]:
        require_everywhere(caller.user.role, Action.READ_METRICS)
        status = state.fleet.status(state.config.router_id)
        groups = scrape_targets(state.config.router_id, state.url, status)
        return Response(ENCODER.encode(groups), media_type=MediaType.JSON)

    @get(
        NODE_METRICS_PATH.replace("{node_id}", "{node_id:str}"),
        dependencies={"caller": Provide(state.tenancy.admin_caller)},
    )
    async def node_metrics(
        node_id: FromPath[str], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        require_everywhere(caller.user.role, Action.READ_METRICS)
        node = state.fleet.nodes.get(node_id)
        if node is None:
            raise NotFoundError(f"No node `{node_id}` in this fleet.", code="node_not_found")
        try:
            async with state.forwarder.session.get(
                node.url + "/metrics",
                timeout=aiohttp.ClientTimeout(total=_NODE_SCRAPE_TIMEOUT_S),
                server_hostname=tls_name(node),
            ) as reply:
                body = await reply.read()
                media = reply.headers.get("Content-Type", "text/plain; version=0.0.4")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnreachableError(node_id) from exc
        if reply.status != 200:
            raise BackendUnreachableError(node_id)
        return Response(body, media_type=media)

    @post(
        MONITOR_KEYS_PATH,
        status_code=201,
        dependencies={"caller": Provide(state.tenancy.admin_caller)},
    )
    async def monitor_key(caller: NamedDependency[Caller]) -> Response[Any]:
        """A new key of the monitor user (shown once), for a Prometheus's `credentials_file`."""
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        created = await state.tenancy.new_monitor_key(caller.user.id)
        return Response(ENCODER.encode(created), status_code=201, media_type=MediaType.JSON)

    return [targets, node_metrics, monitor_key]


class BackendUnreachableError(ServiceUnavailableError):
    """The node did not give its metrics: the scrape of it fails (`up` 0)."""

    default_code = "node_unreachable"

    def __init__(self, node_id: str) -> None:
        super().__init__(f"Node `{node_id}` did not answer its metrics.", retry_after=1)
