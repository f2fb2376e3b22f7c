"""`/admin/v1/models`: add, reload and remove models while the node serves (system admin).

Each change goes through the node's `ModelSet` (load beside, swap when ready, drain the old
version), is kept in the model overlay (`$PALISADE_HOME/models.overlay.json`) so that a
restart serves the same models, and is recorded as a management audit event.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec
from litestar import MediaType, Request, Response, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath
from msgspec import Struct

from appliance._private.config import ApplianceConfig
from appliance._private.engines.registry import ModelConfig
from appliance._private.model_overlay import ModelOverlay, decode_model_config, model_builtins
from appliance._private.model_set import ModelSet
from appliance._private.served import ServedModel
from federation import (
    ENCODER,
    Action,
    APIError,
    Caller,
    ConfigError,
    InvalidRequestError,
    Tenancy,
    decode_request,
    require,
)

_ANY_JSON = msgspec.json.Decoder(dict[str, Any])


class ModelHost(Protocol):
    """What these routes need from the node."""

    @property
    def config(self) -> ApplianceConfig: ...

    @property
    def models(self) -> ModelSet: ...


class ModelEntry(Struct, kw_only=True):
    """One version the node holds, as the admin API lists it (no config values: an
    engine's `env` may hold secrets)."""

    id: str
    engine: str
    state: str  # loading, serving, draining, closed
    ready: bool
    version: str | None
    sha256: str | None
    path: str | None
    in_flight: int
    created: int
    object: str = "model_version"


class ModelEntries(Struct):
    data: list[ModelEntry]
    object: str = "list"


class ReloadRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """A reload: the serving config read from disk again, with a new `path` (its `sha256`
    and `version` then reset unless given), `sha256` or `version`, or a whole `config`."""

    path: str | None = None
    sha256: str | None = None
    version: str | None = None
    config: dict[str, Any] | None = None


_RELOAD_DECODER = msgspec.json.Decoder(ReloadRequest)


def model_admin_routes(node: ModelHost, tenancy: Tenancy) -> list[HTTPRouteHandler]:
    caller_dependency = {"caller": Provide(tenancy.admin_caller)}
    overlay = ModelOverlay(node.config.home())

    async def audited(caller: Caller, event: str, served: ServedModel) -> None:
        payload = {
            "model": served.id,
            "engine": served.config.engine,
            "version": served.version,
            "sha256": served.sha256,
            "path": served.config.path,
        }
        await tenancy.store.record_event(event, caller.user.id, None, payload)

    async def refused(caller: Caller, action: str, model_id: str, exc: APIError) -> None:
        payload = {"action": action, "model": model_id, "code": exc.code, "message": exc.message}
        await tenancy.store.record_event("model_change_refused", caller.user.id, None, payload)

    @get("/admin/v1/models", dependencies=caller_dependency)
    async def list_models(caller: NamedDependency[Caller]) -> Response[Any]:
        _may_manage(caller)
        return _json(ModelEntries([_entry(served) for served in node.models.entries()]))

    @post("/admin/v1/models", dependencies=caller_dependency, status_code=201)
    async def add_model(
        request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        _may_manage(caller)
        config = _model_config(decode_request(await request.body(), _ANY_JSON))
        try:
            served = await node.models.add(config)
        except APIError as exc:
            await refused(caller, "add", config.id, exc)
            raise
        overlay.put(config)
        await audited(caller, "model_added", served)
        return _json(_entry(served), status=201)

    @post("/admin/v1/models/{model_id:str}/reload", dependencies=caller_dependency)
    async def reload_model(
        model_id: FromPath[str], request: Request[Any, Any, Any], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        _may_manage(caller)
        body = await request.body()
        change = decode_request(body, _RELOAD_DECODER) if body.strip() else ReloadRequest()
        current = node.models.get(model_id)
        config = _reloaded_config(current.config, change) if current is not None else None
        try:
            served = await node.models.reload(model_id, config)
        except APIError as exc:
            await refused(caller, "reload", model_id, exc)
            raise
        if config is not None and change != ReloadRequest():
            overlay.put(served.config)
        await audited(caller, "model_reloaded", served)
        return _json(_entry(served))

    @delete("/admin/v1/models/{model_id:str}", dependencies=caller_dependency, status_code=200)
    async def remove_model(
        model_id: FromPath[str], caller: NamedDependency[Caller]
    ) -> Response[Any]:
        _may_manage(caller)
        try:
            served = await node.models.remove(model_id)
        except APIError as exc:
            await refused(caller, "remove", model_id, exc)
            raise
        overlay.remove(model_id)
        await audited(caller, "model_removed", served)
        return _json(_entry(served))

    return [list_models, add_model, reload_model, remove_model]


def _may_manage(caller: Caller) -> None:
    require(caller.user.role, Action.MANAGE_MODELS, actor_org=caller.user.org, target_org=None)


def _model_config(data: object) -> ModelConfig:
    try:
        return decode_model_config(data, "request body")
    except ConfigError as exc:
        raise InvalidRequestError(str(exc), code="invalid_model_config") from exc


def _reloaded_config(current: ModelConfig, change: ReloadRequest) -> ModelConfig:
    """The config a reload loads: `change.config`, or the current one with its changes."""
    if change.config is not None:
        if (change.path, change.sha256, change.version) != (None, None, None):
            raise InvalidRequestError(
                "Send either a whole `config` or `path`/`sha256`/`version` changes, not both.",
                code="invalid_model_config",
                param="config",
            )
        return _model_config(change.config)
    data = model_builtins(current)
    if change.path is not None:  # another file: what was said of the old one no longer holds
        data |= {"path": change.path, "sha256": None, "version": None}
    if change.sha256 is not None:
        data["sha256"] = change.sha256
    if change.version is not None:
        data["version"] = change.version
    return _model_config(data)


def _entry(served: ServedModel) -> ModelEntry:
    return ModelEntry(
        id=served.id,
        engine=served.config.engine,
        state=served.state,
        ready=served.engine.ready,
        version=served.version,
        sha256=served.sha256,
        path=None if served.path is None else str(served.path),
        in_flight=served.in_flight,
        created=served.created,
    )


def _json(payload: object, status: int = 200) -> Response[Any]:
    return Response(ENCODER.encode(payload), media_type=MediaType.JSON, status_code=status)
