"""The router's HTTP application: the OpenAI API in front of the fleet, the management API,
the fleet protocol and the ops endpoints."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sqlite3
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath
from prometheus_client import CONTENT_TYPE_LATEST

from compliance import Recorder, audit_routes
from federation import (
    DEVICE_CLASS_HEADER,
    DEVICE_CLASSES,
    ENCODER,
    HEARTBEAT_DECODER,
    INTERRUPTED,
    NOT_ROUTED,
    SIGNATURE_HEADER,
    Action,
    Advertisement,
    APIError,
    AssertionSigner,
    AuthenticationError,
    Caller,
    ClientGoneError,
    FleetPresence,
    Heartbeat,
    HeartbeatReply,
    InvalidRequestError,
    ModelCard,
    ModelList,
    NotFoundError,
    PeerIdentity,
    Performance,
    PermissionDeniedError,
    Principal,
    RequestRecord,
    ServiceUnavailableError,
    Tenancy,
    allowed,
    announce_admin_key,
    cancel_and_wait,
    child_span,
    client_gone_response,
    count_exits,
    current_request,
    decode_request,
    end_span,
    error_handlers,
    peer_identity,
    read_body,
    request_counter,
    require_everywhere,
    shown_secret,
    sign_fleet_message,
    verify_fleet_message,
)
from router._private.ca import FleetCA
from router._private.canary import Canary, CanaryPolicy, CanaryTarget
from router._private.config import RouterConfig
from router._private.edge_routes import edge_routes
from router._private.errors import RegionHeaderError
from router._private.evidence_routes import evidence_routes
from router._private.fleet import Fleet, Node
from router._private.fleet_identity import fleet_identity
from router._private.leases import EdgeLeases
from router._private.metrics import RouterMetrics
from router._private.policy_publisher import PolicyPublisher
from router._private.policy_routes import policy_routes
from router._private.prometheus_routes import prometheus_routes
from router._private.proxy import Call, Forwarder, with_usage
from router._private.registry import NodeRegistry
from router._private.rollout import RolloutBook, with_images
from router._private.rollout_routes import rollout_routes
from router._private.shared_members import SharedMembers
from router._private.trust_routes import trust_routes

if TYPE_CHECKING:
    from router._private.transport import RouterTLS

log = logging.getLogger("palisade.router")

VERSION = "0.1.0"
REGIONS_HEADER = "x-palisade-regions"
_PIN_HEADER = DEVICE_CLASS_HEADER.lower()
# A request still unanswered after this long starts watching for its client hanging up.
_WATCH_AFTER_S = 0.05
_INFERENCE = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
# The paths whose requests are traced and get access lines (path -> route in spans).
INFERENCE_ROUTES = {path: path for path in _INFERENCE}


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Routed(msgspec.Struct):
    """What the router reads from a request body; the node validates the rest."""

    model: str
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: Any = 1  # read only to size the reservation: the node refuses a bad one
    prompt: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b""))

    def choices(self) -> int:
        """How many answers the request may generate: n for each of a completion's
        prompts (a value the node will refuse counts as 1)."""
        n = self.n if type(self.n) is int and 1 <= self.n <= _MAX_CHOICES else 1
        return n * _prompt_count(self.prompt)


_ROUTED = msgspec.json.Decoder(_Routed)
_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])
_MAX_CHOICES = 128  # the node's bound on n


def _prompt_count(prompt: msgspec.Raw) -> int:
    """A completion's prompts: a list of texts or of token lists is several; a text or a
    list of token ids (which starts with a number) is one."""
    head = bytes(memoryview(prompt)[:64]).lstrip()
    if not head.startswith(b"["):
        return 1
    first = head[1:].lstrip()[:1]
    if not first or first in b"-0123456789]":
        return 1
    try:
        return max(1, len(_ITEMS.decode(prompt)))
    except msgspec.DecodeError:
        return 1  # the node answers the 400


class RouterState:
    """Everything the handlers share."""

    def __init__(
        self,
        config: RouterConfig,
        tenancy: Tenancy,
        recorder: Recorder,
        *,
        lab_secret: bytes | None = None,
        demo_regions: list[str] | None = None,
    ) -> None:
        self.config = config
        self.tenancy = tenancy
        self.recorder = recorder
        # The lab switch (PALISADE_LAB_JOIN_SECRET): heartbeats without certificates, signed
        # with a shared secret, from plain-HTTP nodes. None everywhere but test labs.
        self.lab_secret = lab_secret
        # Serials of revoked certificates: a connection made before the revocation (the CRL
        # refuses new ones) must not heartbeat on.
        self.revoked_serials: set[int] = set()
        # Called with the node id when a node is revoked (the server drops it from the fleet
        # and reloads the CRL).
        self.on_revoked: list[Callable[[str], None]] = []
        # The router's TLS material (`transport.RouterTLS`; None in an app made without its
        # listeners) and the fleet URL nodes are told to use.
        self.tls: RouterTLS | None = None
        self.fleet_url = f"https://{config.fleet_host}:{config.fleet_port}"
        self.demo_regions = demo_regions
        # The key and name nodes know the router by: the fleet's, shared by the routers of
        # one fleet directory (fleet_identity.py).
        self.fleet_identity = fleet_identity(config)
        self.identity = self.fleet_identity.identity
        fleet_dir = config.fleet_path()
        # The fleet CA and the registry of tokens and enrolled nodes (trust_routes).
        self.ca = FleetCA.in_directory(fleet_dir)
        self.registry = NodeRegistry(
            config.home(),
            self.ca,
            self.identity,
            self.fleet_identity.name,
            fleet_dir=fleet_dir,
        )
        self.revoked_serials |= self.registry.revoked_serials()
        # Image rollouts and the image each node runs (rollout_routes).
        self.rollouts = RolloutBook(config.home(), fleet_dir=fleet_dir)
        self.on_revoked.append(self.rollouts.revoked)
        self.fleet = Fleet(config.health)
        self.metrics = RouterMetrics(router_id=config.router_id, version=VERSION)
        self.metrics.watch_fleet(lambda: self.fleet.status(config.router_id))
        self.metrics.watch_audit(recorder.log.lag)
        self.signer = AssertionSigner(self.identity, config.router_id, ttl_s=config.assertion_ttl_s)
        self.forwarder = Forwarder(config, self.fleet, self.signer, self.metrics, recorder=recorder)
        self.url = f"http://{config.host}:{config.port}"
        # zeroconf (`[discovery]`): announces the router and lists nodes seen on the network;
        # what it lists is never trusted (docs/architecture.md, Fleet trust → Discovery).
        self.discovery = FleetPresence(config.discovery)
        # Signed policy snapshots for the appliances (fleet keys, revoked certificates).
        self.policy = PolicyPublisher(
            tenancy,
            self.identity,
            home=config.home(),
            router_id=config.router_id,
            fleet_dir=fleet_dir,
        )
        self.on_revoked.append(lambda _: self.policy.changed())
        # Budget shares leased to nodes for the offline edge (set up with the gate, at start).
        self._leases: EdgeLeases | None = None
        # Membership shared with the other routers of a shared store (set up at start).
        self.shared_members: SharedMembers | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._probing: set[str] = set()
        self._probes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        admin_key = await self.tenancy.start()
        if admin_key is not None:
            announce_admin_key(admin_key, self.tenancy.home)
        self.forwarder.gate = self.tenancy.gate
        if self.tenancy.store.shared:
            await self._share_members()
        self.metrics.watch_budgets(self.tenancy.gate.budget_use)
        self.metrics.watch_certificates(self._certificates())
        self._leases = EdgeLeases(self.tenancy.store, self.tenancy.gate, self.recorder)
        await self._leases.start()
        await self.forwarder.start()
        await self.policy.start()
        self._tasks = [
            asyncio.create_task(self._sweep_forever()),
            asyncio.create_task(self._probe_forever()),
        ]
        if self.config.canary.enabled:
            self._tasks.append(asyncio.create_task(self._canary_forever()))
        if self.demo_regions is not None:
            _announce_demo(await self.tenancy.demo_key(self.demo_regions), self)
        if self.tls is not None:
            await self.discovery.start(self._advertisement(self.tls))

    async def _share_members(self) -> None:
        """Every router of the shared store knows every node (shared_members.py)."""
        shared = SharedMembers(
            self.tenancy.store.database,
            self.fleet,
            router_id=self.config.router_id,
            public_url=lambda: self.url,
            revoked=lambda serial: serial in self.revoked_serials,
            joined=self._joined_elsewhere,
            revocations=self._revoked_elsewhere,
        )
        self.on_revoked.append(shared.forget)
        self.shared_members = shared
        await shared.start()
        # Each router enforces its share of every key's rate limits (gate.py).
        self.tenancy.gate.rate_share = shared.routers_sharing

    async def _revoked_elsewhere(self) -> None:
        """Certificates another router of this fleet directory revoked (the registry is
        shared; this router's CRL contexts, fleet and open connections are its own): each
        revoked node goes through the hooks a revocation here runs; a monitor's certificate
        only reloads the CRL."""
        try:
            serials = await asyncio.to_thread(self.registry.revoked_serials)
            new = serials - self.revoked_serials
            nodes = await asyncio.to_thread(self.registry.nodes) if new else []
        except sqlite3.Error as exc:  # busy with a write of another router: the next sync
            log.debug("the fleet registry could not be read for revocations: %s", exc)
            return
        if not new:
            return
        self.revoked_serials |= new
        revoked = [node.node_id for node in nodes if node.revoked_at and int(node.serial) in new]
        for node_id in revoked:
            log.warning("node %s was revoked through another router of the fleet", node_id)
            for hook in self.on_revoked:
                hook(node_id)
        if not revoked:
            if self.tls is not None:
                self.tls.reload_crl()
            self.policy.changed()

    async def _joined_elsewhere(self, node: Node) -> None:
        log.info(
            "node %s joined from %s (%s), heard by another router", node.id, node.region, node.url
        )
        await self.tenancy.allow_canary([node.region])

    def _certificates(self) -> dict[str, Path]:
        """The certificates the router serves with, for their expiry metric."""
        paths = {}
        if self.tls is not None:
            paths["fleet"] = self.tls.cert_path
        if self.config.tls_cert is not None:
            paths["public"] = Path(self.config.tls_cert)
        return paths

    def leases(self) -> EdgeLeases:
        if self._leases is None:
            raise ServiceUnavailableError("The router is starting; retry shortly.", retry_after=1)
        return self._leases

    def _advertisement(self, tls: RouterTLS) -> Advertisement:
        """The router as zeroconf announces it: its fleet URL and the CA nodes must pin."""
        return Advertisement(
            role="router",
            node_id=self.config.router_id,
            url=self.fleet_url,
            fleet_id=tls.ca.fleet_id,
            fingerprint=tls.ca.fingerprint,
        )

    async def stop(self) -> None:
        await self.discovery.stop()
        await cancel_and_wait(*self._tasks, *self._probes)
        if self.shared_members is not None:
            await self.shared_members.stop()
        await self.forwarder.close()
        await self.policy.stop()
        await self.tenancy.close()
        await asyncio.to_thread(self.recorder.close)

    # --- health loops ---------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        period = self.config.health.heartbeat_interval_s / 4
        while True:
            for node in self.fleet.sweep():
                log.warning(
                    "node %s (%s) is down: no heartbeat for %.1f s",
                    node.id,
                    node.region,
                    self.config.health.heartbeat_interval_s * self.config.health.missed_beats_down,
                )
            await asyncio.sleep(period)

    async def _probe_forever(self) -> None:
        while True:
            for node in list(self.fleet.nodes.values()):
                if node.id not in self._probing and self.fleet.probe_due(node):
                    self._probing.add(node.id)
                    probe = asyncio.create_task(self._probe(node.id))
                    self._probes.add(probe)  # the loop keeps only weak references to tasks
                    probe.add_done_callback(self._probes.discard)
            await asyncio.sleep(self.config.health.probe_interval_s)

    async def _probe(self, node_id: str) -> None:
        node = self.fleet.nodes.get(node_id)
        try:
            if node is None:
                return
            was = self.fleet.state(node)
            ok = await self.forwarder.probe(node, self.config.health.probe_timeout_s)
            if ok is not None:  # a node still loading is neither healthy nor failing
                self.fleet.probed(node, ok=ok)
            now = self.fleet.state(node)
            if now != was:
                log.warning("node %s (%s): %s -> %s", node.id, node.region, was, now)
        finally:
            self._probing.discard(node_id)

    async def _canary_forever(self) -> None:
        """The router's own canary (`[canary]`): through its public listener, as a client."""
        settings = self.config.canary
        policy = CanaryPolicy(settings.every_s)

        async def targets() -> list[CanaryTarget]:
            found = policy.targets(self.fleet.status(self.config.router_id))
            await self.tenancy.allow_canary({target.region for target in found})
            return found

        key = await self.tenancy.canary_key({node.region for node in self.fleet.nodes.values()})
        canary = Canary(
            policy,
            self.metrics.canary,
            url=self.url,
            key=key,
            timeout_s=settings.timeout_s,
            tls=_own_certificate(self.config),
        )
        async with canary:
            await canary.run(targets)

    # --- requests ----------------------------------------------------------------------------

    def regions_for(self, principal: Principal, header: str | None) -> frozenset[str]:
        """Org ∩ key regions, narrowed (never widened) by the X-Palisade-Regions header."""
        allowed = principal.regions if principal.regions is not None else frozenset()
        if header is None:
            return allowed
        asked = frozenset(part.strip() for part in header.split(",") if part.strip())
        outside = asked - allowed
        if outside or not asked:
            raise RegionHeaderError(
                f"X-Palisade-Regions asks for {', '.join(sorted(outside)) or 'no region'}, "
                f"outside the regions this key may use ({', '.join(sorted(allowed)) or 'none'}); "
                "the header may only narrow them.",
                param="X-Palisade-Regions",
            )
        return asked


def create_router_app(
    config: RouterConfig,
    *,
    tenancy: Tenancy,
    recorder: Recorder,
    lab_secret: bytes | None = None,
    demo_regions: list[str] | None = None,
) -> tuple[Litestar, RouterState]:
    state = RouterState(config, tenancy, recorder, lab_secret=lab_secret, demo_regions=demo_regions)
    app = Litestar(
        route_handlers=[
            *_openai_routes(state),
            *_fleet_routes(state),
            *trust_routes(state),
            *policy_routes(state.policy, lambda r: certified_node(state, peer_identity(r))),
            *edge_routes(state.leases, lambda r: certified_node(state, peer_identity(r))),
            *rollout_routes(state, lambda r: certified_node(state, peer_identity(r))),
            *_ops_routes(state),
            *tenancy.routes(),
            *audit_routes(tenancy, recorder, origin=config.router_id),
            *evidence_routes(state),
            *prometheus_routes(state),
        ],
        exception_handlers={
            **error_handlers("router", log, state.metrics.refused),
            ClientGoneError: client_gone_response,
        },
        middleware=[
            count_exits(
                _INFERENCE, request_counter(state.metrics.requests, state.metrics.durations)
            )
        ],
        on_startup=[state.start],
        on_shutdown=[state.stop],
        request_max_body_size=config.max_body_bytes,
        openapi_config=None,
        logging_config=None,  # the process's logging is the CLI's (`configure_logging`)
        debug=False,
    )
    return app, state


def _openai_routes(state: RouterState) -> list[HTTPRouteHandler]:
    tenancy = state.tenancy

    @post("/v1/chat/completions", status_code=200)
    async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await _forward(state, request, "/v1/chat/completions")

    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await _forward(state, request, "/v1/completions")

    @post("/v1/embeddings", status_code=200)
    async def embeddings(request: Request[Any, Any, Any]) -> Response[Any]:
        return await _forward(state, request, "/v1/embeddings")

    @get("/v1/models")
    async def list_models(request: Request[Any, Any, Any]) -> Response[Any]:
        principal = await tenancy.principal(request)
        regions = state.regions_for(principal, request.headers.get(REGIONS_HEADER))
        cards = [_card(state, model, regions) for model in state.fleet.model_ids(regions)]
        return _json(ModelList([card for card in cards if card is not None]))

    @get("/v1/models/{model_id:path}")
    async def get_model(request: Request[Any, Any, Any], model_id: FromPath[str]) -> Response[Any]:
        principal = await tenancy.principal(request)
        regions = state.regions_for(principal, request.headers.get(REGIONS_HEADER))
        name = model_id.lstrip("/")
        card = _card(state, name, regions)
        if card is None:
            raise NotFoundError(
                f"No node in the regions this key may use serves `{name}`; "
                "GET /v1/models lists what does.",
                code="model_not_found",
                param="model",
            )
        return _json(card)

    return [chat_completions, completions, embeddings, list_models, get_model]


async def _forward(
    state: RouterState, request: Request[Any, Any, Any], endpoint: str
) -> Response[Any]:
    principal = await _authenticated(state, request)
    regions = state.regions_for(principal, request.headers.get(REGIONS_HEADER))
    if regions != principal.regions:
        principal = dataclasses.replace(principal, regions=regions)
    pin = request.headers.get(_PIN_HEADER)
    preference = None if pin is None else pinned_device_class(principal, pin)
    body = await read_body(request)
    routed = decode_request(body, _ROUTED)
    call = await _call(state, endpoint, body, routed, principal)  # admitted: settled exactly once
    call.preference = preference
    with state.forwarder.accounting(call):
        reserved = call.admission.reserved if call.admission is not None else 0
        _begin(state, principal, call.model, call.id, reserved)
        return await _noting_hangup(request, state.forwarder.forward(call))


async def _authenticated(state: RouterState, request: Request[Any, Any, Any]) -> Principal:
    """The caller's principal; its org goes into the request's log lines, and a traced
    request gets an `auth` span around finding it."""
    context = current_request()
    span = child_span(context, "auth")
    try:
        principal = await state.tenancy.principal(request)
    except APIError as exc:
        if span is not None:
            end_span(span, exc.code)
        raise
    if context is not None:
        context.org = principal.org
    if span is not None:
        span.set_attribute("palisade.org", principal.org)
        end_span(span)
    return principal


def pinned_device_class(principal: Principal, header: str) -> tuple[str]:
    """The one device class X-Palisade-Device-Class pins a request to: only for roles the
    RBAC matrix allows (the canary); a tenant's choice stays the operator's preference."""
    if not allowed(
        principal.role, Action.PIN_DEVICE_CLASS, actor_org=principal.org, target_org=None
    ):
        raise PermissionDeniedError(
            f"{DEVICE_CLASS_HEADER} is for the operator's canary; your role ({principal.role}) "
            "may not pin a request to one device class. Leave the header out: the router "
            "picks the device class.",
            code="permission_denied",
            param=DEVICE_CLASS_HEADER,
        )
    device = header.strip()
    if device not in DEVICE_CLASSES:
        raise InvalidRequestError(
            f"{DEVICE_CLASS_HEADER} must be one of {', '.join(DEVICE_CLASSES)}, not `{device}`.",
            code="invalid_value",
            param=DEVICE_CLASS_HEADER,
        )
    return (device,)


async def _noting_hangup(
    request: Request[Any, Any, Any], answer: Awaitable[Response[Any]]
) -> Response[Any]:
    """`answer`, while watching for the client hanging up meanwhile (`count_exits` then counts
    the request as 499). The node's answer is still awaited and billed: the node did the
    work, and cancelling would make a hang-up just before the answer a free request.

    The watch starts only once the answer is slow (`_WATCH_AFTER_S`): a task per request
    would cost more than the router's own bookkeeping, and a client that has left by then
    is seen at once (every later receive says so).
    """
    watching: list[asyncio.Future[None]] = []

    def watch() -> None:
        watching.append(asyncio.ensure_future(_disconnected(request)))

    timer = asyncio.get_running_loop().call_later(_WATCH_AFTER_S, watch)
    try:
        return await answer
    finally:
        timer.cancel()
        for hangup in watching:
            hangup.cancel()


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _call(
    state: RouterState, endpoint: str, body: bytes, routed: _Routed, principal: Principal
) -> Call:
    regions = principal.regions or frozenset()
    if not state.fleet.serves(routed.model):
        raise NotFoundError(
            f"No node in this fleet serves the model `{routed.model}`; GET /v1/models lists the "
            "models you can use.",
            code="model_not_found",
            param="model",
        )
    wants = routed.stream_options is not None and routed.stream_options.include_usage
    # Re-encoded before admission, so a body that cannot be is refused with nothing taken.
    payload = with_usage(body) if routed.stream and not wants else body
    limit = routed.max_completion_tokens or routed.max_tokens
    if endpoint == "/v1/embeddings":
        limit = 0  # embeddings read their input and write no tokens
    elif limit is None:
        limit = _context_length(state, routed.model)
    # Byte-level tokenizers never make more tokens than bytes: a true worst case to reserve.
    estimate = len(body) + max(limit, 0) * routed.choices()
    request_id = f"route-{os.urandom(12).hex()}"
    context = current_request()
    if context is not None:
        context.adopt(request_id)  # the id of its answer and of its logs, unless the client's
    admission = await state.tenancy.gate.admit_async(
        principal, estimate, request_id=request_id, model=routed.model
    )
    return Call(
        endpoint=endpoint,
        body=payload,
        model=routed.model,
        principal=principal,
        regions=regions,
        stream=routed.stream,
        wants_usage=wants,
        admission=admission,
        headers=admission.headers,
        id=request_id,
        context=context,
    )


def _begin(state: RouterState, principal: Principal, model: str, call: str, reserved: int) -> None:
    """Journal the audit row the call leaves if the router dies before it settles."""
    state.recorder.begin(
        principal.logging_mode,
        RequestRecord(
            id=call,
            org=principal.org,
            user=principal.user,
            key_id=principal.key_id,
            model=model,
            region=NOT_ROUTED,
            node=NOT_ROUTED,
            input_tokens=reserved,
            output_tokens=0,
            status=INTERRUPTED,
            tried=[],
        ),
    )


def _context_length(state: RouterState, model: str) -> int:
    lengths = [
        served.context_length
        for node in state.fleet.nodes.values()
        if (served := node.models.get(model)) is not None
    ]
    return max(lengths, default=4096)


def _card(state: RouterState, model: str, regions: frozenset[str]) -> ModelCard | None:
    """One card per model: placement and figures of the node a request would go to now."""
    preference = state.config.preference(model)
    node = state.fleet.pick(model, regions, preference)
    candidates = [
        n for n in state.fleet.nodes.values() if n.region in regions and model in n.models
    ]
    if node is None and not candidates:
        return None
    chosen = node or candidates[0]
    served = chosen.models[model]
    return ModelCard(
        id=model,
        created=0,
        owned_by="palisade",
        pricing=served.pricing,
        performance=Performance(ttft_p50_ms=served.ttft_p50_ms, tpot_p50_ms=served.tpot_p50_ms),
        region=chosen.region,
        device_class=served.device_class,
        context_length=served.context_length,
        capabilities=_shared_capabilities(model, candidates),
    )


def _shared_capabilities(model: str, candidates: list[Node]) -> list[str]:
    """What every node that may serve `model` serves (the nodes not down; all of them when
    every one is): a request may go to any of them, or fail over to another."""
    nodes = [node for node in candidates if not node.down] or candidates
    lists = [node.models[model].capabilities for node in nodes]
    shared = set(lists[0]).intersection(*lists[1:])
    return [name for name in lists[0] if name in shared]


def _fleet_routes(state: RouterState) -> list[HTTPRouteHandler]:
    caller_dependency = {"caller": Provide(state.tenancy.admin_caller)}

    @post("/federation/v1/heartbeat", status_code=200)
    async def heartbeat(request: Request[Any, Any, Any]) -> Response[Any]:
        body = await request.body()
        identity = peer_identity(request)
        if identity is None and state.lab_secret is not None:
            verify_fleet_message(state.lab_secret, body, request.headers.get(SIGNATURE_HEADER))
        else:
            identity = certified_node(state, identity)
        beat = decode_request(body, HEARTBEAT_DECODER)
        if identity is not None:
            _check_claims(beat, identity)
        known = beat.node_id in state.fleet.nodes
        node = state.fleet.beat(beat, identity)
        if state.shared_members is not None:
            state.shared_members.heard(beat, identity.serial if identity is not None else 0)
        if not known:
            log.info("node %s joined from %s (%s)", node.id, node.region, node.url)
            await state.tenancy.allow_canary([node.region])  # canaries probe every region
        health = state.config.health
        reply = ENCODER.encode(
            HeartbeatReply(
                router_id=state.config.router_id,
                router_public_key=state.identity.public_key.hex(),
                interval_s=health.heartbeat_interval_s,
                missed_beats_down=health.missed_beats_down,
                policy_version=state.policy.version,
            )
        )
        headers = {}
        if identity is None and state.lab_secret is not None:
            headers[SIGNATURE_HEADER] = sign_fleet_message(state.lab_secret, reply)
        return Response(reply, media_type=MediaType.JSON, headers=headers)

    @get("/federation/v1/fleet", dependencies=caller_dependency)
    async def fleet(caller: NamedDependency[Caller]) -> Response[Any]:
        require_everywhere(caller.user.role, Action.VIEW_FLEET)
        images = await asyncio.to_thread(state.rollouts.images)
        return _json(with_images(state.fleet.status(state.config.router_id), images))

    @post("/federation/v1/canary/keys", status_code=201, dependencies=caller_dependency)
    async def canary_key(caller: NamedDependency[Caller]) -> Response[Any]:
        """A new key of the canary user, for a canary run elsewhere (`palisade canary`)."""
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        regions = {node.region for node in state.fleet.nodes.values()}
        created = await state.tenancy.new_canary_key(regions, caller.user.id)
        return Response(ENCODER.encode(created), status_code=201, media_type=MediaType.JSON)

    return [heartbeat, fleet, canary_key]


def certified_node(state: RouterState, identity: PeerIdentity | None) -> PeerIdentity:
    """The node certificate a fleet request came with (`peer_identity(request)`: verified
    by the handshake against the fleet CA and CRL), or the refusal. Every fleet route that
    a node calls checks its caller with this."""
    if identity is None:
        raise AuthenticationError(
            "Fleet requests need the node's fleet certificate: connect to the router's fleet "
            "URL over TLS with the certificate from `palisade node enroll`.",
            code="client_certificate_required",
        )
    if identity.role != "node":
        raise PermissionDeniedError(
            f"The certificate presented is a {identity.role} certificate; fleet heartbeats "
            "come from node certificates.",
            code="node_identity_mismatch",
        )
    if identity.serial in state.revoked_serials:
        raise PermissionDeniedError(
            f"The certificate of node `{identity.node_id}` has been revoked; enroll the node "
            "again with a new token.",
            code="node_revoked",
        )
    return identity


def _check_claims(beat: Heartbeat, identity: PeerIdentity) -> None:
    """A heartbeat may only speak for the node, region and device class its certificate
    names: the router trusts the certificate, never the claim."""
    if beat.node_id != identity.node_id:
        raise PermissionDeniedError(
            f"This heartbeat claims node `{beat.node_id}`, but its certificate is node "
            f"`{identity.node_id}`'s.",
            code="node_identity_mismatch",
            param="node_id",
        )
    if beat.region != identity.region:
        raise PermissionDeniedError(
            f"This heartbeat claims region `{beat.region}`, but node `{identity.node_id}` is "
            f"certified for `{identity.region}`.",
            code="region_mismatch",
            param="region",
        )
    if identity.device_class is not None:
        for model in beat.models:
            if model.device_class != identity.device_class:
                raise PermissionDeniedError(
                    f"Model `{model.id}` is declared `{model.device_class}`, but node "
                    f"`{identity.node_id}` is certified for `{identity.device_class}` only.",
                    code="device_class_mismatch",
                    param="models",
                )
    if not beat.url.startswith("https://"):
        raise InvalidRequestError(
            f"Node `{identity.node_id}` advertises {beat.url}; a certified node serves HTTPS "
            "with its node certificate (the router sends it assertions).",
            code="insecure_node_url",
            param="url",
        )


def _ops_routes(state: RouterState) -> list[HTTPRouteHandler]:
    @get(["/healthz", "/health"])  # `/health`: what benchmark clients (guidellm) probe
    async def healthz() -> Response[Any]:
        return _json({"status": "ok", "router": state.config.router_id})

    @get("/readyz")
    async def readyz() -> Response[Any]:
        up = sum(1 for node in state.fleet.nodes.values() if state.fleet.state(node) == "up")
        return _json({"status": "ready", "nodes": len(state.fleet.nodes), "nodes_up": up})

    @get("/metrics")
    async def metrics(request: Request[Any, Any, Any]) -> Response[Any]:
        """Open to anyone, but the series that name orgs only to a key that may read
        metrics (the monitor's, a system admin's): org names are tenants' business."""
        with_orgs = "authorization" in request.headers
        if with_orgs:
            caller = await state.tenancy.admin_caller(request)
            require_everywhere(caller.user.role, Action.READ_METRICS)
        images = await asyncio.to_thread(state.rollouts.images)
        versions = {node: image.version for node, image in images.items()}
        exposition = state.metrics.render(versions, with_orgs=with_orgs)
        return Response(exposition, media_type=CONTENT_TYPE_LATEST)

    return [healthz, readyz, metrics]


def _own_certificate(config: RouterConfig) -> ssl.SSLContext | None:
    """How the router's canary trusts the router's own HTTPS listener: its certificate, at
    whatever address it is bound to (the canary calls it on that address)."""
    if config.tls_cert is None:
        return None
    context = ssl.create_default_context(cafile=config.tls_cert)
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _json(payload: object) -> Response[Any]:
    return Response(ENCODER.encode(payload), media_type=MediaType.JSON)


def _announce_demo(key: str, state: RouterState) -> None:
    regions = ", ".join(state.demo_regions or [])
    path = state.tenancy.home / "demo.key"
    sys.stdout.write(
        f"Demo org `demo` (regions {regions}): API key for demo@local (in {path}):\n"
        f"  export PALISADE_API_KEY={shown_secret(key, path)}\n\n"
    )
    sys.stdout.flush()
