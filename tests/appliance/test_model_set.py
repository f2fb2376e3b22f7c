"""ModelSet without sockets: load beside, swap when ready, drain, failed loads, removal,
digests and versions, reconcile (SIGHUP), and the model overlay file.

The engines are real (the scripted engine; llama.cpp refusing a file that is not a GGUF);
the clock of the drain deadline is injected.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

from appliance._private.digest import model_digest
from appliance._private.engines.llamacpp.config import LlamaCppModel
from appliance._private.engines.registry import ModelConfig
from appliance._private.engines.scripted.config import ScriptedModel
from appliance._private.engines.upstream.config import UpstreamModel
from appliance._private.errors import (
    ModelConflictError,
    ModelDigestMismatchError,
    ModelLoadFailedError,
    ModelNotFoundError,
)
from appliance._private.metrics import ApplianceMetrics
from appliance._private.model_overlay import ModelOverlay, decode_model_config
from appliance._private.model_set import ModelSet
from appliance._private.served import ServedModel
from federation import ConfigError, Pricing

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(test())  # type: ignore[arg-type]


def weights(tmp_path: Path, name: str, content: bytes = b"GGUF weights v1") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def scripted(model_id: str, path: Path | None = None, **keys: object) -> ModelConfig:
    return ScriptedModel(id=model_id, path=None if path is None else str(path), **keys)  # type: ignore[arg-type]


def model_set(
    tmp_path: Path, *configs: ModelConfig, clock: Clock | None = None, **options: object
) -> tuple[ModelSet, ApplianceMetrics]:
    metrics = ApplianceMetrics(node_id="n1", region="r1", version="t")

    def build(config: ModelConfig) -> ServedModel:
        path = None if config.path is None else Path(config.path)
        return ServedModel(config, tmp_path, path, metrics)

    return ModelSet(configs, build, clock=clock or Clock(), **options), metrics  # type: ignore[arg-type]


async def drained(models: ModelSet) -> None:
    async with asyncio.timeout(10):
        await models.drained()


def state(served: ServedModel) -> str:
    """Its state now (a call, so that the checker does not carry one narrowing forward)."""
    return served.state


def ready_gauge(metrics: ApplianceMetrics, model: str) -> float:
    value = metrics.registry.get_sample_value("palisade_model_ready", {"model": model})
    return -1.0 if value is None else value


def test_load_all_checks_digests_and_derives_versions(tmp_path: Path) -> None:
    chat = weights(tmp_path, "chat.gguf")
    digest = hashlib.sha256(chat.read_bytes()).hexdigest()
    models, metrics = model_set(
        tmp_path,
        scripted("chat", chat, sha256=digest),
        scripted("named", chat, version="2024-06"),
        scripted("remote"),
    )

    async def scenario() -> None:
        assert [served.state for served in models.all()] == ["loading"] * 3
        assert not models.ready
        await models.load_all()
        assert models.ready
        assert models.ids() == ["chat", "named", "remote"]
        chat_model, named, remote = models.all()
        assert (chat_model.sha256, chat_model.version) == (digest, digest[:12])
        assert (named.sha256, named.version) == (digest, "2024-06")
        assert (remote.sha256, remote.version) == (None, None)  # nothing to digest
        card = chat_model.card("r1")
        assert (card.engine, card.version, card.sha256) == ("scripted", digest[:12], digest)
        assert ready_gauge(metrics, "chat") == 1.0
        await models.close_all()
        assert [served.state for served in models.all()] == ["closed"] * 3

    run(scenario)


def test_startup_digest_mismatch_is_refused(tmp_path: Path) -> None:
    chat = weights(tmp_path, "chat.gguf")
    models, _ = model_set(tmp_path, scripted("chat", chat, sha256="0" * 64))
    with pytest.raises(ModelDigestMismatchError) as caught:
        run(models.load_all)
    assert caught.value.code == "model_digest_mismatch"
    assert caught.value.status_code == 422
    assert "0" * 64 in caught.value.message
    assert hashlib.sha256(chat.read_bytes()).hexdigest() in caught.value.message
    assert not models.ready


def test_reload_loads_beside_then_swaps_and_drains(tmp_path: Path) -> None:
    v1, v2 = weights(tmp_path, "v1.gguf"), weights(tmp_path, "v2.gguf", b"GGUF weights v2")
    loading = threading.Event()
    proceed = threading.Event()

    def slow_digest(path: Path) -> str:
        if path == v2:  # the new version's load waits here, in its thread
            loading.set()
            proceed.wait(10)
        return model_digest(path)

    models, _ = model_set(tmp_path, scripted("chat", v1), digest=slow_digest)

    async def scenario() -> None:
        await models.load_all()
        old = models.get("chat")
        assert old is not None
        old.acquire()  # a request in flight on v1
        reload = asyncio.create_task(models.reload("chat", scripted("chat", v2)))
        await asyncio.to_thread(loading.wait, 10)
        # Loading beside: v1 still takes new requests, v2 is listed as loading.
        assert models.get("chat") is old
        assert [(s.version, s.state) for s in models.entries()] == [
            (old.version, "serving"),
            (None, "loading"),
        ]
        proceed.set()
        new = await reload
        assert models.get("chat") is new
        assert new.version == model_digest(v2)[:12] != old.version
        assert state(new) == "serving"
        assert state(old) == "draining"
        assert old.engine.ready  # its request may still use it
        await asyncio.sleep(0.05)
        assert state(old) == "draining"
        old.release()  # the request ends: the old version closes
        await drained(models)
        assert state(old) == "closed"
        assert not old.engine.ready
        assert models.entries() == [new]
        await models.close_all()

    run(scenario)


def test_a_cancelled_reload_closes_what_it_loaded(tmp_path: Path) -> None:
    v2 = weights(tmp_path, "v2.gguf")
    loading, proceed = threading.Event(), threading.Event()

    def slow_digest(path: Path) -> str:
        loading.set()
        proceed.wait(10)
        return model_digest(path)

    models, _ = model_set(tmp_path, scripted("chat"), digest=slow_digest)

    async def scenario() -> None:
        await models.load_all()
        old = models.get("chat")
        reload = asyncio.create_task(models.reload("chat", scripted("chat", v2)))
        await asyncio.to_thread(loading.wait, 10)
        (beside,) = [served for served in models.entries() if served is not old]
        reload.cancel()
        await asyncio.sleep(0.05)
        assert state(beside) == "loading"  # its thread still runs
        proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await reload
        assert state(beside) == "closed"
        assert not beside.engine.ready
        assert models.get("chat") is old
        assert models.entries() == [old]
        await models.close_all()

    run(scenario)


def test_a_failed_reload_keeps_the_old_version_serving(tmp_path: Path) -> None:
    v1 = weights(tmp_path, "v1.gguf")
    models, _ = model_set(tmp_path, scripted("chat", v1))

    async def scenario() -> None:
        await models.load_all()
        old = models.get("chat")
        assert old is not None
        with pytest.raises(ModelDigestMismatchError) as mismatch:
            await models.reload("chat", scripted("chat", v1, sha256="a" * 64))
        assert (mismatch.value.code, mismatch.value.param) == ("model_digest_mismatch", "sha256")
        missing = tmp_path / "missing.gguf"
        with pytest.raises(ModelLoadFailedError) as failed:
            await models.reload("chat", scripted("chat", missing))
        assert (failed.value.code, failed.value.param) == ("model_load_failed", "path")
        assert str(missing) in failed.value.message
        keyless = UpstreamModel(
            id="up", upstream_url="http://127.0.0.1:9/v1", upstream_key_env="PALISADE_NO_SUCH_KEY"
        )
        with pytest.raises(ModelLoadFailedError, match="PALISADE_NO_SUCH_KEY"):
            await models.add(keyless)  # checked as at start, before any connection
        assert models.get("chat") is old
        assert state(old) == "serving"
        assert old.engine.ready
        assert models.entries() == [old]  # nothing left loading or draining
        await models.close_all()

    run(scenario)


def test_an_engine_that_refuses_the_file_fails_the_reload_cleanly(tmp_path: Path) -> None:
    corrupt = weights(tmp_path, "corrupt.gguf", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    models, _ = model_set(tmp_path, scripted("chat"))

    async def scenario() -> None:
        await models.load_all()
        old = models.get("chat")
        with pytest.raises(ModelLoadFailedError) as failed:
            await models.reload("chat", LlamaCppModel(id="chat", path=str(corrupt)))
        assert failed.value.code == "model_load_failed"
        assert failed.value.status_code == 422
        assert models.get("chat") is old
        assert models.entries() == [old]
        await models.close_all()

    run(scenario)


def test_add_and_remove_at_runtime(tmp_path: Path) -> None:
    models, metrics = model_set(tmp_path, scripted("chat"))

    async def scenario() -> None:
        await models.load_all()
        changes: list[list[str]] = []
        models.on_change = lambda: changes.append(models.ids())
        second = await models.add(scripted("second"))
        assert models.ids() == ["chat", "second"]
        assert state(second) == "serving"
        assert second.engine.ready
        with pytest.raises(ModelConflictError) as exists:
            await models.add(scripted("second"))
        assert (exists.value.code, exists.value.status_code) == ("model_exists", 409)

        second.acquire()
        removed = await models.remove("second")
        assert removed is second
        assert models.ids() == ["chat"]
        assert models.get("second") is None
        assert ready_gauge(metrics, "second") == 0.0
        assert state(second) == "draining"
        second.release()
        await drained(models)
        assert state(second) == "closed"
        assert changes == [["chat", "second"], ["chat"]]

        with pytest.raises(ModelNotFoundError):
            await models.remove("second")
        with pytest.raises(ModelConflictError) as last:
            await models.remove("chat")
        assert last.value.code == "last_model"
        assert models.ids() == ["chat"]
        await models.close_all()

    run(scenario)


def test_a_drain_that_outlasts_its_deadline_closes_anyway(tmp_path: Path) -> None:
    clock = Clock()
    models, _ = model_set(tmp_path, scripted("chat"), clock=clock, drain_timeout_s=30.0)

    async def scenario() -> None:
        await models.load_all()
        old = models.get("chat")
        assert old is not None
        old.acquire()  # a request that never ends
        await models.reload("chat")
        await asyncio.sleep(0.05)
        assert state(old) == "draining"
        clock.now += 31.0  # past the deadline: the next check gives up waiting
        await drained(models)
        assert state(old) == "closed"
        assert old.in_flight == 1
        await models.close_all()

    run(scenario)


def test_close_all_does_not_wait_for_draining_requests(tmp_path: Path) -> None:
    models, _ = model_set(tmp_path, scripted("chat"))

    async def scenario() -> None:
        await models.load_all()
        old = models.get("chat")
        assert old is not None
        old.acquire()
        new = await models.reload("chat")
        async with asyncio.timeout(5):
            await models.close_all()
        assert (old.state, new.state) == ("closed", "closed")

    run(scenario)


def test_reconcile_adds_reloads_reprices_and_removes(tmp_path: Path) -> None:
    models, _ = model_set(
        tmp_path, scripted("same"), scripted("changed"), scripted("priced"), scripted("gone")
    )

    async def scenario() -> None:
        await models.load_all()
        before = {served.id: served for served in models.all()}
        wanted = [
            scripted("same"),
            scripted("changed", replies=["new reply"]),
            scripted("priced", pricing=Pricing(input_per_million=2.0)),
            scripted("fresh"),
            scripted("broken", tmp_path / "missing.gguf"),
        ]
        done = await models.reconcile(wanted)
        assert (done.added, done.reloaded, done.repriced, done.removed) == (
            ["fresh"],
            ["changed"],
            ["priced"],
            ["gone"],
        )
        assert list(done.failed) == ["broken"]
        assert "does not exist" in done.failed["broken"]
        assert models.ids() == ["same", "changed", "priced", "fresh"]
        assert models.get("same") is before["same"]
        assert models.get("priced") is before["priced"]  # repriced in place, not reloaded
        priced = models.get("priced")
        assert priced is not None
        assert priced.config.pricing.input_per_million == 2.0
        assert models.get("changed") is not before["changed"]
        again = await models.reconcile(wanted[:4])
        assert (again.added, again.reloaded, again.repriced, again.removed) == ([], [], [], [])
        await models.close_all()

    run(scenario)


def test_directory_digest_is_the_sorted_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_bytes(b"{}")
    (folder / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    lines = "".join(
        f"{name}\0{hashlib.sha256(content).hexdigest()}\n"
        for name, content in sorted([("config.json", b"{}"), ("sub/weights.bin", b"\x00" * 10)])
    )
    assert model_digest(folder) == hashlib.sha256(lines.encode()).hexdigest()
    before = model_digest(folder / "config.json")
    (folder / "config.json").write_bytes(b"{ }")  # a rewrite is seen despite the cache
    assert model_digest(folder / "config.json") != before


def test_overlay_applies_over_the_config_and_survives_rewrites(tmp_path: Path) -> None:
    overlay = ModelOverlay(tmp_path)
    toml = [scripted("a"), scripted("b"), scripted("c")]
    assert overlay.apply(toml) == toml  # no file yet
    overlay.put(scripted("b", replies=["b2"]))
    overlay.put(scripted("d"))
    overlay.remove("c")
    assert stat.S_IMODE(overlay.path.stat().st_mode) == 0o600
    assert overlay.apply(toml) == [scripted("a"), scripted("b", replies=["b2"]), scripted("d")]
    overlay.put(scripted("c", replies=["back"]))  # added again: no longer removed
    overlay.remove("d")
    applied = overlay.apply(toml)
    assert [config.id for config in applied] == ["a", "b", "c"]
    assert applied[2] == scripted("c", replies=["back"])
    stored = json.loads(overlay.path.read_text())
    assert stored["removed"] == ["d"]
    assert [model["engine"] for model in stored["models"]] == ["scripted", "scripted"]


def test_overlay_refusals(tmp_path: Path) -> None:
    overlay = ModelOverlay(tmp_path)
    overlay.remove("a")
    with pytest.raises(ConfigError, match="removes every model"):
        overlay.apply([scripted("a")])
    overlay.path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not a model overlay"):
        overlay.apply([scripted("a")])


def test_decode_model_config_defaults_the_engine_and_names_bad_keys() -> None:
    config = decode_model_config({"id": "m", "path": "models/m.gguf"}, "request body")
    assert isinstance(config, LlamaCppModel)
    assert msgspec.to_builtins(config)["engine"] == "llamacpp"
    with pytest.raises(ConfigError, match="unknown key `colour`"):
        decode_model_config({"id": "m", "engine": "scripted", "colour": 1}, "request body")
    with pytest.raises(ConfigError, match="is not an engine"):
        decode_model_config({"id": "m", "engine": "nope"}, "request body")
    with pytest.raises(ConfigError, match="a JSON object"):
        decode_model_config(["m"], "request body")
