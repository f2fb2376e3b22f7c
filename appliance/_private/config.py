"""Appliance configuration: a TOML file parsed into msgspec Structs, overridden by flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from federation import (
    ConfigError,
    DiscoveryConfig,
    Pricing,
    ServerConfig,
    convert_config,
    load_config,
)

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PORT = 8400

Name = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
DeviceClass = Literal["cpu", "gpu", "rdu"]
KvCacheType = Literal["q8_0", "f16"]
# With f16 keys and values llama.cpp's CPU attention changes kernels at 64 queries of a stream.
F16_MAX_PREFILL_CHUNK = 63
# The NAME of an environment variable (never the key itself: that stays out of config files).
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
_UPSTREAM_KEYS = ("upstream_url", "upstream_model", "upstream_key_env")


class ModelConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """One model served by the appliance.

    `engine = "llamacpp"` runs the GGUF at `path` in-process. `engine = "openai"` forwards
    to an OpenAI-compatible server (SambaNova Cloud, vLLM, llama-server) at `upstream_url`,
    with the API key read from the environment variable named by `upstream_key_env`.
    """

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    path: str | None = None
    engine: Literal["llamacpp", "openai"] = "llamacpp"
    context_length: Annotated[int, Meta(ge=64, le=1_048_576)] = 2048
    device_class: DeviceClass = "cpu"
    pricing: Pricing = msgspec.field(default_factory=Pricing)
    max_queue: Annotated[int, Meta(ge=0, le=100_000)] = 64
    threads: Annotated[int, Meta(ge=1, le=512)] | None = None
    embeddings: bool = True
    upstream_url: Annotated[str, Meta(pattern=r"^https?://[^\s]+$")] | None = None
    upstream_model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    upstream_key_env: EnvName | None = None
    max_concurrency: Annotated[int, Meta(ge=1, le=100_000)] = 64
    upstream_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    # Continuous batching (llamacpp): sequences decoded together in one llama.cpp batch,
    # the KV cache they share (default: context_length for each) and the element types of
    # its keys and values, the tokens one step may decode, and the most prompt tokens one
    # sequence reads per step.
    max_sequences: Annotated[int, Meta(ge=1, le=256)] = 16
    kv_cache_tokens: Annotated[int, Meta(ge=64, le=16_777_216)] | None = None
    cache_type_k: KvCacheType = "q8_0"
    cache_type_v: KvCacheType = "f16"
    step_tokens: Annotated[int, Meta(ge=16, le=65_536)] = 256
    prefill_chunk: Annotated[int, Meta(ge=1, le=8192)] = 32

    def kv_tokens(self) -> int:
        return self.kv_cache_tokens or self.context_length * self.max_sequences

    @property
    def all_f16_cache(self) -> bool:
        return self.cache_type_k == self.cache_type_v == "f16"


class FleetConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The offline edge of an enrolled node (`[fleet]`)."""

    # How long after losing its router the node keeps serving fleet keys on its last policy
    # snapshot and budget share; beyond it they get 503 `policy_expired`.
    offline_grace_s: Annotated[float, Meta(gt=0, le=90 * 86400)] = 24 * 3600.0


class ApplianceConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole appliance: identity, listen address, state and models."""

    node_id: Name = "appliance-local"
    region: Name = "local"
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = DEFAULT_PORT
    data_dir: str | None = None
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024
    # Node-wide logging floor: it can only make an org stricter (`metadata` = no content kept).
    logging_floor: Literal["full", "metadata", "zero"] = "full"
    content_retention_days: Annotated[int, Meta(ge=1, le=3650)] = 30
    models: Annotated[list[ModelConfig], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [default_model_config()]
    )
    # Fleet membership: the router's fleet URL (an enrolled node defaults to the one in its
    # node.toml and talks mTLS), and the URL the router should use to reach this node.
    router_url: Annotated[str, Meta(pattern=r"^https?://")] | None = None
    advertise_url: Annotated[str, Meta(pattern=r"^https?://")] | None = None
    # A standalone appliance serves HTTPS with this certificate and key (PEM files) when both
    # are set; an enrolled node always serves HTTPS with its node certificate.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Limits on each client connection: read timeouts, keep-alive, how many at once.
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    # zeroconf: announce this process on the listed interfaces and browse for its fleet.
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    fleet: FleetConfig = msgspec.field(default_factory=FleetConfig)

    def home(self) -> Path:
        """The state directory: `data_dir` from the file, else `$PALISADE_HOME`."""
        return Path(self.data_dir) if self.data_dir else palisade_home()

    def model_path(self, model: ModelConfig) -> Path:
        """A model's GGUF path; a relative path is taken from the state directory.

        An upstream model (`engine = "openai"`) has no file: its path is the state directory.
        """
        path = Path(model.path or "").expanduser()
        return path if path.is_absolute() else self.home() / path


def palisade_home() -> Path:
    """`$PALISADE_HOME`, defaulting to `./var` (the checkout's state directory)."""
    return Path(os.environ.get("PALISADE_HOME", "var")).resolve()


def default_model_config() -> ModelConfig:
    return ModelConfig(id=DEFAULT_MODEL_ID, path=f"models/{DEFAULT_MODEL_FILE}")


def load_appliance_config(
    path: Path | None, overrides: dict[str, Any] | None = None
) -> ApplianceConfig:
    """Read `path` (or the defaults), then apply flag overrides such as host and port."""
    if path is None:
        config = ApplianceConfig()
        source = "defaults"
    else:
        config = load_config(path, ApplianceConfig)
        source = str(path)
    check_engines(config, source)
    if not overrides:
        return config
    merged = msgspec.to_builtins(config) | {k: v for k, v in overrides.items() if v is not None}
    return convert_config(merged, ApplianceConfig, source=f"{source} with flags")


def check_engines(config: ApplianceConfig, source: str) -> None:
    """The keys each engine needs: `path` for llamacpp, `upstream_url` for openai."""
    for index, model in enumerate(config.models):
        where = f"models[{index}]"
        if model.engine == "llamacpp":
            if model.path is None:
                raise ConfigError(
                    f"{source}: missing required key `{where}.path` (the GGUF file, required "
                    'when engine = "llamacpp"); or set engine = "openai" and upstream_url to '
                    "forward to an OpenAI-compatible server."
                )
            for key in _UPSTREAM_KEYS:
                if getattr(model, key) is not None:
                    raise ConfigError(
                        f'{source}: `{where}.{key}` is set but engine = "llamacpp"; add '
                        f'engine = "openai" to `{where}` to forward to an upstream, or remove '
                        f"`{key}`."
                    )
            each = model.kv_tokens() // model.max_sequences
            if each < model.context_length:
                raise ConfigError(
                    f"{source}: `{where}.kv_cache_tokens` = {model.kv_tokens()} gives each of "
                    f"its {model.max_sequences} sequences {each} KV cells, fewer than "
                    f"context_length = {model.context_length}; raise kv_cache_tokens, or lower "
                    "max_sequences or context_length."
                )
            if model.all_f16_cache and model.prefill_chunk > F16_MAX_PREFILL_CHUNK:
                raise ConfigError(
                    f"{source}: `{where}.prefill_chunk` = {model.prefill_chunk} is too large "
                    'for cache_type_k = cache_type_v = "f16": llama.cpp computes 64 or more '
                    "prompt tokens of one sequence with another kernel, and answers would "
                    "depend on what else runs. Set prefill_chunk to at most "
                    f'{F16_MAX_PREFILL_CHUNK}, or cache_type_k = "q8_0".'
                )
        elif model.upstream_url is None:
            raise ConfigError(
                f'{source}: `{where}.upstream_url` is required when engine = "openai"; set '
                'it to the upstream\'s base URL including /v1, e.g. "http://gpu-1:8000/v1".'
            )
