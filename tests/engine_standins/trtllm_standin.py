"""A stand-in for `trtllm-serve`, with its command line:

    python -m tests.engine_standins.trtllm_standin ENGINE_DIR --tokenizer TOK --host H
        --port N --backend trt --max_batch_size B --max_num_tokens T --tp_size 1
        --kv_cache_free_gpu_memory_fraction F

ENGINE_DIR and TOK must be directories. It serves the engine directory's name, `/health`,
and Prometheus `trtllm_` series under `/prometheus/metrics` (as trtllm-serve does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aiohttp import web

from tests.engine_standins import run_engine, settings_from_environment
from tests.standin import Standin

_BACKENDS = ("pytorch", "tensorrt", "trt", "_autodeploy")
_STAMP = "[12/01/2026-00:00:00] [TRT-LLM]"


def parser() -> argparse.ArgumentParser:
    """trtllm-serve's options (click's, spelled with underscores); others are refused."""
    found = argparse.ArgumentParser(prog="trtllm-serve", allow_abbrev=False)
    found.add_argument("model")
    found.add_argument("--tokenizer", default=None)
    found.add_argument("--host", default="localhost")
    found.add_argument("--port", type=int, default=8000)
    found.add_argument("--backend", choices=_BACKENDS, default="pytorch")
    found.add_argument("--log_level", default="info")
    found.add_argument("--max_beam_width", type=int, default=1)
    found.add_argument("--max_batch_size", type=int, default=2048)
    found.add_argument("--max_num_tokens", type=int, default=8192)
    found.add_argument("--max_seq_len", type=int, default=None)
    found.add_argument("--tp_size", type=int, default=1)
    found.add_argument("--pp_size", type=int, default=1)
    found.add_argument("--ep_size", type=int, default=None)
    found.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=0.9)
    found.add_argument("--num_postprocess_workers", type=int, default=0)
    found.add_argument("--trust_remote_code", action="store_true")
    found.add_argument("--extra_llm_api_options", default=None)
    return found


def prometheus_routes(standin: Standin, app: web.Application) -> None:
    async def prometheus(request: web.Request) -> web.Response:
        del request
        return web.Response(text=standin.metrics_text("trtllm_"), content_type="text/plain")

    app.router.add_get("/prometheus/metrics", prometheus)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    for what, place in (("engine", args.model), ("tokenizer", args.tokenizer)):
        if place is not None and not Path(place).is_dir():
            sys.stderr.write(f"{_STAMP} [E] the {what} directory {place} does not exist\n")
            raise SystemExit(1)
    run_engine(
        args.host,
        args.port,
        settings_from_environment(Path(args.model).name),
        loading=[
            f"{_STAMP} [I] Starting TensorRT-LLM 0.0.0+standin (backend {args.backend})",
            f"{_STAMP} [I] engine={args.model} max_batch_size={args.max_batch_size} "
            f"max_num_tokens={args.max_num_tokens} tp_size={args.tp_size} "
            f"kv_cache_free_gpu_memory_fraction={args.kv_cache_free_gpu_memory_fraction}",
            f"{_STAMP} [W] this is a stand-in for trtllm-serve: no GPU, no engine",
        ],
        extend=prometheus_routes,
    )


if __name__ == "__main__":
    main()
