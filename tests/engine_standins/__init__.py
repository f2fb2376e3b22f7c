"""Stand-ins for GPU engine servers that cannot run here (vLLM, trtllm-serve): real
executables that take the real command-line flags (refusing unknown ones, as the real ones
do) and serve the real OpenAI protocol over HTTP with `tests.standin`'s server, plus the
engine's `/health` and Prometheus metrics.

What a stand-in does beyond its flags comes from the environment (the flags must stay the
real ones): `PALISADE_STANDIN_LOAD_S` (seconds "loading weights" before it listens),
`PALISADE_STANDIN_TOKENS`, `PALISADE_STANDIN_TOKEN_MS`, `PALISADE_STANDIN_TTFT_MS`, and for
the vLLM stand-in `PALISADE_STANDIN_ENGINE_CORE=1` (a second process in its group).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from tests.standin import Settings, Standin, serve


def settings_from_environment(model: str) -> Settings:
    environ = os.environ
    return Settings(
        model=model,
        tokens=int(environ.get("PALISADE_STANDIN_TOKENS", "8")),
        token_ms=float(environ.get("PALISADE_STANDIN_TOKEN_MS", "0")),
        ttft_ms=float(environ.get("PALISADE_STANDIN_TTFT_MS", "0")),
    )


def say(*lines: str) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_engine(
    host: str,
    port: int,
    settings: Settings,
    *,
    loading: Sequence[str] = (),
    stopped: Sequence[str] = (),
    extend: Callable[[Standin, web.Application], None] | None = None,
) -> None:
    """Print the `loading` lines, take PALISADE_STANDIN_LOAD_S seconds, serve until SIGTERM,
    then print the `stopped` lines (what the real engine says on its way out)."""
    say(*loading)
    time.sleep(float(os.environ.get("PALISADE_STANDIN_LOAD_S", "0")))
    asyncio.run(serve(host, port, settings, extend=extend))
    say(*stopped)
