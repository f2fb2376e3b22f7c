"""A stand-in for vLLM's OpenAI server, with vLLM's own command lines:

    python -m tests.engine_standins.vllm_standin serve MODEL [--host H] [--port N] ...
    python -m tests.engine_standins.vllm_standin --model MODEL [...]   (the api_server form)

MODEL must be a directory (vLLM with HF_HUB_OFFLINE=1 reads a local model folder). It
serves MODEL's name (or `--served-model-name`), `/health`, and `/metrics` with `vllm:`
series; with `--api-key` or VLLM_API_KEY, `/v1` requests need that bearer key; on SIGTERM
it logs the EngineDeadError lines a real vLLM logs while stopping. With
PALISADE_STANDIN_ENGINE_CORE=1 it also starts a second process in its group, standing for
vLLM's engine core (and logs its pid).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tests.engine_standins import run_engine, settings_from_environment

_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_STAMP = "12-01 00:00:00"


def parser(*, subcommand: bool) -> argparse.ArgumentParser:
    """vLLM's flags that the appliance or an operator uses; others are refused."""
    found = argparse.ArgumentParser(
        prog="vllm serve" if subcommand else "api_server", allow_abbrev=False
    )
    if subcommand:
        found.add_argument("model")
    else:
        found.add_argument("--model", required=True)
    found.add_argument("--host", default=None)
    found.add_argument("--port", type=int, default=8000)
    found.add_argument("--served-model-name", nargs="+", default=None)
    found.add_argument("--dtype", choices=_DTYPES, default="auto")
    found.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    found.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    found.add_argument("--max-model-len", type=int, default=None)
    found.add_argument("--enforce-eager", action="store_true")
    found.add_argument("--max-num-seqs", type=int, default=None)
    found.add_argument("--trust-remote-code", action="store_true")
    found.add_argument("--disable-log-stats", action="store_true")
    found.add_argument("--enable-auto-tool-choice", action="store_true")
    found.add_argument("--tool-call-parser", default=None)
    found.add_argument("--seed", type=int, default=None)
    found.add_argument("--api-key", default=None)
    return found


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    subcommand = bool(args_in) and args_in[0] == "serve"
    args = parser(subcommand=subcommand).parse_args(args_in[1:] if subcommand else args_in)
    model = Path(args.model)
    if not model.is_dir():
        sys.stderr.write(
            f"ERROR {_STAMP} [standin] {model} is not a model directory (HF_HUB_OFFLINE=1)\n"
        )
        raise SystemExit(1)
    name = args.served_model_name[0] if args.served_model_name else str(model)
    core = engine_core() if os.environ.get("PALISADE_STANDIN_ENGINE_CORE") == "1" else None
    settings = settings_from_environment(name)
    # Like vLLM: with --api-key or VLLM_API_KEY, every /v1 request needs it as a bearer token.
    settings.api_key = args.api_key or os.environ.get("VLLM_API_KEY") or None
    run_engine(
        args.host or "0.0.0.0",  # noqa: S104 - vLLM's own default
        args.port,
        settings,
        loading=[
            f"INFO {_STAMP} [api_server.py:1] vLLM API server version 0.0.0+standin",
            f"INFO {_STAMP} [api_server.py:2] model={model} dtype={args.dtype} "
            f"tensor_parallel_size={args.tensor_parallel_size} "
            f"max_model_len={args.max_model_len} enforce_eager={args.enforce_eager}",
            f"WARNING {_STAMP} [standin] this is a stand-in for vLLM: no GPU, no weights",
            *([f"(EngineCore_DP0 pid={core.pid}) INFO {_STAMP} engine core up"] if core else []),
        ],
        stopped=[
            f"ERROR {_STAMP} [core_client.py:564] Engine core proc EngineCore_DP0 died "
            "unexpectedly, shutting down client.",
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
            "See stack trace (above) for the root cause.",
        ],
    )


def engine_core() -> subprocess.Popen[bytes]:
    """A second process in the server's process group, as vLLM's engine core is: it does
    not end when the server is killed, so whoever supervises the server must end it."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])


if __name__ == "__main__":
    main()
