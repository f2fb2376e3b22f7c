"""The keys every supervised engine has: how to run its server, and how to treat it."""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

from appliance._private.engines.config import ModelConfigBase
from appliance._private.engines.upstream.config import EnvName
from federation import ConfigError, DeviceClass

Argument = Annotated[str, Meta(min_length=1, max_length=4096)]


class SupervisedModel(ModelConfigBase, forbid_unknown_fields=True, kw_only=True):
    """A model served by a child process the appliance starts, watches and stops: the
    engine's OpenAI server, on a private 127.0.0.1 port. Subclasses set `tag=`, their
    `command` default and their own flags (`owned_flags`: what `extra_args` may not set)."""

    device_class: DeviceClass = "gpu"
    # What runs it, as reported in /v1/models, the heartbeat and X-Palisade-Device.
    accelerator: Annotated[str, Meta(min_length=1, max_length=64)] = "cuda"
    command: Annotated[list[Argument], Meta(min_length=1)]
    extra_args: list[Argument] = msgspec.field(default_factory=list)
    # Laid over the appliance's environment (and the engine's own defaults) for the child.
    env: dict[EnvName, Annotated[str, Meta(max_length=65_536)]] = msgspec.field(
        default_factory=dict
    )
    startup_timeout_s: Annotated[float, Meta(gt=0, le=86_400)] = 600.0
    # After SIGTERM, how long the engine may take to stop before its process group is killed.
    stop_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 30.0
    max_concurrency: Annotated[int, Meta(ge=1, le=100_000)] = 64
    # Longest silence from the engine while a request is in flight (time to first token
    # under load included) before the request fails with 504 upstream_timeout.
    request_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 300.0
    embeddings: bool = False  # true for an embedding model: forward /v1/embeddings

    # Flag -> the key that sets it (None: the appliance alone): `extra_args` may not repeat
    # what the appliance puts on the command line.
    owned_flags: ClassVar[dict[str, str | None]] = {}

    def check(self, where: str, source: str) -> None:
        self.requires_path(where, source, "the model the engine serves")
        for argument in self.extra_args:
            flag = argument.partition("=")[0]
            if flag not in self.owned_flags:
                continue
            key = self.owned_flags[flag]
            fix = (
                f"use `{where}.{key}` instead"
                if key
                else "remove it (the appliance chooses the engine's address, port and key)"
            )
            raise ConfigError(
                f"{source}: `{where}.extra_args` sets {flag}, which the appliance puts on "
                f"the engine's command line itself; {fix}."
            )
