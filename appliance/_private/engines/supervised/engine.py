"""`SupervisedEngine`: an engine whose server the appliance runs as a child process.

The child (vLLM, TensorRT-LLM) serves the OpenAI API on a private 127.0.0.1 port, kept
alive by an `EngineProcess`; the traffic goes through an `OpenAIUpstreamEngine` pointed at
that port, so forwarding, streaming, errors and admission are the upstream engine's, once.
While the child restarts the engine is not ready: new requests get 503 `model_not_ready`
with a Retry-After, and streams in flight end with an error frame (their connection
breaks). `metrics_text()` adds the child's own Prometheus series, labelled with the model.
"""

from __future__ import annotations

import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import httpx

from appliance._private.engines.base import (
    Capabilities,
    EngineContext,
    EngineLoad,
    Finish,
    Generation,
    Prompt,
    RequestFeatures,
    SamplingParams,
)
from appliance._private.engines.supervised.config import SupervisedModel
from appliance._private.engines.supervised.process import EngineProcess, secrets_of
from appliance._private.engines.upstream.config import UpstreamModel
from appliance._private.engines.upstream.engine import OpenAIUpstreamEngine
from appliance._private.errors import ModelLoadError, ModelNotReadyError
from federation import MetricRow

# What a supervised engine adds to the appliance's /metrics about its process (the metrics
# contract lists them with the appliance's own).
ENGINE_PROCESS_SERIES = (
    MetricRow(
        "palisade_engine_up",
        "gauge",
        ("model",),
        "1 while the engine process is running and healthy",
    ),
    MetricRow(
        "palisade_engine_restarts_total",
        "counter",
        ("model",),
        "Times the engine process was restarted",
    ),
    MetricRow(
        "palisade_engine_process_pid",
        "gauge",
        ("model",),
        "Process id of the running engine process",
    ),
)

_SCRAPE_TIMEOUT_S = 2.0
# A Prometheus sample: name, optional {labels}, then the value (and maybe a timestamp).
_SAMPLE = re.compile(
    r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?"
    r"(\s+[-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|Inf|inf|NaN|nan)(?:\s+-?[0-9]+)?)\s*$"
)
_MODEL_LABEL = re.compile(r"(^|,)\s*model=")
# Where the upstream engine finds the private key (its own environment, not the process's).
_KEY_VARIABLE = "PALISADE_ENGINE_API_KEY"


class SupervisedEngine(ABC):
    """The Engine protocol for a supervised child server; subclasses build its command."""

    # Where the child's Prometheus text is (None: it has none).
    metrics_path: ClassVar[str | None] = "/metrics"
    # Lines the child writes while stopping that are not failures (logged at INFO).
    shutdown_noise: ClassVar[re.Pattern[str] | None] = None
    # The environment variable by which the child requires an API key on /v1 (None: it
    # cannot). A fresh random key per engine keeps other local users off the private port.
    api_key_env: ClassVar[str | None] = None

    def __init__(self, config: SupervisedModel, context: EngineContext) -> None:
        path = context.path
        if path is None:
            raise ModelLoadError(f"`{config.id}` has engine = {config.engine!r} but no path.")
        self._config = config
        self._context = context
        self.workdir = context.home / "engines" / config.id
        self._key = secrets.token_urlsafe(32) if self.api_key_env else None
        self.process = EngineProcess(
            config.id,
            lambda port: self.command(path, port),
            env=self.environment(),
            secrets=(*secrets_of(config.env), *([self._key] if self._key else [])),
            headers={"Authorization": f"Bearer {self._key}"} if self._key else {},
            startup_timeout_s=config.startup_timeout_s,
            stop_timeout_s=config.stop_timeout_s,
            shutdown_noise=self.shutdown_noise,
        )
        upstream = UpstreamModel(
            id=config.id,
            context_length=config.context_length,
            max_queue=config.max_queue,
            device_class=config.device_class,
            upstream_url=f"{self.process.url}/v1",
            upstream_model=self.served_name,
            max_concurrency=config.max_concurrency,
            upstream_timeout_s=config.request_timeout_s,
            embeddings=config.embeddings,
            upstream_key_env=_KEY_VARIABLE if self._key else None,
        )
        keyed = {_KEY_VARIABLE: self._key} if self._key else {}
        self._upstream = OpenAIUpstreamEngine(upstream, replace(context, environ=keyed))

    # --- what subclasses say -------------------------------------------------------------

    @property
    def served_name(self) -> str:
        """The model name the child serves under (what requests to it name)."""
        return self._config.id

    @abstractmethod
    def command(self, path: Path, port: int) -> list[str]:
        """The child's command line, serving `path` on 127.0.0.1:`port`."""

    def engine_environment(self) -> dict[str, str]:
        """The engine's own defaults, under the config's `env`."""
        return {}

    def environment(self) -> dict[str, str]:
        """The child's environment: the appliance's, the engine's defaults, then `env`
        (and last the private API key, which nothing overrides)."""
        base: Mapping[str, str] = (
            os.environ if self._context.environ is None else self._context.environ
        )
        defaults = {"PYTHONUNBUFFERED": "1"} | self.engine_environment()
        key = {self.api_key_env: self._key} if self.api_key_env and self._key else {}
        return dict(base) | defaults | self._config.env | key

    # --- the Engine protocol -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.process.ready and self._upstream.ready

    @property
    def context_length(self) -> int:
        return self._config.context_length

    @property
    def capabilities(self) -> Capabilities:
        return replace(self._upstream.capabilities, accelerator=self._config.accelerator)

    def load(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process.start()
        try:
            self._upstream.load()
        except ModelLoadError:
            self.process.close()
            raise

    def close(self) -> None:
        self._upstream.close()
        self.process.close()

    async def prepare_chat(
        self, messages: list[dict[str, Any]], features: RequestFeatures | None = None
    ) -> Prompt:
        return await self._upstream.prepare_chat(messages, features)

    async def prepare_text(self, source: str | list[int], param: str = "prompt") -> Prompt:
        return await self._upstream.prepare_text(source, param)

    def detokenize(self, tokens: list[int], param: str = "input") -> str:
        return self._upstream.detokenize(tokens, param)

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        on_done: Callable[[Finish], None] | None = None,
    ) -> Generation:
        self._check_running()
        return self._upstream.submit(prompt, params, on_done)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        self._check_running()
        return await self._upstream.embed(texts)

    def load_now(self) -> EngineLoad:
        return self._upstream.load_now()

    def metrics_text(self) -> str | None:
        """This engine's process series and the child's own (scraped now, labelled
        model="<id>"). Scraping is a loopback GET that blocks for milliseconds, at most
        `_SCRAPE_TIMEOUT_S` when the child hangs: call it from a thread."""
        if not self.process.ready:
            return self._process_series()  # a dead child's gauges would mislead
        return self._process_series() + self._scrape()

    def _check_running(self) -> None:
        if not self.process.ready:
            raise ModelNotReadyError(
                f"The engine serving `{self._config.id}` is restarting; retry shortly.",
                retry_after=self.process.retry_after(),
            )

    # --- metrics ---------------------------------------------------------------------------

    def _process_series(self) -> str:
        label = f'{{model="{_label_value(self._config.id)}"}}'
        pid = self.process.pid if self.process.ready else None
        values = (int(self.process.ready), self.process.restarts, pid or 0)
        lines = []
        for row, value in zip(ENGINE_PROCESS_SERIES, values, strict=True):
            lines += [f"# HELP {row.name} {row.help}", f"# TYPE {row.name} {row.type}"]
            lines.append(f"{row.name}{label} {value}")
        return "\n".join(lines) + "\n"

    def _scrape(self) -> str:
        """The child's Prometheus text, relabelled; empty when it has none or fails."""
        if self.metrics_path is None:
            return ""
        url = self.process.url + self.metrics_path
        try:
            reply = httpx.get(url, headers=self.process.headers, timeout=_SCRAPE_TIMEOUT_S)
        except httpx.HTTPError:
            return ""  # restarting, or hung: its series are left out of this scrape
        if reply.status_code != 200 or "json" in reply.headers.get("content-type", ""):
            return ""
        return relabel(reply.text, self._config.id)


def relabel(text: str, model: str) -> str:
    """Prometheus text with `model="<model>"` added to every sample (a `model` label the
    engine had itself becomes `engine_model`)."""
    value = f'model="{_label_value(model)}"'
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            if line.startswith(("# HELP", "# TYPE")):
                out.append(line)
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue  # not a sample: leave it out rather than break the exposition
        name, labels, rest = match[1], match[2], match[3]
        labels = _MODEL_LABEL.sub(r"\1engine_model=", labels) if labels else ""
        out.append(f"{name}{{{labels + ',' if labels else ''}{value}}}{rest}")
    return "\n".join(out) + "\n" if out else ""


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
