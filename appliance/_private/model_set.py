"""The models an appliance serves, changed while it serves them.

A new or upgraded model loads BESIDE what is serving (in a thread) and takes new requests
only once loaded; the version it replaces (or a removed model) stops getting new
requests, drains those it has in flight (`ServedModel.acquire`/`release`, counted around
each request) and is closed. A load that fails (the engine refused the file, the digest
is not the configured `sha256`) changes nothing: the old version keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from appliance._private.digest import model_digest
from appliance._private.engines.registry import ModelConfig
from appliance._private.errors import (
    ModelConflictError,
    ModelDigestMismatchError,
    ModelLoadError,
    ModelLoadFailedError,
    ModelNotFoundError,
)
from appliance._private.served import ServedModel
from federation import APIError, InvalidRequestError, PalisadeError

log = logging.getLogger("palisade.appliance")

Build = Callable[[ModelConfig], ServedModel]
# How long a replaced or removed version may take to finish its requests before it is
# closed anyway (its remaining streams then end with an error frame).
DRAIN_TIMEOUT_S = 300.0


@dataclass
class Reconciled:
    """What a reconcile (SIGHUP) did, by model id; `failed` maps an id to its error."""

    added: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    repriced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class ModelSet:
    """One serving `ServedModel` per id, plus the versions loading beside them and those
    draining. `build` makes a (not yet loaded) `ServedModel` for a config."""

    def __init__(
        self,
        configs: Iterable[ModelConfig],
        build: Build,
        *,
        clock: Callable[[], float] = time.monotonic,
        digest: Callable[[Path], str] = model_digest,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        self._build = build
        self._clock = clock
        self._digest = digest
        self._drain_timeout_s = drain_timeout_s
        self._serving: dict[str, ServedModel] = {config.id: build(config) for config in configs}
        self._loading: list[ServedModel] = []
        self._draining: list[ServedModel] = []
        self._drains: set[asyncio.Task[None]] = set()
        self._changing = asyncio.Lock()  # one add/reload/remove at a time
        self._closing = False
        # Called after a model starts or stops taking traffic (the node nudges its router).
        self.on_change: Callable[[], None] = lambda: None

    # --- reading (the node and the HTTP layer) ---------------------------------------

    def get(self, name: str) -> ServedModel | None:
        """The version serving `name` now. A request calls `acquire()` on it before its
        next `await`, so that a swap cannot close it under the request."""
        return self._serving.get(name)

    def ids(self) -> list[str]:
        """Served model ids, in config order (new ones last)."""
        return list(self._serving)

    def all(self) -> list[ServedModel]:
        return list(self._serving.values())

    def entries(self) -> list[ServedModel]:
        """Every version the node holds: serving, loading beside, draining."""
        return [*self._serving.values(), *self._loading, *self._draining]

    @property
    def ready(self) -> bool:
        return all(served.engine.ready for served in self._serving.values())

    # --- start and stop ----------------------------------------------------------------

    async def load_all(self) -> None:
        """Load the configured models one by one; raises `ModelLoadFailedError` (or its
        `ModelDigestMismatchError`) for the first that cannot load."""
        for served in self.all():
            await asyncio.to_thread(self._verify_and_load, served)
            served.serving()
            log.info("model %s ready (version %s)", served.id, served.version)
            self.on_change()

    async def close_all(self) -> None:
        """Close everything (shutdown): draining versions no longer wait for requests."""
        self._closing = True
        async with self._changing:
            await self.drained()
            for served in self.all():
                await _close(served)

    async def drained(self) -> None:
        """Wait until every replaced or removed version has drained and closed."""
        await asyncio.gather(*self._drains, return_exceptions=True)

    # --- changing (admin API, SIGHUP) --------------------------------------------------

    async def add(self, config: ModelConfig) -> ServedModel:
        """Load a new model and serve it; 409 `model_exists` if the id is served."""
        async with self._changing:
            if config.id in self._serving:
                raise ModelConflictError(
                    f"The model `{config.id}` is already served; reload it to change it "
                    "(POST /admin/v1/models/{id}/reload, `palisade models reload`).",
                    code="model_exists",
                    param="id",
                )
            served = await self._load_beside(config)
            self._serving[config.id] = served
            self._started(served)
            return served

    async def reload(self, model_id: str, config: ModelConfig | None = None) -> ServedModel:
        """Load `config` (default: the serving config, read from disk again) beside the
        serving version, swap, and drain the old one."""
        async with self._changing:
            old = self._require(model_id)
            config = old.config if config is None else config
            if config.id != model_id:
                raise InvalidRequestError(
                    f"A reload of `{model_id}` cannot rename it to `{config.id}`; add the new "
                    "id and remove the old one instead.",
                    code="model_id_mismatch",
                    param="id",
                )
            served = await self._load_beside(config)
            self._serving[model_id] = served
            self._started(served)
            self._retire(old)
            return served

    async def remove(self, model_id: str) -> ServedModel:
        """Stop serving `model_id`: no new requests, in-flight ones drain, then close."""
        async with self._changing:
            old = self._require(model_id)
            if len(self._serving) == 1:
                raise ModelConflictError(
                    f"`{model_id}` is the only model served; add another before removing it.",
                    code="last_model",
                )
            del self._serving[model_id]
            old.withdrawn()
            self._retire(old)
            self.on_change()
            return old

    async def reconcile(self, configs: Iterable[ModelConfig]) -> Reconciled:
        """Make what is served match `configs` (a re-read config): add, reload what changed
        (a pricing change alone is applied in place), remove what is gone. A model that
        fails keeps what it served; the others still change."""
        done = Reconciled()
        wanted = {config.id: config for config in configs}
        for model_id, config in wanted.items():
            await self._reconcile_one(model_id, config, done)
        for model_id in [model_id for model_id in self.ids() if model_id not in wanted]:
            try:
                await self.remove(model_id)
                done.removed.append(model_id)
            except APIError as exc:
                done.failed[model_id] = exc.message
        return done

    async def _reconcile_one(self, model_id: str, config: ModelConfig, done: Reconciled) -> None:
        served = self._serving.get(model_id)
        try:
            if served is None:
                await self.add(config)
                done.added.append(model_id)
            elif msgspec.structs.replace(served.config, pricing=config.pricing) != config:
                await self.reload(model_id, config)
                done.reloaded.append(model_id)
            elif served.config != config:
                served.config = config
                done.repriced.append(model_id)
        except APIError as exc:
            log.error("model %s: %s", model_id, exc.message)  # noqa: TRY400 - the whole story
            done.failed[model_id] = exc.message

    # --- inside ------------------------------------------------------------------------

    def _require(self, model_id: str) -> ServedModel:
        served = self._serving.get(model_id)
        if served is None:
            raise ModelNotFoundError(model_id, self.ids())
        return served

    async def _load_beside(self, config: ModelConfig) -> ServedModel:
        try:
            served = self._build(config)
        except APIError:
            raise
        except PalisadeError as exc:  # an engine refusing its config (a missing key, ...)
            raise ModelLoadFailedError(f"The model `{config.id}` was not loaded: {exc}") from exc
        self._loading.append(served)
        loading = asyncio.ensure_future(asyncio.to_thread(self._verify_and_load, served))
        try:
            await asyncio.shield(loading)
        except BaseException:
            # A cancelled caller does not stop the thread: close what it loads once it ends.
            await asyncio.wait([loading])
            await _close(served)
            raise
        finally:
            self._loading.remove(served)
        return served

    def _verify_and_load(self, served: ServedModel) -> None:
        """In a thread: check the digest, then load the engine."""
        self._verify(served)
        try:
            served.config.preflight()  # what `check_models` checks before a start
            served.engine.load()
        except ModelLoadFailedError:
            raise
        except ModelLoadError as exc:
            raise ModelLoadFailedError(str(exc)) from exc
        except Exception as exc:  # an engine's bug: still a clean refusal, old version kept
            log.exception("loading model %s failed", served.id)
            raise ModelLoadFailedError(f"The model `{served.id}` was not loaded: {exc}") from exc

    def _verify(self, served: ServedModel) -> None:
        expected, path = served.config.sha256, served.path
        if path is None:
            if expected is not None:
                raise ModelLoadFailedError(
                    f"The model `{served.id}` sets sha256 but has no path to check it "
                    "against; remove `sha256`.",
                    param="sha256",
                )
            return
        if not path.exists():
            raise ModelLoadFailedError(
                f"The model `{served.id}` was not loaded: {path} does not exist. Install it "
                "(`palisade models pull`) or fix `path`.",
                param="path",
            )
        actual = self._digest(path)
        if expected is not None and actual != expected:
            raise ModelDigestMismatchError(served.id, str(path), expected, actual)
        served.verified(actual)

    def _started(self, served: ServedModel) -> None:
        served.serving()
        self.on_change()
        log.info("model %s serving version %s", served.id, served.version)

    def _retire(self, old: ServedModel) -> None:
        log.info(
            "model %s version %s draining (%d requests in flight)",
            old.id,
            old.version,
            old.in_flight,
        )
        old.state = "draining"
        self._draining.append(old)
        task = asyncio.create_task(self._drain(old), name=f"drain {old.id} {old.version}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, old: ServedModel) -> None:
        deadline = self._clock() + self._drain_timeout_s
        while old.in_flight > 0 and not self._closing and (left := deadline - self._clock()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await old.wait_idle()
        if old.in_flight > 0:
            log.warning(
                "model %s version %s closed with %d requests still in flight after %.0f s",
                old.id,
                old.version,
                old.in_flight,
                self._drain_timeout_s,
            )
        await _close(old)
        self._draining.remove(old)


async def _close(served: ServedModel) -> None:
    """Close an engine (loaded or not); a failing close is logged, never raised."""
    try:
        await asyncio.to_thread(served.engine.close)
    except Exception:
        log.exception("closing model %s version %s failed", served.id, served.version)
    served.state = "closed"
