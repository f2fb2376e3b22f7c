"""The appliance's HTTP application: OpenAI endpoints, ops endpoints and error rendering."""

from __future__ import annotations

import array
import asyncio
import base64
import logging
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, MediaType, Request, Response, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath
from prometheus_client import CONTENT_TYPE_LATEST

from appliance._private import inference
from appliance._private.config import ApplianceConfig
from appliance._private.edge import EdgeGate, HttpRouterLink, is_fleet_principal
from appliance._private.edge_ledger import EdgeLedger
from appliance._private.engines.base import Finish, Generation, Prompt, SamplingParams
from appliance._private.errors import ModelLoadError, ModelNotFoundError, ModelNotReadyError
from appliance._private.image_events import ImageEventFeed
from appliance._private.membership import BOOT_ID, Membership
from appliance._private.metrics import ApplianceMetrics
from appliance._private.policy_sync import PolicySync, policy_book_for, policy_offer_routes
from appliance._private.presence import node_advertisement
from appliance._private.served import ServedModel
from compliance import Recorder, audit_routes
from federation import (
    ASSERTION_HEADER,
    ENCODER,
    INTERRUPTED,
    LOCAL_PRINCIPAL,
    PROMPT_TOKENS_HEADER,
    Action,
    Admission,
    APIError,
    AssistantMessage,
    AuthenticationError,
    Caller,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ClientGoneError,
    ClosingStream,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorDetail,
    ErrorResponse,
    FleetPresence,
    Heartbeat,
    ModelList,
    NodeCredentials,
    NodeModel,
    PermissionDeniedError,
    Pricing,
    Principal,
    SamplingFields,
    Tenancy,
    Usage,
    announce_admin_key,
    client_gone_response,
    count_exits,
    decode_request,
    error_handlers,
    peer_identity,
    read_body,
    reload_crl,
    require,
    shown_secret,
)

log = logging.getLogger("palisade.appliance")

VERSION = "0.1.0"
Authenticator = Callable[[Request[Any, Any, Any]], Awaitable[Principal]]

_CHAT_DECODER = msgspec.json.Decoder(ChatCompletionRequest)
_COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)
_EMBEDDING_DECODER = msgspec.json.Decoder(EmbeddingRequest)
_PRICING_DECODER = msgspec.json.Decoder(Pricing)
_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_INFERENCE_PATHS = {
    path: path for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
}


async def local_principal() -> Principal:
    """The standalone, unauthenticated principal (replaced by tenancy's authenticator)."""
    return LOCAL_PRINCIPAL


class ApplianceState:
    """Everything the handlers share: config, served models and metrics."""

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
        self.models = {
            model.id: ServedModel(model, config.home(), config.model_path(model), self.metrics)
            for model in config.models
        }
        self.load_error: ModelLoadError | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        self._loader: asyncio.Task[None] | None = None
        self.membership: Membership | None = None
        # An enrolled node's fleet policy: the signed snapshot (fleet keys) and its long poll.
        self.policy_sync: PolicySync | None = None
        # The offline edge: admission, budget share and usage of fleet keys (`edge.py`).
        self.edge: EdgeGate | None = None
        # The listener's TLS context and the CRL it checks client certificates against
        # (set by `server.serve` for an enrolled node).
        self.tls: ssl.SSLContext | None = None
        self.crl_path: Path | None = None
        # zeroconf (`[discovery]`): announces this node; an enrolled one, what its certificate
        # says (set by `create_app`).
        self.discovery = FleetPresence(config.discovery)
        self.credentials: NodeCredentials | None = None
        self._beats = 0

    def reload_crl(self) -> None:
        """Honour the newest `fleet/crl.pem` (a policy snapshot wrote it) from the next
        handshake on: peers whose certificates it lists are refused, both ways."""
        if self.tls is not None and self.crl_path is not None:
            reload_crl(self.tls, self.crl_path)
        if self.membership is not None:
            self.membership.reload_crl()

    @property
    def ready(self) -> bool:
        return all(model.engine.ready for model in self.models.values())

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
        for model in self.models.values():
            try:
                await asyncio.to_thread(model.engine.load)
            except ModelLoadError as exc:
                log.error("%s", exc)  # noqa: TRY400 - the message is the whole story
                self.load_error = exc
                self.on_fatal()
                return
            self.metrics.model_ready.labels(model.id).set(1)
            log.info("model %s ready", model.id)
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
        for model in self.models.values():
            await asyncio.to_thread(model.engine.close)
        if self.edge is not None:  # after the engines: what they settled is in its ledger
            self.edge.close()
        if self.tenancy is not None:
            await self.tenancy.close()
        if self.image_events is not None:
            await self.image_events.stop()
        if self.recorder is not None:
            await asyncio.to_thread(self.recorder.close)

    def start_generation(
        self,
        principal: Principal,
        served: ServedModel,
        prompt: Prompt,
        params: SamplingParams,
        prefix: str,
    ) -> tuple[Generation, _Reply]:
        """Admit (limits, budget), submit, and settle and audit on the loop when it ends."""
        reply = _Reply(prefix, served.id, self.receipt(served))
        admission = self._admit(principal, served, len(prompt) + params.max_tokens, reply.id)
        on_done = None
        if admission is not None or self.recorder is not None:

            def on_done(finish: Finish) -> None:
                status = "ok" if finish.reason in ("stop", "length") else finish.reason
                used = finish.prompt_tokens, finish.completion_tokens
                record = reply.id
                self._account(principal, admission, served, *used, status=status, record_id=record)

        try:
            generation = served.engine.submit(prompt, params, on_done)
        except BaseException as exc:  # not submitted: nothing else will settle it
            status = exc.code if isinstance(exc, APIError) else "error"
            self._account(principal, admission, served, 0, 0, status=status, record_id=reply.id)
            raise
        # From here the engine settles it, once, when the generation ends however it ends;
        # a stream that closes before its end (the client left) cancels it.
        reply.on_close = generation.cancel
        reply.headers[PROMPT_TOKENS_HEADER] = str(len(prompt))
        if admission is not None:
            reply.headers = reply.headers | admission.headers
        return generation, reply

    def content_keeper(
        self, principal: Principal, reply: _Reply, request: object
    ) -> Callable[[str], None] | None:
        """For orgs logging in `full`: a callback that seals the request and its answer."""
        recorder = self.recorder
        if recorder is None or recorder.mode_for(principal.logging_mode) != "full":
            return None

        def keep(text: str) -> None:
            content = {"request": msgspec.to_builtins(request), "response": text}
            recorder.content(principal.logging_mode, reply.id, principal.org, content)

        return keep

    def _admit(
        self, principal: Principal, served: ServedModel, estimate: int, request_id: str
    ) -> Admission | None:
        """Limits and budget, unless a router vouched for the caller (it enforces them).

        Either way the request's audit row is journaled as `interrupted` until it ends, so
        that a crash leaves it in the log (`Recorder.begin`).
        """
        admission = None
        if self.edge is not None and is_fleet_principal(principal):
            audit = self._row(
                principal, served, estimate, 0, status=INTERRUPTED, record_id=request_id
            )
            admission = self.edge.admit(
                principal, estimate, request_id=request_id, model=served.id, audit=audit
            )
        elif self.tenancy is not None and principal.via is None:
            gate = self.tenancy.gate
            admission = gate.admit(principal, estimate, request_id=request_id, model=served.id)
        if self.recorder is not None:
            charged = admission.reserved if admission is not None else 0
            row = self._row(principal, served, charged, 0, status=INTERRUPTED, record_id=request_id)
            self.recorder.begin(principal.logging_mode, row)
        return admission

    def _row(
        self,
        principal: Principal,
        served: ServedModel,
        prompt: int,
        completion: int,
        *,
        status: str,
        record_id: str,
    ) -> dict[str, Any]:
        """A request's audit row."""
        return {
            "id": record_id,
            "org": principal.org,
            "user": principal.user,
            "key_id": principal.key_id,
            "model": served.id,
            "region": self.config.region,
            "node": self.config.node_id,
            "input_tokens": prompt,
            "output_tokens": completion,
            "status": status,
            **({"via": principal.via} if principal.via is not None else {}),
        }

    def _account(
        self,
        principal: Principal,
        admission: Admission | None,
        served: ServedModel,
        prompt: int,
        completion: int,
        *,
        status: str,
        record_id: str,
    ) -> None:
        """Settle the admission (if this node admitted it) and write the audit row."""
        pricing = served.config.pricing
        spent = prompt * pricing.input_per_million + completion * pricing.output_per_million
        if admission is not None and self.edge is not None and is_fleet_principal(principal):
            used = prompt, completion
            self.edge.settle(
                admission,
                model=served.id,
                input_tokens=prompt,
                output_tokens=completion,
                status=status,
                cost=round(spent / 1e6, 9),
                audit=self._row(principal, served, *used, status=status, record_id=record_id),
            )
        elif admission is not None:
            assert self.tenancy is not None
            self.tenancy.gate.settle(
                admission,
                model=served.id,
                input_tokens=prompt,
                output_tokens=completion,
                status=status,
                cost=round(spent / 1e6, 9),
            )
        if self.recorder is not None:
            used = prompt, completion
            row = self._row(principal, served, *used, status=status, record_id=record_id)
            self.recorder.request(principal.logging_mode, row)

    async def embed(
        self, principal: Principal, served: ServedModel, texts: list[str]
    ) -> tuple[list[list[float]], int, dict[str, str]]:
        # Byte-level tokenizers never make more tokens than bytes (+ BOS/EOS): a true bound.
        estimate = sum(len(text.encode()) + 2 for text in texts)
        record = f"emb-{os.urandom(12).hex()}"
        admission = self._admit(principal, served, estimate, record)
        tokens, status = 0, "error"
        try:
            vectors, tokens = await served.engine.embed(texts)
            status = "ok"
        finally:
            self._account(principal, admission, served, tokens, 0, status=status, record_id=record)
        headers = self.receipt(served) | (admission.headers if admission is not None else {})
        return vectors, tokens, headers

    def model(self, name: str, principal: Principal) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise ModelNotFoundError(name, sorted(self.models))
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

    async def authenticate(self, request: Request[Any, Any, Any]) -> Principal:
        """A router's signed assertion, else a local API key, else a fleet key from the
        policy snapshot (`via` = `FLEET_POLICY_VIA`: this node admits and meters it)."""
        token = request.headers.get(ASSERTION_HEADER)
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

    def heartbeat(self) -> Heartbeat:
        """What the router is told every second."""
        self._beats += 1
        models = []
        for served in self.models.values():
            load = served.engine.load_now()
            performance = served.performance()
            models.append(
                NodeModel(
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
                )
            )
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

    def receipt(self, model: ServedModel) -> dict[str, str]:
        return {
            "X-Palisade-Region": self.config.region,
            "X-Palisade-Node": self.config.node_id,
            "X-Palisade-Device": model.config.device_class,
        }


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


def create_app(
    config: ApplianceConfig,
    *,
    tenancy: Tenancy | None = None,
    authenticate: Authenticator | None = None,
    demo: bool = False,
    recorder: Recorder | None = None,
    credentials: NodeCredentials | None = None,
    lab_secret: bytes | None = None,
) -> tuple[Litestar, ApplianceState]:
    """The appliance app. With `tenancy`, keys are required and /admin/v1 is mounted;
    without it, every caller is the local principal (`--no-auth`) unless `authenticate`
    supplies another. With `config.router_url` and the node's enrolled `credentials` (or,
    in a lab, the `lab_secret`), the appliance joins the router's fleet and also accepts the
    router's signed principal assertions."""
    state = ApplianceState(config, tenancy, demo=demo, recorder=recorder)
    state.credentials = credentials
    if config.router_url is not None and (credentials is not None or lab_secret is not None):
        state.membership = Membership(
            config.router_url,
            home=config.home(),
            node_id=config.node_id,
            snapshot=state.heartbeat,
            credentials=credentials,
            lab_secret=lab_secret if credentials is None else None,
        )
    book = policy_book_for(credentials, logging_floor=config.logging_floor) if credentials else None
    if book is not None and state.membership is not None:
        book.crl_hooks.append(lambda _: state.reload_crl())
        state.policy_sync = PolicySync(book, state.membership)
        state.edge = EdgeGate(
            EdgeLedger(config.home(), node=config.node_id, region=book.region),
            HttpRouterLink(state.membership),
            book,
            region=book.region,
            node=config.node_id,
            grace_s=config.fleet.offline_grace_s,
        )
    admin: list[HTTPRouteHandler] = []
    if tenancy is not None:
        authenticate = state.authenticate
        admin = [*tenancy.routes(), *_model_admin_routes(state, tenancy)]
        if recorder is not None:
            admin += audit_routes(tenancy, recorder, origin=config.node_id)
    app = Litestar(
        route_handlers=[
            *_openai_routes(state, Provide(authenticate or local_principal)),
            *_ops_routes(state),
            *admin,
            *(policy_offer_routes(book) if book is not None else []),
        ],
        exception_handlers={
            **error_handlers("appliance", log),
            ClientGoneError: client_gone_response,
        },
        middleware=[count_exits(_INFERENCE_PATHS, _counter(state.metrics))],
        on_startup=[state.start],
        on_shutdown=[state.stop],
        request_max_body_size=config.max_body_bytes,
        openapi_config=None,
        debug=False,
    )
    return app, state


def _openai_routes(  # noqa: PLR0915 - one closure per route
    state: ApplianceState, principal: Provide
) -> list[HTTPRouteHandler]:
    config = state.config

    @post("/v1/chat/completions", dependencies={"principal": principal}, status_code=200)
    async def chat_completions(
        request: Request[Any, Any, Any], principal: NamedDependency[Principal]
    ) -> Response[Any]:
        body = decode_request(await read_body(request), _CHAT_DECODER)
        served = state.model(body.model, principal)
        inference.check_chat(body)
        messages = inference.template_messages(body.messages)
        prompt = await served.engine.prepare_chat(messages)
        params = inference.sampling_params(
            body,
            requested=body.max_completion_tokens or body.max_tokens,
            prompt=prompt,
            context_length=served.engine.context_length,
        )
        generation, reply = state.start_generation(principal, served, prompt, params, "chatcmpl")
        keep = state.content_keeper(principal, reply, body)
        if body.stream:
            if served.engine.early_errors:
                await _started(request, generation)
            usage, continuous = _usage_options(body)
            return reply.stream(
                _chat_events(
                    generation, reply, include_usage=usage, continuous=continuous, keep=keep
                )
            )
        text = await _collect(request, generation)
        if keep is not None:
            keep(text)
        usage_, reason = _outcome(generation)
        choice = ChatChoice(0, AssistantMessage(content=text), reason)
        return reply.json(ChatCompletion(reply.id, reply.created, served.id, [choice], usage_))

    @post("/v1/completions", dependencies={"principal": principal}, status_code=200)
    async def completions(
        request: Request[Any, Any, Any], principal: NamedDependency[Principal]
    ) -> Response[Any]:
        body = decode_request(await read_body(request), _COMPLETION_DECODER)
        served = state.model(body.model, principal)
        inference.check_completion(body)
        prompt = await served.engine.prepare_text(*inference.single_prompt(body))
        params = inference.sampling_params(
            body,
            requested=body.max_tokens,
            default=16,
            prompt=prompt,
            context_length=served.engine.context_length,
        )
        generation, reply = state.start_generation(principal, served, prompt, params, "cmpl")
        keep = state.content_keeper(principal, reply, body)
        if body.stream:
            if served.engine.early_errors:
                await _started(request, generation)
            usage, continuous = _usage_options(body)
            return reply.stream(
                _completion_events(
                    generation, reply, include_usage=usage, continuous=continuous, keep=keep
                )
            )
        text = await _collect(request, generation)
        if keep is not None:
            keep(text)
        usage_, reason = _outcome(generation)
        choice = CompletionChoice(0, text, reason)
        return reply.json(Completion(reply.id, reply.created, served.id, [choice], usage=usage_))

    @post("/v1/embeddings", dependencies={"principal": principal}, status_code=200)
    async def embeddings(
        request: Request[Any, Any, Any], principal: NamedDependency[Principal]
    ) -> Response[Any]:
        body = decode_request(await read_body(request), _EMBEDDING_DECODER)
        served = state.model(body.model, principal)
        inference.check_embedding(body)
        inputs = inference.text_or_tokens(body.input, "input")
        texts = [
            item if isinstance(item, str) else served.engine.detokenize(item, place)
            for item, place in inputs
        ]
        vectors, tokens, headers = await state.embed(principal, served, texts)
        data = [
            EmbeddingData(index, _encode_vector(vector, body.encoding_format))
            for index, vector in enumerate(vectors)
        ]
        response = EmbeddingResponse(data, served.id, EmbeddingUsage(tokens, tokens))
        return _Reply("emb", served.id, headers).json(response)

    @get("/v1/models", dependencies={"principal": principal})
    async def list_models(principal: NamedDependency[Principal]) -> Response[Any]:
        del principal  # any authenticated caller may list models
        cards = [model.card(config.region) for model in state.models.values()]
        return _json(ModelList(cards))

    @get("/v1/models/{model_id:path}", dependencies={"principal": principal})
    async def get_model(
        model_id: FromPath[str], principal: NamedDependency[Principal]
    ) -> Response[Any]:
        served = state.models.get(model_id.lstrip("/"))
        if served is None:
            raise ModelNotFoundError(model_id.lstrip("/"), sorted(state.models))
        del principal
        return _json(served.card(config.region))

    return [chat_completions, completions, embeddings, list_models, get_model]


def _ops_routes(state: ApplianceState) -> list[HTTPRouteHandler]:
    config = state.config

    @get(["/healthz", "/health"])  # `/health`: what benchmark clients (guidellm) probe
    async def healthz() -> Response[Any]:
        health = {"status": "ok", "node": config.node_id, "region": config.region}
        if state.membership is not None:  # the image agent commits a slot once joined
            health["router"] = "joined" if state.membership.joined else "unreachable"
        return _json(health)

    @get("/readyz")
    async def readyz() -> Response[Any]:
        if not state.ready:
            raise ModelNotReadyError("Models are still loading; retry shortly.", retry_after=1)
        ready: dict[str, Any] = {"status": "ready", "models": sorted(state.models)}
        if state.edge is not None:  # an enrolled node: when it lost its router, if it has
            ready["offline_since"] = state.edge.offline_since_iso()
        return _json(ready)

    @get("/metrics")
    async def metrics() -> Response[Any]:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return [healthz, readyz, metrics]


class _Reply:
    """Identity and headers shared by every piece of one response."""

    __slots__ = ("created", "headers", "id", "model", "on_close")

    def __init__(self, prefix: str, model: str, headers: dict[str, str]) -> None:
        self.id = f"{prefix}-{os.urandom(12).hex()}"
        self.created = int(time.time())
        self.model = model
        self.headers = headers
        self.on_close: Callable[[], None] | None = None

    def json(self, payload: object) -> Response[Any]:
        return Response(ENCODER.encode(payload), media_type=MediaType.JSON, headers=self.headers)

    def stream(self, events: AsyncIterator[bytes]) -> ClosingStream:
        """`events` as SSE; `on_close` runs once the response is over, however it ended
        (the events may never have started, if the client left before the first byte)."""
        headers = self.headers | _SSE_HEADERS
        return ClosingStream(
            events, on_close=self.on_close, media_type="text/event-stream", headers=headers
        )


async def _collect(request: Request[Any, Any, Any], generation: Generation) -> str:
    """The whole generated text; cancels the generation if the client disconnects first."""
    text = asyncio.ensure_future(generation.text())
    hangup = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((text, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
    if not text.done():
        text.cancel()  # leaving Generation.stream() cancels the generation
        raise ClientGoneError
    return text.result()


async def _started(request: Request[Any, Any, Any], generation: Generation) -> None:
    """Wait for the first text before committing a 200: a generation that fails before
    producing any (say, its upstream refused it) is answered with its HTTP error instead."""
    started = asyncio.ensure_future(generation.wait_started())
    hangup = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((started, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
    if not started.done():
        started.cancel()
        generation.cancel()
        raise ClientGoneError
    finish = started.result()
    if finish is not None and finish.reason == "error":
        raise finish.failure()


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _model_admin_routes(state: ApplianceState, tenancy: Tenancy) -> list[HTTPRouteHandler]:
    caller_dependency = {"caller": Provide(tenancy.admin_caller)}

    @put("/admin/v1/models/{model_id:str}/pricing", dependencies=caller_dependency)
    async def set_pricing(
        model_id: FromPath[str], request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        require(caller.user.role, Action.MANAGE_MODELS, actor_org=caller.user.org, target_org=None)
        served = state.models.get(model_id)
        if served is None:
            raise ModelNotFoundError(model_id, sorted(state.models))
        pricing = decode_request(await request.body(), _PRICING_DECODER)
        served.config = msgspec.structs.replace(served.config, pricing=pricing)
        payload = {"model": model_id, **msgspec.to_builtins(pricing)}
        await tenancy.store.record_event("model_pricing_changed", caller.user.id, None, payload)
        return _json(served.card(state.config.region))

    return [set_pricing]


def _announce_demo(key: str, state: ApplianceState) -> None:
    model = next(iter(state.models))
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    path = state.config.home() / "demo.key"
    shown = shown_secret(key, path)
    sys.stdout.write(
        f"Demo org `demo`: API key for demo@local (in {path}):\n"
        f"  export PALISADE_API_KEY={shown}\n"
        f"  curl -s {state.url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-H \"Authorization: Bearer {shown}\" -d '{body}'\n\n"
    )
    sys.stdout.flush()


def _json(payload: object) -> Response[Any]:
    return Response(ENCODER.encode(payload), media_type=MediaType.JSON)


def _sse(payload: object) -> bytes:
    return b"data: " + ENCODER.encode(payload) + b"\n\n"


def _outcome(generation: Generation) -> tuple[Usage, str]:
    finish = generation.finish
    if finish is None:
        raise APIError("The engine failed while generating: no result.", code="engine_error")
    if finish.reason in ("error", "cancelled"):
        raise finish.failure()
    usage = Usage(
        finish.prompt_tokens,
        finish.completion_tokens,
        finish.prompt_tokens + finish.completion_tokens,
    )
    return usage, finish.reason


def _spent(generation: Generation) -> Usage | None:
    """What a generation that failed part-way used (sent before its error event, so that
    whoever meters the stream, such as the router, bills it exactly)."""
    finish = generation.finish
    if finish is None:
        return None
    total = finish.prompt_tokens + finish.completion_tokens
    return Usage(finish.prompt_tokens, finish.completion_tokens, total)


def _error_frame(generation: Generation) -> bytes | None:
    finish = generation.finish
    if finish is not None and finish.reason != "error":
        return None
    if finish is None:
        message = "The engine failed while generating: no result."
        error = ErrorDetail(message, "server_error", "engine_error", None)
    else:
        failure = finish.failure()
        error = ErrorDetail(failure.message, failure.error_type, failure.code, failure.param)
    return _sse(ErrorResponse(error))


def _usage_options(body: SamplingFields) -> tuple[bool, bool]:
    """Whether a stream ends with a usage chunk, and whether every chunk carries the usage
    so far (vLLM's `continuous_usage_stats`, which benchmark clients ask for)."""
    options = body.stream_options
    if options is None:
        return False, False
    return options.include_usage, options.continuous_usage_stats


def _usage_so_far(generation: Generation) -> Usage:
    """The prompt and the completion tokens behind the text streamed so far (the final
    count once the generation has ended)."""
    finish = generation.finish
    if finish is not None and finish.reason in ("stop", "length"):
        return _outcome(generation)[0]
    prompt, completion = generation.prompt.size, generation.tokens_read
    return Usage(prompt, completion, prompt + completion)


async def _chat_events(
    generation: Generation,
    reply: _Reply,
    *,
    include_usage: bool,
    continuous: bool = False,
    keep: Callable[[str], None] | None = None,
) -> AsyncIterator[bytes]:
    def chunk(delta: ChatDelta, reason: str | None = None) -> bytes:
        choice = ChatChunkChoice(0, delta, reason)
        usage = _usage_so_far(generation) if continuous else None
        return _sse(
            ChatCompletionChunk(reply.id, reply.created, reply.model, [choice], usage=usage)
        )

    yield chunk(ChatDelta(role="assistant", content=""))
    kept: list[str] = []
    async for text in generation.stream():
        if keep is not None:
            kept.append(text)
        yield chunk(ChatDelta(content=text))
    if keep is not None:
        keep("".join(kept))
    if (frame := _error_frame(generation)) is not None:
        if include_usage and (spent := _spent(generation)) is not None:
            yield _sse(ChatCompletionChunk(reply.id, reply.created, reply.model, [], usage=spent))
        yield frame
        return
    usage, reason = _outcome(generation)
    yield chunk(ChatDelta(), reason)
    if include_usage:
        yield _sse(ChatCompletionChunk(reply.id, reply.created, reply.model, [], usage=usage))
    yield _DONE


async def _completion_events(
    generation: Generation,
    reply: _Reply,
    *,
    include_usage: bool,
    continuous: bool = False,
    keep: Callable[[str], None] | None = None,
) -> AsyncIterator[bytes]:
    def chunk(text: str, reason: str | None = None) -> bytes:
        choice = CompletionChoice(0, text, reason)
        usage = _usage_so_far(generation) if continuous else None
        return _sse(Completion(reply.id, reply.created, reply.model, [choice], usage=usage))

    kept: list[str] = []
    async for text in generation.stream():
        if keep is not None:
            kept.append(text)
        yield chunk(text)
    if keep is not None:
        keep("".join(kept))
    if (frame := _error_frame(generation)) is not None:
        if include_usage and (spent := _spent(generation)) is not None:
            yield _sse(Completion(reply.id, reply.created, reply.model, [], usage=spent))
        yield frame
        return
    usage, reason = _outcome(generation)
    yield chunk("", reason)
    if include_usage:
        yield _sse(Completion(reply.id, reply.created, reply.model, [], usage=usage))
    yield _DONE


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(array.array("f", vector).tobytes()).decode("ascii")


# --- errors -----------------------------------------------------------------------------


def _counter(metrics: ApplianceMetrics) -> Callable[[str, int], None]:
    """Inference requests by endpoint and final status (499: the client left first)."""

    def count(endpoint: str, status: int) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()

    return count
