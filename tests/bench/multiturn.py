"""Multi-turn benchmark: TTFT per turn and aggregate tokens/s over real-shaped conversations.

C conversations (16, then 48: three per slot of a 16-slot server) of T turns (6) each run at
once against one server at a time. Every conversation is a closed loop: it sends turn k+1
when turn k's answer has arrived, with the answer appended to its history as the assistant
message, so each request resends the shared system prompt (about 500 tokens) and the whole
history so far (`tests.bench.conversations`: deterministic messages of varied lengths).
Requests are streamed chat completions, greedy (temperature 0, repeat penalty 1 where the
server has one), max_tokens 64, with `stream_options.include_usage`.

Targets, each started alone on a fresh process for every conversation count (so no cache
carries over from a previous run), warmed up with an unrelated prompt, measured, stopped:

- appliance: `palisade appliance serve --no-auth` with `max_sequences = 16` (the batching
  benchmark's config: its prompt cache at its defaults). Without authentication every request
  is in one cache scope, as every request of one org is with a tenant key;
- llama-server: llama.cpp's own server, `-np 16`, 2048 tokens per slot, built by the
  batching benchmark (`prepare_llama_server`), its prompt cache as shipped (`--cache-ram`
  and slot reuse by prompt similarity at their defaults);
- llamacpp-server: llama-cpp-python's server (`--interrupt_requests False`, every core),
  which serves one request at a time and keeps only its last prompt's KV: above
  `llamacpp_max_conversations` conversations it is not run (it would take long), and the
  report says so.

Per target and turn: TTFT p50/p99 (send to first content delta; a turn's requests wait in
the server's queue as real ones do), mean prompt tokens and cached prompt tokens (the
appliance's and OpenAI's `usage.prompt_tokens_details.cached_tokens`; llama-server's
`timings.cache_n` when its usage has no details). Per target: aggregate tokens/s, the
completion tokens of every turn over the wall time from the first request to the last
answer. Ratios appliance / peer per turn and for tokens/s; the issue's goals (appliance TTFT
p50 <= 0.5x llama-server's on turns 2-6, tokens/s >= 1.1x) are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import llama_cpp

from tests.bench.batching import (
    MAX_SEQUENCES,
    THREADS,
    Endpoint,
    Stream,
    StreamError,
    Target,
    appliance_config,
    llama_server_command,
    llama_server_version,
    llamacpp_server_command,
    prepare_llama_server,
    prepare_llamacpp_server,
    start_appliance,
    start_server,
    stream_chat,
    warm_up,
)
from tests.bench.conversations import SYSTEM_PROMPT, user_message
from tests.bench.engine import BUSY_CORES, CpuWatch, machine_info
from tests.bench.router import QUIET_CORES, _free_port, percentile, wait_idle
from tests.support import default_model_path

CONVERSATIONS = (16, 48)
TURNS = 6
MAX_TOKENS = 64
TIMEOUT_S = 900.0
TARGETS = ("appliance", "llama-server", "llamacpp-server")
PEERS = ("llama-server", "llamacpp-server")
LLAMACPP_MAX_CONVERSATIONS = 16
# The issue's goals against llama-server (informational: PASS/MISS is printed).
JUDGED_FROM_TURN = 2
TTFT_RATIO = 0.5
TOKENS_RATIO = 1.1


@dataclass(frozen=True)
class Settings:
    conversations: tuple[int, ...] = CONVERSATIONS
    turns: int = TURNS
    targets: tuple[str, ...] = TARGETS
    # llama-cpp-python's server serves one request at a time: more conversations than this
    # and it is left out of that run.
    llamacpp_max_conversations: int = LLAMACPP_MAX_CONVERSATIONS
    timeout_s: float = TIMEOUT_S
    quiet_wait_s: float = 20.0


# --- conversations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One request of one conversation: its stream, or why it failed."""

    conversation: int
    turn: int  # 1 = the first
    stream: Stream | None
    error: str | None = None


async def converse(
    session: aiohttp.ClientSession, endpoint: Endpoint, conversation: int, turns: int
) -> list[Turn]:
    """The conversation's turns in a closed loop; it stops at a failed turn (no answer to
    append, no history to go on with)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    done: list[Turn] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": user_message(conversation, turn)})
        try:
            stream = await stream_chat(session, endpoint, endpoint.chat(messages, MAX_TOKENS))
        except (StreamError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            done.append(Turn(conversation, turn + 1, None, f"{type(exc).__name__}: {exc}"[:200]))
            return done
        done.append(Turn(conversation, turn + 1, stream))
        messages.append({"role": "assistant", "content": stream.text})
    return done


@dataclass(frozen=True)
class Run:
    """All conversations of one target, from the first request to the last answer."""

    conversations: int
    seconds: float
    turns: list[Turn]


async def run_conversations(
    endpoint: Endpoint, conversations: int, turns: int, timeout_s: float
) -> Run:
    # A connection per request: llama-server drops some idle keep-alive connections just as
    # a conversation's next turn is written to them; a local connect costs well under 1 ms.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        began = time.perf_counter()
        found = await asyncio.gather(
            *(converse(session, endpoint, index, turns) for index in range(conversations))
        )
    done = [turn for conversation in found for turn in conversation]
    ended = max((t.stream.ended for t in done if t.stream), default=time.perf_counter())
    return Run(conversations, ended - began, done)


async def _warm(target: Target, widest: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await warm_up(session, target, widest)


# --- what a server reported -----------------------------------------------------------------------


def cached_tokens(stream: Stream) -> tuple[int | None, str | None]:
    """Cached prompt tokens and where they were read from (None, None: not reported)."""
    details = (stream.usage or {}).get("prompt_tokens_details") or {}
    if isinstance(details.get("cached_tokens"), int):
        return details["cached_tokens"], "usage.prompt_tokens_details"
    timings = stream.timings or {}
    if isinstance(timings.get("cache_n"), int):
        return timings["cache_n"], "timings.cache_n"
    return None, None


def prompt_tokens(stream: Stream) -> int | None:
    usage = stream.usage or {}
    if isinstance(usage.get("prompt_tokens"), int):
        return int(usage["prompt_tokens"])
    timings = stream.timings or {}
    if isinstance(timings.get("prompt_n"), int) and isinstance(timings.get("cache_n"), int):
        return int(timings["prompt_n"]) + int(timings["cache_n"])
    return None


def _mean(values: Sequence[int | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def _errors(turns: Sequence[Turn]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for turn in turns:
        if turn.error is not None:
            kinds[turn.error] = kinds.get(turn.error, 0) + 1
    return kinds


def summarize_turn(turns: Sequence[Turn]) -> dict[str, Any]:
    streams = [turn.stream for turn in turns if turn.stream is not None]
    ttfts = [stream.ttft_ms for stream in streams]
    cached = [cached_tokens(stream) for stream in streams]
    prompts = [prompt_tokens(stream) for stream in streams]
    hits = [count for count, _ in cached if count is not None]
    known = [p for (count, _), p in zip(cached, prompts, strict=True) if count is not None and p]
    return {
        "requests": len(turns),
        "ok": len(streams),
        "errors": len(turns) - len(streams),
        "ttft_p50_ms": percentile(ttfts, 0.50),
        "ttft_p99_ms": percentile(ttfts, 0.99),
        "prompt_tokens_mean": _mean(prompts),
        "cached_tokens_mean": _mean(hits),
        # Of the prompt tokens of the requests that reported cached tokens, the share cached.
        "cached_share": sum(hits) / sum(known) if hits and known else None,
        "cached_from": sorted({where for _, where in cached if where is not None}),
        "completion_tokens": sum(stream.completion_tokens for stream in streams),
    }


def summarize_run(run: Run, turns: int) -> dict[str, Any]:
    streams = [turn.stream for turn in run.turns if turn.stream is not None]
    tokens = sum(stream.completion_tokens for stream in streams)
    later = [s.ttft_ms for t, s in _answered(run.turns) if t.turn >= JUDGED_FROM_TURN]
    return {
        "conversations": run.conversations,
        "seconds": run.seconds,
        "completion_tokens": tokens,
        "aggregate_tok_s": tokens / run.seconds if run.seconds > 0 and tokens else None,
        "ttft_p50_ms": percentile([stream.ttft_ms for stream in streams], 0.50),
        "ttft_p99_ms": percentile([stream.ttft_ms for stream in streams], 0.99),
        f"ttft_p50_ms_turns_{JUDGED_FROM_TURN}_on": percentile(later, 0.50),
        "requests": run.conversations * turns,
        "ok": len(streams),
        "errors": run.conversations * turns - len(streams),
        "error_kinds": _errors(run.turns),
        "tokens_from": sorted({stream.tokens_from for stream in streams}),
        "turns": {
            str(k): summarize_turn([t for t in run.turns if t.turn == k])
            for k in range(1, turns + 1)
        },
    }


def _answered(turns: Sequence[Turn]) -> Iterator[tuple[Turn, Stream]]:
    for turn in turns:
        if turn.stream is not None:
            yield turn, turn.stream


# --- ratios and goals -----------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def ratios(rows: dict[str, Any]) -> dict[str, Any]:
    """Appliance / peer, for each peer measured in this run: TTFT p50 and p99 per turn,
    aggregate tokens/s."""
    ours = rows.get("appliance")
    found: dict[str, Any] = {}
    if ours is None:
        return found
    for peer in PEERS:
        theirs = rows.get(peer)
        if theirs is None:
            continue
        found[peer] = {
            "aggregate_tok_s": _ratio(ours["aggregate_tok_s"], theirs["aggregate_tok_s"]),
            "turns": {
                turn: {
                    key: _ratio(row[key], theirs["turns"][turn][key])
                    for key in ("ttft_p50_ms", "ttft_p99_ms")
                }
                for turn, row in ours["turns"].items()
                if turn in theirs["turns"]
            },
        }
    return found


def _goal(name: str, value: float | None, goal: str, met: bool | None) -> dict[str, Any]:
    return {"name": name, "value": value, "goal": goal, "met": met}


def judge(conversations: int, found: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals against llama-server for one conversation count (None: not run)."""
    versus = found.get("llama-server")
    turns = versus["turns"] if versus else {}
    later = [row["ttft_p50_ms"] for turn, row in turns.items() if int(turn) >= JUDGED_FROM_TURN]
    worst = None if not later or None in later else max(later)
    throughput = versus["aggregate_tok_s"] if versus else None
    last = max((int(turn) for turn in turns), default=JUDGED_FROM_TURN)
    return [
        _goal(
            f"appliance / llama-server TTFT p50, worst of turns {JUDGED_FROM_TURN}-{last}, "
            f"{conversations} conversations",
            worst,
            f"<= {TTFT_RATIO:g}x",
            None if worst is None else worst <= TTFT_RATIO,
        ),
        _goal(
            f"appliance / llama-server aggregate tok/s, {conversations} conversations",
            throughput,
            f">= {TOKENS_RATIO:g}x",
            None if throughput is None else throughput >= TOKENS_RATIO,
        ),
    ]


# --- report ---------------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(summary: dict[str, Any], notes: Sequence[str], found: Sequence[str]) -> None:
    setup = summary["setup"]
    print(
        f"\nMulti-turn benchmark: {setup['model']}, {setup['turns']} turns per conversation, "
        f"a shared system prompt of {setup['system_prompt_tokens']} tokens, max_tokens "
        f"{MAX_TOKENS}, greedy, {THREADS} threads"
    )
    for count, rows in summary["results"].items():
        print(f"\n  {count} conversations")
        print(
            f"  {'target':<17}{'turn':>5}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}"
            f"{'prompt tok':>12}{'cached tok':>12}{'errors':>8}"
        )
        for target, row in rows.items():
            for turn, cells in row["turns"].items():
                print(
                    f"  {target:<17}{turn:>5}{_num(cells['ttft_p50_ms'], ',.0f'):>13}"
                    f"{_num(cells['ttft_p99_ms'], ',.0f'):>13}"
                    f"{_num(cells['prompt_tokens_mean'], '.0f'):>12}"
                    f"{_num(cells['cached_tokens_mean'], '.0f'):>12}{cells['errors']:>8}"
                )
            print(
                f"  {target:<17}{'all':>5}{_num(row['ttft_p50_ms'], ',.0f'):>13}"
                f"{_num(row['ttft_p99_ms'], ',.0f'):>13}   aggregate "
                f"{_num(row['aggregate_tok_s'], '.1f')} tok/s ({row['completion_tokens']} tokens "
                f"in {row['seconds']:.1f} s)"
            )
        print_ratios(summary["ratios"].get(count, {}))
    goals = [row for row in summary["targets"] if row["value"] is not None]
    if goals:
        print("\n  Targets (informational, never asserted)")
        width = max(len(row["name"]) for row in goals) + 2
        for row in goals:
            verdict = "PASS" if row["met"] else "MISS"
            print(f"  {row['name']:<{width}}{row['value']:>8.2f}x{row['goal']:>10}{verdict:>6}")
    for note in notes:
        print(f"  NOTE: {note}")
    for warning in found:
        print(f"  WARNING: {warning}")


def print_ratios(found: dict[str, Any]) -> None:
    """Appliance / peer: TTFT p50 and p99 per turn (below 1: the appliance is faster) and
    aggregate tokens/s (above 1: the appliance is faster)."""
    if not found:
        return
    turns = next(iter(found.values()))["turns"]
    header = "".join(f"{turn:>7}" for turn in turns)
    print(f"\n  {'appliance / peer, turn':<30}{header}{'agg tok/s':>11}")
    for peer, versus in found.items():
        for key, label in (("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99")):
            cells = "".join(f"{_num(row[key], '.2f'):>7}" for row in versus["turns"].values())
            throughput = _num(versus["aggregate_tok_s"], ".2f") if key == "ttft_p50_ms" else ""
            print(f"  {peer + ' ' + label:<30}{cells}{throughput:>11}".rstrip())


def write_json(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "multiturn.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


# --- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peers:
    """What the external targets run from (None: not available), and why not."""

    llama_server: Path | None
    llamacpp_python: Path | None
    info: dict[str, Any]
    skipped: dict[str, str]


def prepare_peers(targets: Sequence[str], version: str) -> Peers:
    """Build or install the external servers first, so that never shares a measurement."""
    info: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    binary = python = None
    if "llama-server" in targets:
        binary, info["llama_server"] = prepare_llama_server(version)
        if binary is None:
            skipped["llama-server"] = info["llama_server"]["skipped"]
        else:
            info["llama_server"]["version"] = llama_server_version(binary)
    if "llamacpp-server" in targets:
        python, info["llamacpp_server"] = prepare_llamacpp_server(version)
        if python is None:
            skipped["llamacpp-server"] = info["llamacpp_server"]["skipped"]
    return Peers(binary, python, info, skipped)


def start_target(
    stack: contextlib.ExitStack, name: str, model: Path, scratch: Path, peers: Peers
) -> Target:
    if name == "appliance":
        return start_appliance(stack, name, model, scratch)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    if name == "llama-server" and peers.llama_server is not None:
        command = llama_server_command(peers.llama_server, model, port, MAX_SEQUENCES)
        target = start_server(stack, name, command, url=url, ready_path="/health", scratch=scratch)
    elif name == "llamacpp-server" and peers.llamacpp_python is not None:
        command = llamacpp_server_command(peers.llamacpp_python, model, port, THREADS)
        target = start_server(
            stack, name, command, url=url, ready_path="/v1/models", scratch=scratch
        )
    else:
        raise RuntimeError(f"{name} is not available")
    return Target(target.name, target.endpoint, target.pid, target.tail, command)


@dataclass
class Measured:
    """Everything one target's run left behind."""

    summary: dict[str, Any]
    command: list[str]
    contention: dict[str, float] | None
    load_before: tuple[float, float, float]
    quiet: bool
    tail: str


def measure(
    name: str, model: Path, scratch: Path, *, peers: Peers, conversations: int, settings: Settings
) -> Measured:
    """Start `name` alone, warm it up, run the conversations, stop it."""
    with contextlib.ExitStack() as stack:
        target = start_target(stack, name, model, scratch, peers)
        asyncio.run(_warm(target, min(conversations, MAX_SEQUENCES)))
        _, quiet = wait_idle([target.pid], [os.getpid(), target.pid], settings.quiet_wait_s)
        load = os.getloadavg()
        print(
            f"  {name}: {conversations} conversations x {settings.turns} turns "
            f"(load average {load[0]:.2f}) ...",
            flush=True,
        )
        watch = CpuWatch(os.getpid(), target.pid)
        run = asyncio.run(
            run_conversations(target.endpoint, conversations, settings.turns, settings.timeout_s)
        )
        contention = watch.report()
        summary = summarize_run(run, settings.turns)
        print(
            f"  {name}: {_num(summary['aggregate_tok_s'], '.1f')} tok/s, "
            f"{summary['completion_tokens']} tokens in {run.seconds:.1f} s, "
            f"TTFT p50 {_num(summary['ttft_p50_ms'], ',.0f')} ms, {summary['errors']} errors",
            flush=True,
        )
        return Measured(summary, target.command, contention, load, quiet, target.tail())


def _system_prompt_tokens(model: Path) -> int:
    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    try:
        return len(vocab.tokenize(SYSTEM_PROMPT.encode(), add_bos=False, special=False))
    finally:
        vocab.close()


def _skip_reason(name: str, conversations: int, settings: Settings, peers: Peers) -> str | None:
    if name in peers.skipped:
        return peers.skipped[name]
    if name == "llamacpp-server" and conversations > settings.llamacpp_max_conversations:
        return (
            f"serves one request at a time: not run above {settings.llamacpp_max_conversations} "
            "conversations (--llamacpp-conversations raises the limit)"
        )
    return None


def _warnings(name: str, count: int, done: Measured) -> list[str]:
    found = []
    row = done.summary
    if row["errors"]:
        found.append(f"{name}, {count} conversations: {row['errors']} requests failed")
    used = done.contention
    if used is not None and max(used.values()) > BUSY_CORES:
        found.append(
            f"{name}, {count} conversations: other processes used {used['other_cores']:.2f} "
            f"cores and the hypervisor stole {used['stolen_cores']:.2f} on average: its figures "
            "are unreliable; rerun on a quiet machine"
        )
    if not done.quiet:
        found.append(
            f"{name}, {count} conversations: started while other processes used more than "
            f"{QUIET_CORES:g} cores"
        )
    return found


@dataclass
class Collected:
    """What the runs found so far, by conversation count and target."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add(self, name: str, count: int, done: Measured) -> None:
        self.results.setdefault(str(count), {})[name] = done.summary
        self.runs.setdefault(str(count), {})[name] = {
            "command": done.command,
            "contention": done.contention,
            "load_average_before": done.load_before,
            "quiet_before": done.quiet,
            "log_tail": done.tail,
        }
        self.warnings += _warnings(name, count, done)

    def skip(self, name: str, count: int, why: str) -> None:
        self.skipped[f"{name}/{count}"] = why
        print(f"  {name}, {count} conversations: not measured ({why})", flush=True)


def measure_all(
    settings: Settings, model: Path, peers: Peers, scratch: Path, into: Collected
) -> None:
    """Every target alone, for every conversation count in turn."""
    for count in settings.conversations:
        for name in settings.targets:
            why = _skip_reason(name, count, settings, peers)
            if why is not None:
                into.skip(name, count, why)
                continue
            where = _mkdir(scratch / f"{count}-conversations")
            try:
                done = measure(
                    name, model, where, peers=peers, conversations=count, settings=settings
                )
            except (RuntimeError, TimeoutError, OSError, StreamError) as exc:
                into.skip(name, count, f"{name} failed: {exc}"[:2000])
                continue
            into.add(name, count, done)


def run(*, out_dir: Path, settings: Settings | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write `out_dir`/multiturn.json; returns the summary."""
    settings = settings or Settings()
    model = default_model_path()
    print(
        f"Multi-turn benchmark: {', '.join(settings.targets)}; {model.name}, "
        f"{', '.join(map(str, settings.conversations))} conversations x {settings.turns} turns, "
        f"max_tokens {MAX_TOKENS}",
        flush=True,
    )
    peers = prepare_peers(settings.targets, llama_cpp.__version__)
    collected = Collected()
    with tempfile.TemporaryDirectory(prefix="multiturn-bench-", dir=_mkdir(out_dir)) as scratch:
        try:
            measure_all(settings, model, peers, Path(scratch), collected)
        except KeyboardInterrupt:  # the servers are stopped; report what finished
            collected.warnings.append("interrupted: the report holds the runs that finished")
    results, skipped, found = collected.results, collected.skipped, collected.warnings
    found_ratios = {count: ratios(rows) for count, rows in results.items()}
    goals = [row for count in results for row in judge(int(count), found_ratios[count])]
    summary: dict[str, Any] = {
        "setup": {
            "model": model.name,
            "turns": settings.turns,
            "system_prompt_tokens": _system_prompt_tokens(model),
        },
        "results": results,
        "ratios": found_ratios,
        "targets": goals,
    }
    notes = [f"{key} not measured: {why}" for key, why in skipped.items()]
    notes.append(
        "the appliance runs with --no-auth: every request shares one cache scope, as the "
        "requests of one org do"
    )
    print_table(summary, notes, found)
    report = {
        "benchmark": "multiturn",
        "machine": machine_info() | peers.info,
        "setup": summary["setup"]
        | {
            "conversations": list(settings.conversations),
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "threads": THREADS,
            "slots": MAX_SEQUENCES,
            "targets": list(settings.targets),
            "llamacpp_max_conversations": settings.llamacpp_max_conversations,
            "timeout_s": settings.timeout_s,
            "quiet_wait_s": settings.quiet_wait_s,
            "order": "one target at a time, each on a fresh process per conversation count",
            "appliance_config": appliance_config(model),
            "system_prompt": SYSTEM_PROMPT,
            "first_user_message": user_message(0, 0),
        },
        "summary": summary,
        "runs": collected.runs,
        "skipped": skipped,
        "notes": notes,
        "warnings": found,
    }
    path = write_json(report, out_dir)
    print(f"\nwrote {path}")
    return summary


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
