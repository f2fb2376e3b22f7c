"""Runtime model changes, kept over restarts: `$PALISADE_HOME/models.overlay.json`.

The appliance TOML says which models a node serves; models added, reloaded with a new
config or removed through `/admin/v1/models` are recorded in this private file and
applied over the TOML's `[[models]]` at start and on SIGHUP:

    {"models": [{"engine": "llamacpp", "id": "m2", "path": "models/m2.gguf", ...}],
     "removed": ["old-model"]}

An overlay model replaces the TOML model with its id (in the same place) or is added
after them; a removed id is dropped from the TOML's models. The overlay wins until it
changes: a model removed at runtime stays removed even if the TOML still lists it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct

from appliance._private.config import with_engine_tags
from appliance._private.engines.registry import ModelConfig
from federation import ConfigError, convert_config, replace_private

OVERLAY_FILE = "models.overlay.json"


class _OverlayFile(Struct, forbid_unknown_fields=True):
    models: list[dict[str, Any]] = msgspec.field(default_factory=list)
    removed: list[str] = msgspec.field(default_factory=list)


def decode_model_config(data: object, source: str) -> ModelConfig:
    """One model config from parsed JSON or TOML (`engine` defaults to "llamacpp"), with
    its engine's own checks; raises `ConfigError` naming the key and the fix."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a model config is a JSON object (id, engine, path, ...).")
    model = dict(data)
    with_engine_tags({"models": [model]}, source)
    config: ModelConfig = convert_config(model, ModelConfig, source=source)
    config.check("model", source)
    return config


def model_builtins(config: ModelConfig) -> dict[str, Any]:
    """A config as plain JSON data, with its `engine` tag."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    return data


class ModelOverlay:
    """The overlay file of one state directory; read on each use, written atomically."""

    def __init__(self, home: Path) -> None:
        self.path = home / OVERLAY_FILE

    def apply(self, models: list[ModelConfig]) -> list[ModelConfig]:
        """`models` (from the TOML) with the overlay's changes."""
        overlay = self._read()
        added = {
            config.id: config
            for config in (
                decode_model_config(data, f"{self.path}: models[{index}]")
                for index, data in enumerate(overlay.models)
            )
        }
        removed = set(overlay.removed)
        result = [added.pop(model.id, model) for model in models if model.id not in removed]
        result += [config for config in added.values() if config.id not in removed]
        if not result:
            raise ConfigError(
                f"{self.path} removes every model of the config; delete the file or add a "
                "model to the config."
            )
        return result

    def put(self, config: ModelConfig) -> None:
        """Serve `config` (added, or reloaded with a new config) from now on."""
        overlay = self._read()
        models = [data for data in overlay.models if data.get("id") != config.id]
        removed = [model_id for model_id in overlay.removed if model_id != config.id]
        self._write(_OverlayFile([*models, model_builtins(config)], removed))

    def remove(self, model_id: str) -> None:
        """No longer serve `model_id`, whether the TOML or the overlay added it."""
        overlay = self._read()
        models = [data for data in overlay.models if data.get("id") != model_id]
        removed = sorted({*overlay.removed, model_id})
        self._write(_OverlayFile(models, removed))

    def _read(self) -> _OverlayFile:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _OverlayFile()
        try:
            return msgspec.json.decode(raw, type=_OverlayFile)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise ConfigError(
                f"{self.path} is not a model overlay ({exc}); fix or delete it (it holds the "
                "models added, reloaded or removed through /admin/v1/models)."
            ) from exc

    def _write(self, overlay: _OverlayFile) -> None:
        replace_private(self.path, msgspec.json.format(msgspec.json.encode(overlay)) + b"\n")
