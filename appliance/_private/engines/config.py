"""The keys every model has, whatever runs it; each engine's directory adds its own.

An appliance config's `[[models]]` entries decode as a tagged union on `engine` (see
`registry.model_config_type`): one Struct per engine, unknown keys refused per engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from federation import ConfigError, DeviceClass, Pricing

Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]


class ModelConfigBase(Struct, tag_field="engine", forbid_unknown_fields=True, kw_only=True):
    """One served model. Subclasses set `tag=` (the `engine` value) and add their keys."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    path: str | None = None
    context_length: Annotated[int, Meta(ge=64, le=1_048_576)] = 2048
    device_class: DeviceClass = "cpu"
    pricing: Pricing = msgspec.field(default_factory=Pricing)
    max_queue: Annotated[int, Meta(ge=0, le=100_000)] = 64
    # What is served: shown in /v1/models, the heartbeat and audit rows; `sha256` is also
    # checked against the file (or directory manifest) when the model loads.
    version: Version | None = None
    sha256: Sha256 | None = None

    @property
    def engine(self) -> str:
        """The `engine` tag of this config's class."""
        return str(type(self).__struct_config__.tag)

    def check(self, where: str, source: str) -> None:
        """Cross-key checks msgspec cannot express; raise `ConfigError` saying the fix."""
        del where, source

    def preflight(self, environ: Mapping[str, str] | None = None) -> None:
        """What must hold before the appliance binds its port (a secret in the
        environment); raise `ModelLoadError` saying the fix. Loading is the engine's."""
        del environ

    def requires_path(self, where: str, source: str, what: str) -> None:
        if self.path is None:
            raise ConfigError(
                f"{source}: missing required key `{where}.path` ({what}, required when "
                f'engine = "{self.engine}").'
            )
