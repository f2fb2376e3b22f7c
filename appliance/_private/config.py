"""Appliance configuration: a TOML file parsed into msgspec Structs, overridden by flags.

Each `[[models]]` entry is one engine's config (`engines/registry.py`), chosen by `engine`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from appliance._private.engines.registry import ENGINES, ModelConfig
from federation import (
    ConfigError,
    DiscoveryConfig,
    LoggingMode,
    LogsConfig,
    ServerConfig,
    TracesConfig,
    convert_config,
    read_toml,
)

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PORT = 8400

Name = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
_DEFAULT_ENGINE = "llamacpp"  # a `[[models]]` entry without `engine` (configs before engines)


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
    # The policy store of a standalone appliance: a SQLite path (default policy.db under
    # its home) or a postgresql:// URL.
    database: str | None = None
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024
    # Node-wide logging floor: it can only make an org stricter (`metadata` = no content kept).
    logging_floor: LoggingMode = "full"
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
    # Log lines: text, or JSON objects one per line (`--log-format`); access lines.
    logs: LogsConfig = msgspec.field(default_factory=LogsConfig)
    # OpenTelemetry traces over OTLP/HTTP (`--otlp-endpoint`): off unless an endpoint is set.
    traces: TracesConfig = msgspec.field(default_factory=TracesConfig)

    def home(self) -> Path:
        """The state directory: `data_dir` from the file, else `$PALISADE_HOME`."""
        return Path(self.data_dir) if self.data_dir else palisade_home()

    def model_path(self, model: ModelConfig) -> Path | None:
        """A model's file or directory; a relative path is taken from the state directory.
        None for a model without one (an upstream)."""
        if model.path is None:
            return None
        path = Path(model.path).expanduser()
        return path if path.is_absolute() else self.home() / path


def palisade_home() -> Path:
    """`$PALISADE_HOME`, defaulting to `./var` (the checkout's state directory)."""
    return Path(os.environ.get("PALISADE_HOME", "var")).resolve()


def default_model_config() -> ModelConfig:
    default = ENGINES[_DEFAULT_ENGINE].config
    return default(id=DEFAULT_MODEL_ID, path=f"models/{DEFAULT_MODEL_FILE}")


def load_appliance_config(
    path: Path | None, overrides: dict[str, Any] | None = None
) -> ApplianceConfig:
    """Read `path` (or the defaults), then apply flag overrides such as host and port."""
    if path is None:
        data: dict[str, Any] = {}
        source = "defaults"
    else:
        data = read_toml(path)
        source = str(path)
    with_engine_tags(data, source)
    config = convert_config(data, ApplianceConfig, source=source)
    check_engines(config, source)
    if not overrides:
        return config
    merged = msgspec.to_builtins(config) | {k: v for k, v in overrides.items() if v is not None}
    return convert_config(merged, ApplianceConfig, source=f"{source} with flags")


def with_engine_tags(data: dict[str, Any], source: str) -> None:
    """Give `[[models]]` entries without `engine` the default, and name the engine a key
    belongs to when it is set on another engine's model (instead of "unknown key")."""
    models = data.get("models")
    if not isinstance(models, list):
        return
    for index, model in enumerate(models):
        if not isinstance(model, dict):
            continue
        engine = model.setdefault("engine", _DEFAULT_ENGINE)
        entry = ENGINES.get(engine) if isinstance(engine, str) else None
        if entry is None:
            raise ConfigError(
                f"{source}: `models[{index}].engine` = {engine!r} is not an engine of this "
                f"appliance; use one of {', '.join(sorted(ENGINES))}."
            )
        own = set(entry.config.__struct_fields__)
        for key in model:
            owners = sorted(
                tag for tag, other in ENGINES.items() if key in other.config.__struct_fields__
            )
            if key != "engine" and key not in own and owners:
                raise ConfigError(
                    f'{source}: `models[{index}].{key}` is set but engine = "{engine}"; it is '
                    f"a key of engine = {' or '.join(map(repr, owners))}. Set that engine in "
                    f"`models[{index}]`, or remove `{key}`."
                )


def check_engines(config: ApplianceConfig, source: str) -> None:
    """Each model's own cross-key checks, and model ids unique."""
    seen: set[str] = set()
    for index, model in enumerate(config.models):
        where = f"models[{index}]"
        model.check(where, source)
        if model.id in seen:
            raise ConfigError(f"{source}: `{where}.id` = {model.id!r} is used by two models.")
        seen.add(model.id)
