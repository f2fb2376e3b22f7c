"""The appliance's node core: its models, its lifecycle, who may call it, what it reports.

`Node` knows no HTTP route and no engine by name: the HTTP layer (`http/`) asks it to
authenticate a request and to look a model up (residency and readiness checked), and
goes through its `Ledger` for admission and accounting.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from litestar import Request

from appliance._private.config import ApplianceConfig
from appliance._private.edge import EdgeGate
from appliance._private.engines.registry import ModelConfig
from appliance._private.errors import ModelLoadError, ModelNotFoundError, ModelNotReadyError
from appliance._private.image_events import ImageEventFeed
from appliance._private.ledger import Ledger
from appliance._private.membership import BOOT_ID, Membership
from appliance._private.metrics import ApplianceMetrics
from appliance._private.model_set import ModelSet
from appliance._private.policy_sync import PolicySync
from appliance._private.presence import node_advertisement
from appliance._private.served import ServedModel
from compliance import Recorder
from federation import (
    ASSERTION_HEADER,
    AuthenticationError,
    FleetPresence,
    Heartbeat,
    NodeCredentials,
    NodeModel,
    PermissionDeniedError,
    Principal,
    ScopeHeaders,
    Tenancy,
    announce_admin_key,
    crl_serials,
    device_label,
    peer_identity,
    receipt_headers,
    reload_crl,
    shown_secret,
)

log = logging.getLogger("palisade.appliance")

VERSION = "0.1.0"


class Node:
    """Everything the routes share: config, served models, ledger, metrics, fleet links."""

    def __init__(
        self,
        config: ApplianceConfig,
        tenancy: Tenancy | None = None,
        *,
        demo: bool = False,
        recorder: Recorder | None = None,
    ) -> None:
        self.config = config
        self.tenancy = tenancy
        self.recorder = recorder
        # The image agent's events (install, boot, commit, rollback) into the audit log.
        self.image_events = ImageEventFeed(recorder, config.home()) if recorder else None
        self.demo = demo
        self.url = f"http://{config.host}:{config.port}"
        self.metrics = ApplianceMetrics(
            node_id=config.node_id, region=config.region, version=VERSION
        )
        if recorder is not None:
            self.metrics.watch_audit(recorder.log.lag)
        self.models = ModelSet(config.models, self.build_model)
        self.models.on_change = self._models_changed
        self.ledger = Ledger(
            region=config.region,
            node=config.node_id,
            metrics=self.metrics,
            tenancy=tenancy,
            recorder=recorder,
        )
        self.load_error: ModelLoadError | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        self._loader: asyncio.Task[None] | None = None
        self.membership: Membership | None = None
        # An enrolled node's fleet policy: the signed snapshot (fleet keys) and its long poll.
        self.policy_sync: PolicySync | None = None
        # The listener's TLS context and the CRL it checks client certificates against
        # (set by `server.serve` for an enrolled node).
        self.tls: ssl.SSLContext | None = None
        self.crl_path: Path | None = None
        # The server's: cuts the open connections of the serials given (set by `server.serve`).
        self.drop_revoked: Callable[[Collection[int]], object] = lambda _serials: None
        # zeroconf (`[discovery]`): announces this node; an enrolled one, what its certificate
        # says (set by `create_app`).
        self.discovery = FleetPresence(config.discovery)
        self.credentials: NodeCredentials | None = None
        self._beats = 0

    def build_model(self, model: ModelConfig) -> ServedModel:
        """A (not yet loaded) served model for one model config."""
        config = self.config
        return ServedModel(model, config.home(), config.model_path(model), self.metrics)

    @property
    def edge(self) -> EdgeGate | None:
        """The offline edge: admission, budget share and usage of fleet keys (`edge.py`)."""
        return self.ledger.edge

    @edge.setter
    def edge(self, gate: EdgeGate | None) -> None:
        self.ledger.edge = gate

    def reload_crl(self) -> None:
        """Honour the newest `fleet/crl.pem` (a policy snapshot wrote it) from the next
        handshake on: peers whose certificates it lists are refused, both ways, and their
        connections to this node already open are cut."""
        if self.tls is not None and self.crl_path is not None:
            reload_crl(self.tls, self.crl_path)
            self.drop_revoked(crl_serials(self.crl_path))
        if self.membership is not None:
            self.membership.reload_crl()

    @property
    def ready(self) -> bool:
        return self.models.ready

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self.tenancy is not None:
            admin_key = await self.tenancy.start()
            if admin_key is not None:
                announce_admin_key(admin_key, self.tenancy.home)
            if self.demo:
                _announce_demo(await self.tenancy.demo_key(), self)
        self._loader = asyncio.create_task(self._load_all())
        if self.membership is not None:
            await self.membership.start()
        if self.policy_sync is not None:
            await self.policy_sync.start()
        if self.edge is not None:
            await self.edge.start()
        if self.config.discovery.enabled:
            await self.discovery.start(node_advertisement(self.config, self.url, self.credentials))
        if self.image_events is not None:
            await self.image_events.start()

    async def _load_all(self) -> None:
        try:
            await self.models.load_all()
        except ModelLoadError as exc:
            log.error("%s", exc)  # noqa: TRY400 - the message is the whole story
            self.load_error = exc
            self.on_fatal()

    def _models_changed(self) -> None:
        if self.membership is not None:
            self.membership.nudge()

    async def stop(self) -> None:
        await self.discovery.stop()
        if self.policy_sync is not None:
            await self.policy_sync.stop()
        if self.edge is not None:  # before membership closes the client it talks through
            await self.edge.stop()
        if self.membership is not None:
            await self.membership.stop()
        if self._loader is not None:
            await self._loader
        await self.models.close_all()
        if self.edge is not None:  # after the engines: what they settled is in its ledger
            self.edge.close()
        if self.tenancy is not None:
            await self.tenancy.close()
        if self.image_events is not None:
            await self.image_events.stop()
        if self.recorder is not None:
            await asyncio.to_thread(self.recorder.close)

    # --- requests ----------------------------------------------------------------------

    def model(self, name: str, principal: Principal) -> ServedModel:
        """The model a request names, if this caller may use it here and it is ready."""
        served = self.models.get(name)
        if served is None:
            raise ModelNotFoundError(name, self.models.ids())
        if principal.regions is not None and self.config.region not in principal.regions:
            raise PermissionDeniedError(
                f"This appliance is in region `{self.config.region}`, which is outside the "
                f"regions your key may use ({', '.join(sorted(principal.regions))}).",
                code="residency_violation",
            )
        if not served.engine.ready:
            raise ModelNotReadyError(
                f"The model `{name}` is still loading; retry shortly.", retry_after=1
            )
        return served

    def any_model(self, name: str) -> ServedModel:
        """A served model by id, whatever its state (listing, admin)."""
        served = self.models.get(name)
        if served is None:
            raise ModelNotFoundError(name, self.models.ids())
        return served

    async def authenticate(self, request: Request[Any, Any, Any]) -> Principal:
        """A router's signed assertion, else a local API key, else a fleet key from the
        policy snapshot (`via` = `FLEET_POLICY_VIA`: this node admits and meters it)."""
        token = ScopeHeaders(request).get(ASSERTION_HEADER)
        if token is None:
            assert self.tenancy is not None
            try:
                return await self.tenancy.principal(request)
            except AuthenticationError:
                key = _bearer_key(request)
                if self.policy_sync is None or key is None:
                    raise
                principal = self.policy_sync.book.principal(key)
                if self.edge is not None:
                    await self.edge.prepare(principal)  # online: a share to admit it from
                return principal
        if self.membership is None:
            raise AuthenticationError(
                "This appliance is not in a fleet, so it accepts no router assertions; send a "
                "local API key (`Authorization: Bearer pal-sk-…`).",
                code="invalid_assertion",
            )
        if self.membership.tls is not None:
            _check_router_peer(request)
        if self.membership.verifier is None:
            raise AuthenticationError(
                f"This appliance has not yet registered with its router "
                f"({self.membership.router_url}), so it cannot check the router's assertion; "
                "retry shortly.",
                code="invalid_assertion",
            )
        return self.membership.verifier.principal(token)

    # --- what it reports ---------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        """What the router is told every second."""
        self._beats += 1
        models = [self._node_model(served) for served in self.models.all()]
        return Heartbeat(
            node_id=self.config.node_id,
            region=self.config.region,
            url=self.config.advertise_url or self.url,
            version=VERSION,
            models=models,
            sequence=self._beats,
            queue_depth=sum(model.queue_depth for model in models),
            in_flight=sum(model.in_flight for model in models),
            ttft_ewma_ms=next((m.ttft_ewma_ms for m in models if m.ttft_ewma_ms), None),
            tpot_ewma_ms=next((m.tpot_ewma_ms for m in models if m.tpot_ewma_ms), None),
            boot_id=BOOT_ID,
            offline_since=self.edge.reported_offline_since() if self.edge is not None else None,
        )

    @staticmethod
    def _node_model(served: ServedModel) -> NodeModel:
        load = served.engine.load_now()
        performance = served.performance()
        return NodeModel(
            id=served.id,
            device_class=served.config.device_class,
            context_length=served.config.context_length,
            ready=served.engine.ready,
            pricing=served.config.pricing,
            ttft_ewma_ms=served.ttft_ewma_ms,
            tpot_ewma_ms=served.tpot_ewma_ms,
            ttft_p50_ms=performance.ttft_p50_ms,
            queue_depth=load.waiting,
            in_flight=load.running,
            tpot_p50_ms=performance.tpot_p50_ms,
            engine=served.config.engine,
            accelerator=served.engine.capabilities.accelerator,
            version=served.version,
            sha256=served.sha256,
            capabilities=served.capability_names(),
        )

    def receipt(self, served: ServedModel) -> dict[str, str]:
        """Where an answer ran: region, node, device (with what runs the model) and the
        version of the model that answered."""
        device = device_label(served.config.device_class, served.engine.capabilities.accelerator)
        return receipt_headers(self.config.region, self.config.node_id, device, served.version)


def _bearer_key(request: Request[Any, Any, Any]) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _check_router_peer(request: Request[Any, Any, Any]) -> None:
    """An enrolled node takes assertions only over a connection whose client certificate
    (verified against the fleet CA and CRL by the handshake) is the router's."""
    peer = peer_identity(request)
    if peer is None or peer.role != "router":
        raise AuthenticationError(
            "A router assertion must come over a connection that presents the router's fleet "
            "certificate"
            + ("." if peer is None else f"; this one presents {peer.role} `{peer.node_id}`'s."),
            code="client_certificate_required",
        )


def _announce_demo(key: str, node: Node) -> None:
    model = node.models.ids()[0]
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    path = node.config.home() / "demo.key"
    shown = shown_secret(key, path)
    sys.stdout.write(
        f"Demo org `demo`: API key for demo@local (in {path}):\n"
        f"  export PALISADE_API_KEY={shown}\n"
        f"  curl -s {node.url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-H \"Authorization: Bearer {shown}\" -d '{body}'\n\n"
    )
    sys.stdout.flush()
