"""`engine = "openai"`: forward to an OpenAI-compatible server someone else runs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated

from msgspec import Meta

from appliance._private.engines.config import ModelConfigBase
from appliance._private.errors import ModelLoadError
from federation import ConfigError

# The NAME of an environment variable (never the key itself: that stays out of config files).
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


class UpstreamModel(ModelConfigBase, tag="openai", forbid_unknown_fields=True, kw_only=True):
    """An OpenAI-compatible server (SambaNova Cloud, vLLM, llama-server) at `upstream_url`,
    with the API key read from the environment variable named by `upstream_key_env`."""

    upstream_url: Annotated[str, Meta(pattern=r"^https?://[^\s]+$")] | None = None
    upstream_model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    upstream_key_env: EnvName | None = None
    max_concurrency: Annotated[int, Meta(ge=1, le=100_000)] = 64
    upstream_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    embeddings: bool = True  # forward /v1/embeddings too

    def check(self, where: str, source: str) -> None:
        if self.upstream_url is None:
            raise ConfigError(
                f'{source}: `{where}.upstream_url` is required when engine = "openai"; set '
                'it to the upstream\'s base URL including /v1, e.g. "http://gpu-1:8000/v1".'
            )

    def preflight(self, environ: Mapping[str, str] | None = None) -> None:
        self.api_key(environ)

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The upstream API key from the environment variable named by `upstream_key_env`."""
        name = self.upstream_key_env
        if name is None:
            return None
        key = (os.environ if environ is None else environ).get(name, "")
        if not key:
            raise ModelLoadError(
                f"`{self.id}` reads its upstream API key from the environment variable {name} "
                "(upstream_key_env), but it is not set. Export it before starting the "
                "appliance, or remove upstream_key_env if the upstream needs no key."
            )
        return key
