"""Appliance configuration: a TOML file parsed into msgspec Structs, overridden by flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from federation import Pricing, convert_config, load_config

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PORT = 8400

Name = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
DeviceClass = Literal["cpu", "gpu", "rdu"]


class ModelConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """One model served by the appliance."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    path: str
    engine: Literal["llamacpp"] = "llamacpp"
    context_length: Annotated[int, Meta(ge=64, le=1_048_576)] = 2048
    device_class: DeviceClass = "cpu"
    pricing: Pricing = msgspec.field(default_factory=Pricing)
    max_queue: Annotated[int, Meta(ge=0, le=100_000)] = 64
    threads: Annotated[int, Meta(ge=1, le=512)] | None = None
    embeddings: bool = True


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

    def home(self) -> Path:
        """The state directory: `data_dir` from the file, else `$PALISADE_HOME`."""
        return Path(self.data_dir) if self.data_dir else palisade_home()

    def model_path(self, model: ModelConfig) -> Path:
        """A model's GGUF path; a relative path is taken from the state directory."""
        path = Path(model.path).expanduser()
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
    if not overrides:
        return config
    merged = msgspec.to_builtins(config) | {k: v for k, v in overrides.items() if v is not None}
    return convert_config(merged, ApplianceConfig, source=f"{source} with flags")
