"""Fleet trust routes: the CA download, enrollment, renewal, and the operator's token and
node management (`palisade fleet token|node`).

    GET  /federation/v1/ca                         public: the fleet CA certificate (PEM)
    POST /federation/v1/enroll                     token + CSR, no client certificate
    POST /federation/v1/renew                      mTLS: a fresh certificate for the same key
    POST /admin/v1/fleet/tokens                    system admin: a new enrollment token
    GET  /admin/v1/fleet/nodes                     system admin: enrolled nodes
    POST /admin/v1/fleet/nodes/{node_id}/revoke    system admin: revoke a node
    POST /admin/v1/fleet/monitors                  system admin: a monitor certificate (CSR)
    GET  /admin/v1/fleet/monitors                  system admin: monitor certificates issued
    POST /admin/v1/fleet/monitors/{name}/revoke    system admin: revoke a monitor's certificates

A revoked monitor certificate takes the node's path: the registry rewrites `fleet/crl.pem`,
the router's listener reloads it and the next policy snapshot carries it to every node.

The CA download needs no trust: a node checks what it gets against the fingerprint its
token (or its operator) names. Tokens are never logged; the audit log records their id.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath
from msgspec import Meta, Struct

from federation import (
    ENCODER,
    Action,
    AuthenticationError,
    Caller,
    EnrollRequest,
    PermissionDeniedError,
    RenewRequest,
    decode_request,
    peer_identity,
    require_everywhere,
)
from router._private.ca import MAX_MONITOR_DAYS, MONITOR_DAYS
from router._private.registry import EnrolledNode, MonitorCertificate

if TYPE_CHECKING:
    from router._private.app import RouterState

log = logging.getLogger("palisade.router")

NodeName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
MAX_TOKEN_TTL_S = 365 * 86400


class TokenCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /admin/v1/fleet/tokens`: which nodes the token may enroll, for how long."""

    region: NodeName
    node_id: NodeName | None = None
    device_class: Annotated[str, Meta(pattern=r"^(cpu|gpu|rdu)$")] | None = None
    ttl_s: Annotated[float, Meta(gt=0, le=MAX_TOKEN_TTL_S)] = 24 * 3600
    uses: Annotated[int, Meta(ge=1, le=10_000)] = 1


class MonitorCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /admin/v1/fleet/monitors`: the scraper's name and the request for its key."""

    name: NodeName
    csr: Annotated[str, Meta(max_length=16_384)]
    days: Annotated[int, Meta(ge=1, le=MAX_MONITOR_DAYS)] = MONITOR_DAYS


class MonitorListing(Struct, kw_only=True):
    data: list[MonitorCertificate]


class NodeListing(Struct, kw_only=True):
    """Enrolled (and revoked) nodes, then nodes seen by discovery that have not enrolled
    (rows of `DiscoveredNode.row`, state `discovered`)."""

    data: list[EnrolledNode | dict[str, Any]]


_ENROLL = msgspec.json.Decoder(EnrollRequest)
_RENEW = msgspec.json.Decoder(RenewRequest)
_TOKEN = msgspec.json.Decoder(TokenCreate)
_MONITOR = msgspec.json.Decoder(MonitorCreate)


def trust_routes(state: RouterState) -> list[HTTPRouteHandler]:
    """The routes above, over `state.registry` (tokens, nodes) and `state.ca`."""
    auth = {"caller": Provide(state.tenancy.admin_caller)}
    registry = state.registry

    @get("/federation/v1/ca")
    async def ca() -> Response[Any]:
        return Response(registry.ca.pem, media_type="application/x-pem-file")

    @post("/federation/v1/enroll", status_code=200)
    async def enroll(request: Request[Any, Any, Any]) -> Response[Any]:
        spec = decode_request(await request.body(), _ENROLL)
        pending = await asyncio.to_thread(registry.prepare, spec)
        node = pending.node
        await state.tenancy.store.record_event(
            "fleet_node_enrolled",
            f"token:{pending.token_id}",
            None,
            {
                "node_id": node.node_id,
                "region": node.region,
                "device_class": node.device_class,
                "serial": str(node.serial),
                "token_id": pending.token_id,
            },
        )
        answer = await asyncio.to_thread(registry.commit, pending)
        log.info(
            "node %s enrolled in %s (token %s)", answer.node_id, answer.region, pending.token_id
        )
        return _json(answer)

    @post("/federation/v1/renew", status_code=200)
    async def renew(request: Request[Any, Any, Any]) -> Response[Any]:
        peer = peer_identity(request)
        if peer is None:
            raise AuthenticationError(
                "Renewal needs the node's current fleet certificate: connect to the fleet URL "
                "with it (mTLS).",
                code="client_certificate_required",
            )
        if peer.role != "node":
            raise PermissionDeniedError(
                f"A {peer.role} certificate cannot be renewed here; only node certificates.",
                code="node_identity_mismatch",
            )
        spec = decode_request(await request.body(), _RENEW)
        answer = await asyncio.to_thread(registry.renew, peer, spec.csr)
        log.info("node %s renewed its certificate (serial %x)", answer.node_id, answer.serial)
        return _json(answer)

    @post("/admin/v1/fleet/tokens", dependencies=auth)
    async def create_token(
        request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        spec = decode_request(await request.body(), _TOKEN)
        claims = registry.draft_token(
            region=spec.region,
            node_id=spec.node_id,
            device_class=spec.device_class,
            ttl_s=spec.ttl_s,
            uses=spec.uses,
            fleet_url=state.fleet_url,
        )
        await state.tenancy.store.record_event(
            "fleet_token_created",
            caller.user.id,
            None,
            {
                "token_id": claims.id,
                "region": claims.region,
                "node_id": claims.node_id,
                "device_class": claims.device_class,
                "expires_at": claims.expires_at,
                "uses": claims.uses,
            },
        )
        created = await asyncio.to_thread(registry.add_token, claims, caller.user.id)
        return _json(created, 201)

    @get("/admin/v1/fleet/nodes", dependencies=auth)
    async def list_nodes(caller: NamedDependency[Caller]) -> Response[Any]:
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        enrolled = await asyncio.to_thread(registry.nodes)
        known = {node.node_id for node in enrolled}
        seen = [node.row() for node in state.discovery.discovered() if node.node_id not in known]
        return _json(NodeListing(data=[*enrolled, *seen]))

    @post("/admin/v1/fleet/nodes/{node_id:str}/revoke", dependencies=auth, status_code=200)
    async def revoke(node_id: FromPath[str], caller: NamedDependency[Caller]) -> Response[Any]:
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        await asyncio.to_thread(registry.node, node_id)  # 404 before anything is recorded
        await state.tenancy.store.record_event(
            "fleet_node_revoked", caller.user.id, None, {"node_id": node_id}
        )
        serials = await asyncio.to_thread(registry.revoke, node_id)
        state.revoked_serials.update(serials)
        for hook in state.on_revoked:
            hook(node_id)
        log.warning("node %s revoked by %s", node_id, caller.user.id)
        return _json(await asyncio.to_thread(registry.node, node_id))

    return [ca, enroll, renew, create_token, list_nodes, revoke, *_monitor_routes(state)]


def _monitor_routes(state: RouterState) -> list[HTTPRouteHandler]:
    """Monitor certificates: issue (for a CSR), list, revoke."""
    auth = {"caller": Provide(state.tenancy.admin_caller)}
    registry = state.registry

    @post("/admin/v1/fleet/monitors", dependencies=auth)
    async def issue_monitor(
        request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        spec = decode_request(await request.body(), _MONITOR)
        cert = await asyncio.to_thread(registry.draft_monitor, spec.csr, spec.name, spec.days)
        await state.tenancy.store.record_event(
            "fleet_monitor_issued",
            caller.user.id,
            None,
            {
                "name": spec.name,
                "serial": str(cert.serial_number),
                "not_after": cert.not_valid_after_utc.timestamp(),
            },
        )
        issued = await asyncio.to_thread(registry.add_monitor, cert, caller.user.id)
        log.info("monitor certificate for %s issued by %s", spec.name, caller.user.id)
        return _json(issued, 201)

    @get("/admin/v1/fleet/monitors", dependencies=auth)
    async def list_monitors(caller: NamedDependency[Caller]) -> Response[Any]:
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        return _json(MonitorListing(data=await asyncio.to_thread(registry.monitors)))

    @post("/admin/v1/fleet/monitors/{name:str}/revoke", dependencies=auth, status_code=200)
    async def revoke_monitor(name: FromPath[str], caller: NamedDependency[Caller]) -> Response[Any]:
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        await asyncio.to_thread(registry.monitors, name)  # 404 before anything is recorded
        await state.tenancy.store.record_event(
            "fleet_monitor_revoked", caller.user.id, None, {"name": name}
        )
        serials = await asyncio.to_thread(registry.revoke_monitor, name)
        _crl_rewritten(state, serials)
        log.warning("monitor %s revoked by %s", name, caller.user.id)
        return _json(MonitorListing(data=await asyncio.to_thread(registry.monitors, name)))

    return [issue_monitor, list_monitors, revoke_monitor]


def _crl_rewritten(state: RouterState, serials: list[int]) -> None:
    """What a node revocation's hooks do about the CRL, for certificates of no node: the
    router refuses them, its listener and client reload the CRL, and the next policy
    snapshot carries it to the nodes."""
    state.revoked_serials.update(serials)
    if state.tls is not None:
        state.tls.reload_crl()
    state.policy.changed()


def _json(payload: object, status: int = 200) -> Response[Any]:
    return Response(ENCODER.encode(payload), media_type=MediaType.JSON, status_code=status)
