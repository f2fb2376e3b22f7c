"""Run the benchmarks: `python -m tests.bench [--only engine|audit|router|chain|batching|
multiturn|guidellm] [options]`.

Before/after a restructure: `python -m tests.bench --only batching --baseline REV --targets
appliance,baseline --streams 1,16` measures the checkout's appliance and REV's in the same
interleaved rounds and prints the ratios.

Without --only, the engine benchmark runs first, then the audit-log benchmark, then the
router overhead benchmark (which installs the LiteLLM proxy into var/bench/litellm-venv
for its side-by-side columns, unless --no-litellm), then the chain benchmark (client ->
router -> appliance -> stand-in, beside LiteLLM), then the batching benchmark (which
builds llama.cpp's llama-server into var/bench/llama-server and installs llama-cpp-python's
server into var/bench/llamacpp-server-venv, unless skipped), then the multi-turn benchmark
(conversations with a shared system prompt and a growing history against the appliance and
the same two servers, one at a time), then the guidellm lane (which installs guidellm into
var/bench/guidellm-venv). The chain benchmark takes the router benchmark's options, except
the open-loop ones: it has no open-loop phase.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.bench import audit, batching, chain, engine, guidellm, multiturn, router, scaleout
from tests.support import REPO

BENCHMARKS = (
    "engine",
    "audit",
    "router",
    "scaleout",
    "chain",
    "batching",
    "multiturn",
    "guidellm",
)
ENGINE_REPEATS = 15


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive requests per second")
    return rates


def _streams(text: str) -> tuple[int, ...]:
    try:
        streams = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
    if not streams or min(streams) < 1:
        raise argparse.ArgumentTypeError("stream counts must be at least 1")
    return tuple(sorted(set(streams)))


# What `--targets` may name for the batching benchmark (the appliance is always measured).
BATCHING_TARGETS = ("raw", "appliance", "grammar", "baseline", "llama-server", "llamacpp-server")


def _targets(text: str) -> frozenset[str]:
    targets = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(targets - set(BATCHING_TARGETS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown target {', '.join(unknown)}; choose from {', '.join(BATCHING_TARGETS)}"
        )
    if "appliance" not in targets:
        raise argparse.ArgumentTypeError("the appliance is what is measured: list `appliance`")
    return targets


def _multiturn_targets(text: str) -> tuple[str, ...]:
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(chosen - set(multiturn.TARGETS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown target {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(multiturn.TARGETS)}"
        )
    return tuple(target for target in multiturn.TARGETS if target in chosen)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "--only", choices=BENCHMARKS, help="run just this benchmark (default: all, in order)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"engine: measured runs per side (default {ENGINE_REPEATS}); "
        f"router: interleaved concurrency-1 repeats (default {router.Settings.repeats})",
    )
    parser.add_argument(
        "--warmups", type=int, default=2, help="engine: unmeasured runs per side first (default 2)"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "var" / "bench", help="report folder (var/bench)"
    )
    defaults = router.Settings()
    group = parser.add_argument_group("router and chain benchmarks")
    group.add_argument(
        "--requests",
        type=int,
        default=defaults.requests,
        help="concurrency-1 requests per repeat and target, LiteLLM aside (default %(default)s)",
    )
    group.add_argument(
        "--litellm-requests",
        type=int,
        default=defaults.litellm_requests,
        help="concurrency-1 requests per repeat through LiteLLM (default %(default)s)",
    )
    group.add_argument(
        "--rates",
        type=_rates,
        default=defaults.rates,
        help="open-loop rates, requests/s, comma-separated (default 200,500)",
    )
    group.add_argument(
        "--open-seconds",
        type=float,
        default=defaults.open_seconds,
        help="seconds per open-loop rate and target (default %(default)s)",
    )
    group.add_argument(
        "--saturation-seconds",
        type=float,
        default=defaults.saturation_seconds,
        help="seconds of saturation per target (default %(default)s)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="concurrent closed-loop workers for saturation (default %(default)s)",
    )
    group.add_argument(
        "--warmup-requests",
        type=int,
        default=defaults.warmup_requests,
        help="unmeasured requests per target, sequential then 8 at once (default %(default)s)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout_s,
        help="per-request timeout, seconds (default %(default)s)",
    )
    group.add_argument(
        "--quiet-wait",
        type=float,
        default=defaults.quiet_wait_s,
        help="router: before each phase, batching: before each target, wait at most this long "
        "for other processes to go quiet (default %(default)s s)",
    )
    group.add_argument(
        "--no-litellm",
        action="store_true",
        help="skip the LiteLLM proxy columns (and its install)",
    )
    group.add_argument(
        "--chain-stream",
        action="store_true",
        help="chain: streamed requests (usage included) instead of non-streaming ones",
    )
    group.add_argument(
        "--chain-mtls",
        action="store_true",
        help="chain: enroll the appliance (HTTPS to the router and the appliance, mTLS between "
        "them) instead of joining it with the lab secret over plain HTTP",
    )
    batch = batching.Settings()
    group = parser.add_argument_group("batching benchmark")
    group.add_argument(
        "--streams",
        type=_streams,
        default=batch.streams,
        help="concurrent streams, comma-separated (default 1,4,8,16)",
    )
    group.add_argument(
        "--rounds",
        type=int,
        default=batch.rounds,
        help="measured rounds per target and concurrency (default %(default)s)",
    )
    group.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure the appliance of git revision REV (a worktree, removed afterwards) "
        "in the same rounds, and report the ratios current / baseline; for the audit "
        "benchmark, verify its exports with REV's code beside this checkout's",
    )
    group.add_argument(
        "--targets",
        type=_targets,
        help=f"measure only these, comma-separated, from {','.join(BATCHING_TARGETS)} "
        "(default: all; llamacpp-server means both of its variants)",
    )
    group.add_argument(
        "--skip-llama-server",
        action="store_true",
        help="skip llama.cpp's llama-server (and its build)",
    )
    group.add_argument(
        "--skip-llamacpp-server",
        action="store_true",
        help="skip llama-cpp-python's server (and its install)",
    )
    talks = multiturn.Settings()
    group = parser.add_argument_group("multi-turn benchmark")
    group.add_argument(
        "--conversations",
        type=_streams,
        default=talks.conversations,
        help="concurrent conversations, comma-separated: one run per count (default 16,48)",
    )
    group.add_argument(
        "--turns",
        type=int,
        default=talks.turns,
        help="turns per conversation (default %(default)s)",
    )
    group.add_argument(
        "--multiturn-targets",
        type=_multiturn_targets,
        default=talks.targets,
        help=f"servers to measure, comma-separated, from {','.join(multiturn.TARGETS)} "
        "(default: all; --skip-llama-server and --skip-llamacpp-server apply too)",
    )
    group.add_argument(
        "--llamacpp-conversations",
        type=int,
        default=talks.llamacpp_max_conversations,
        help="run llama-cpp-python's server (one request at a time) only up to this many "
        "conversations (default %(default)s)",
    )
    lane = guidellm.Settings()
    group = parser.add_argument_group("guidellm lane")
    group.add_argument(
        "--guidellm-seconds",
        type=float,
        default=lane.seconds,
        help="seconds per benchmark of the sweep (default %(default)s)",
    )
    group.add_argument(
        "--guidellm-sweep-size",
        type=int,
        default=lane.sweep_size,
        help="benchmarks in the sweep (default %(default)s, guidellm's)",
    )
    group.add_argument(
        "--guidellm-max-concurrency",
        type=int,
        default=lane.max_concurrency,
        help="streams of the sweep's throughput step (default %(default)s; guidellm's: 512)",
    )
    group.add_argument(
        "--guidellm-prompt-tokens",
        type=int,
        default=lane.prompt_tokens,
        help="synthetic prompt tokens (default %(default)s)",
    )
    group.add_argument(
        "--guidellm-output-tokens",
        type=int,
        default=lane.output_tokens,
        help="synthetic output tokens (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.guidellm_seconds <= 0 or args.guidellm_sweep_size < 2:
        parser.error("--guidellm-seconds must be positive and --guidellm-sweep-size at least 2")
    sizes = (args.guidellm_prompt_tokens, args.guidellm_output_tokens)
    if min(*sizes, args.guidellm_max_concurrency) < 1:
        parser.error(
            "--guidellm-prompt-tokens, --guidellm-output-tokens and "
            "--guidellm-max-concurrency must be >= 1"
        )
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.turns < 1 or args.llamacpp_conversations < 0:
        parser.error("--turns must be at least 1 and --llamacpp-conversations at least 0")
    if args.targets is not None and ("baseline" in args.targets) != (args.baseline is not None):
        parser.error("--targets lists `baseline` exactly when --baseline REV is given")
    if (args.repeats is not None and args.repeats < 1) or args.warmups < 0:
        parser.error("--repeats must be at least 1 and --warmups at least 0")
    counts = (args.requests, args.litellm_requests, args.workers, args.warmup_requests)
    if min(counts) < 1:
        parser.error("--requests, --litellm-requests, --workers, --warmup-requests must be >= 1")
    if min(args.open_seconds, args.saturation_seconds, args.timeout) <= 0 or args.quiet_wait < 0:
        parser.error(
            "--open-seconds, --saturation-seconds and --timeout must be positive, "
            "--quiet-wait at least 0"
        )
    return args


def router_settings(args: argparse.Namespace) -> router.Settings:
    return router.Settings(
        repeats=args.repeats if args.repeats is not None else router.Settings.repeats,
        requests=args.requests,
        litellm_requests=args.litellm_requests,
        rates=args.rates,
        open_seconds=args.open_seconds,
        saturation_seconds=args.saturation_seconds,
        workers=args.workers,
        warmup_requests=args.warmup_requests,
        timeout_s=args.timeout,
        quiet_wait_s=args.quiet_wait,
        litellm=not args.no_litellm,
    )


def batching_settings(args: argparse.Namespace) -> batching.Settings:
    chosen = args.targets if args.targets is not None else frozenset(BATCHING_TARGETS)
    return batching.Settings(
        streams=args.streams,
        rounds=args.rounds,
        raw="raw" in chosen,
        llama_server="llama-server" in chosen and not args.skip_llama_server,
        llamacpp_server="llamacpp-server" in chosen and not args.skip_llamacpp_server,
        baseline=args.baseline,
        grammar="grammar" in chosen,
        quiet_wait_s=args.quiet_wait,
    )


def multiturn_settings(args: argparse.Namespace) -> multiturn.Settings:
    skipped = {"llama-server": args.skip_llama_server, "llamacpp-server": args.skip_llamacpp_server}
    return multiturn.Settings(
        conversations=args.conversations,
        turns=args.turns,
        targets=tuple(target for target in args.multiturn_targets if not skipped.get(target)),
        llamacpp_max_conversations=args.llamacpp_conversations,
        quiet_wait_s=args.quiet_wait,
    )


def guidellm_settings(args: argparse.Namespace) -> guidellm.Settings:
    return guidellm.Settings(
        seconds=args.guidellm_seconds,
        prompt_tokens=args.guidellm_prompt_tokens,
        output_tokens=args.guidellm_output_tokens,
        sweep_size=args.guidellm_sweep_size,
        max_concurrency=args.guidellm_max_concurrency,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [args.only] if args.only else list(BENCHMARKS)
    for index, name in enumerate(chosen):
        if index:
            print()
        if name == "engine":
            repeats = args.repeats if args.repeats is not None else ENGINE_REPEATS
            engine.run(repeats=repeats, warmups=args.warmups, out_dir=args.out)
        elif name == "audit":
            audit.run(out_dir=args.out, baseline=args.baseline)
        elif name == "router":
            router.run(out_dir=args.out, settings=router_settings(args))
        elif name == "scaleout":
            scaleout.run(out_dir=args.out, settings=router_settings(args))
        elif name == "chain":
            chain.run(
                out_dir=args.out,
                settings=router_settings(args),
                stream=args.chain_stream,
                mtls=args.chain_mtls,
            )
        elif name == "batching":
            batching.run(out_dir=args.out, settings=batching_settings(args))
        elif name == "multiturn":
            multiturn.run(out_dir=args.out, settings=multiturn_settings(args))
        else:
            guidellm.run(out_dir=args.out, settings=guidellm_settings(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
