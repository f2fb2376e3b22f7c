"""Batching benchmark: aggregate tokens/s and TTFT at several concurrent streams, in one run.

Targets, all started first and then measured in turns, on the same GGUF, the same prompts
and greedy decoding (temperature 0, repeat penalty 1):

- raw: llama-cpp-python in this process (`tests.bench.engine.RawEngine`), one stream; the
  denominator of the one-stream target;
- appliance: `palisade appliance serve` with `max_sequences = 16`;
- llama-server: llama.cpp's own C++ server with 16 parallel slots, built once by this
  benchmark from the llama.cpp sources vendored in the llama-cpp-python sdist of the
  installed version, into var/bench/llama-server;
- llamacpp-server: `python -m llama_cpp.server --interrupt_requests False`, the issue's
  command, with the server's own defaults (n_threads = cores / 2, n_threads_batch =
  cores), from its own virtual env var/bench/llamacpp-server-venv (the cached
  llama-cpp-python wheel plus its server extras; failing that, the extras plus a .pth onto
  our own llama_cpp build);
- llamacpp-server-threads: the same with `--n_threads N --n_threads_batch N`, N = cores,
  as every other target runs;
- appliance+grammar: an appliance of its own (the same code and config: sharing the free
  one's server would evict the prompts it caches), every other stream of each round
  constrained by a JSON schema (`response_format`, {"story": string of at least 300
  characters, so the constrained streams run to max_tokens as the free ones do); the report
  adds the ratio of its aggregate tok/s to the all-free appliance's, per concurrency: the
  throughput cost of grammar-constrained sequences sharing the batch;
- appliance@REV (with `--baseline REV`): the appliance of another commit, checked out with
  `git worktree add --detach` into the scratch folder (removed afterwards) and served by the
  same Python with `PYTHONPATH` pointing at it, so its packages shadow the checkout's; the
  report adds the ratios current / baseline of aggregate tok/s and TTFT p50 per concurrency
  (a restructure should keep tok/s at 0.98 or more).

`--targets` picks which of raw, baseline and the peers run beside the appliance (e.g.
`--targets appliance,baseline --streams 1,16`: a before/after comparison in a few minutes).

Each server is warmed up, then for each concurrency c the benchmark sends `rounds` rounds of
c streamed chat completions at once (distinct short "Write a long story about ..." prompts,
none repeated within a target's run, max_tokens 64). Each round goes to every target in
turn, the order rotating from round to round, and raw decode takes its turn in the
one-stream rounds: this machine's speed drifts by several percent over minutes, and
interleaving puts every target through the same drift. Idle servers sleep (llama.cpp's
threads only spin inside a decode). Per request, TTFT runs from sending to
the first content delta; per round, aggregate tokens/s is the completion tokens of all c
streams (from the server's usage chunk, else one per content delta) over the round's wall
time. The table shows the median aggregate across rounds and TTFT p50/p99 over all requests.
The load client (asyncio, aiohttp) shares the two cores with the server, as a real client
on the same machine would; targets are informational, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import llama_cpp

from appliance import DEFAULT_MODEL_ID
from tests.bench.engine import BUSY_CORES, CpuWatch, RawEngine, machine_info
from tests.bench.router import QUIET_CORES, Server, _free_port, percentile, wait_idle
from tests.support import REPO, default_model_path, model_toml

MAX_TOKENS = 64
CONTEXT_LENGTH = 2048
MAX_SEQUENCES = 16
THREADS = os.cpu_count() or 1
STREAMS = (1, 4, 8, 16)
ROUNDS = 5
TIMEOUT_S = 600.0
WARMUP_TOKENS = 8
# llama-cpp-python's server as the issue runs it (its defaults: n_threads = cores / 2,
# n_threads_batch = cores), and with every core for both, as the other targets run.
LLAMACPP_SERVERS: dict[str, int | None] = {
    "llamacpp-server": None,
    "llamacpp-server-threads": THREADS,
}

# Targets from the issue (informational: PASS/MISS is printed, never asserted).
JUDGED_STREAMS = 16
LLAMA_SERVER_RATIO = 1.0
LLAMACPP_SERVER_RATIO = 3.0
RAW_RATIO = 0.95
TTFT_P99_MS = 1000.0

# Always here, whatever --out says, so they are downloaded, built and installed once.
BENCH_DIR = REPO / "var" / "bench"
SRC_DIR = BENCH_DIR / "src"
LLAMA_SERVER_DIR = BENCH_DIR / "llama-server"
LLAMACPP_SERVER_VENV = BENCH_DIR / "llamacpp-server-venv"

# The constrained mix: every other stream answers as JSON of this schema.
GRAMMAR_TARGET = "appliance+grammar"
STORY_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "story",
        "strict": True,
        "schema": {
            "type": "object",
            # At least ~75 tokens of story: constrained streams run to max_tokens too.
            "properties": {"story": {"type": "string", "minLength": 300}},
            "required": ["story"],
            "additionalProperties": False,
        },
    },
}

# The appliance's batching scheduler reads these ModelConfig keys.
BATCHING_KEYS: dict[str, object] = {"max_sequences": MAX_SEQUENCES}

SUBJECTS = (
    "a dragon who guards a library",
    "a robot learning to paint",
    "a lighthouse keeper and a storm",
    "two friends crossing a desert",
    "a baker who bakes bread for a king",
    "a cat who becomes mayor of a town",
    "a young wizard's first spell",
    "a ship lost in a frozen sea",
    "an old clockmaker and his apprentice",
    "a girl who can talk to trees",
    "a knight afraid of the dark",
    "a detective solving a museum theft",
    "a fox and a crow sharing a forest",
    "a family moving to a new planet",
    "a musician who lost her voice",
    "a boy who finds a map in the attic",
)
SETTINGS = (
    "",
    " in a mountain village",
    " on a rainy island",
    " in a busy city",
    " in the far future",
    " during a long winter",
    " at the edge of the world",
    " in an ancient kingdom",
)
PROMPTS = tuple(
    f"Write a long story about {subject}{setting}." for setting in SETTINGS for subject in SUBJECTS
)
WARMUP_PROMPT = "Write a long story about a garden that grows at night."


NOT_CHOSEN = "not in --targets"
# A restructure keeps at least this share of the baseline's aggregate tok/s (and TTFT p50
# within its inverse) at every concurrency.
BASELINE_RATIO = 0.98


@dataclass(frozen=True)
class Settings:
    streams: tuple[int, ...] = STREAMS
    rounds: int = ROUNDS
    raw: bool = True
    llama_server: bool = True
    llamacpp_server: bool = True
    # A git revision whose appliance is measured beside the checkout's (None: not measured).
    baseline: str | None = None
    grammar: bool = True  # the constrained mix (GRAMMAR_TARGET) beside the all-free appliance
    timeout_s: float = TIMEOUT_S
    quiet_wait_s: float = 20.0


def prompt_schedule(streams: Sequence[int], rounds: int) -> dict[int, list[list[str]]]:
    """For each concurrency, `rounds` lists of prompts; no prompt repeats until all are used."""
    schedule: dict[int, list[list[str]]] = {}
    index = 0
    for concurrency in streams:
        schedule[concurrency] = []
        for _ in range(rounds):
            batch = [PROMPTS[(index + i) % len(PROMPTS)] for i in range(concurrency)]
            schedule[concurrency].append(batch)
            index += concurrency
    return schedule


# --- streamed chat completions ----------------------------------------------------------------


class StreamError(Exception):
    """A request that did not produce a complete stream."""


@dataclass(frozen=True)
class Stream:
    """One streamed chat completion, timed on the benchmark's clock."""

    started: float
    first: float
    ended: float
    completion_tokens: int
    tokens_from: str  # "usage" (the server said) or "deltas" (one per content delta)
    text: str
    # The last `usage` the stream carried, and llama-server's `timings` (None: not sent).
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.started) * 1000


@dataclass(frozen=True)
class Endpoint:
    """Where a target takes chat completions, and what its request bodies carry."""

    url: str
    model: str
    extra: dict[str, Any] = field(default_factory=dict)
    # Fields for every other stream of a round (the constrained mix); None: none.
    odd_extra: dict[str, Any] | None = None

    def body(self, prompt: str, max_tokens: int = MAX_TOKENS, index: int = 0) -> bytes:
        odd = self.odd_extra if self.odd_extra is not None and index % 2 else {}
        return self.chat([{"role": "user", "content": prompt}], max_tokens, odd)

    def chat(
        self, messages: list[dict[str, str]], max_tokens: int, more: dict[str, Any] | None = None
    ) -> bytes:
        """A streamed, greedy chat completion of `messages`, with usage in the stream."""
        return json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": 0,
                "max_tokens": max_tokens,
            }
            | self.extra
            | (more or {})
        ).encode()


async def stream_chat(session: aiohttp.ClientSession, endpoint: Endpoint, body: bytes) -> Stream:
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    deltas = 0
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    headers = {"Content-Type": "application/json"}
    async with session.post(endpoint.url, data=body, headers=headers) as response:
        if response.status != 200:
            text = await response.text()
            raise StreamError(f"HTTP {response.status}: {text[:300]}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line.removeprefix(b"data:").strip()
            if data == b"[DONE]":
                break
            event: dict[str, Any] = json.loads(data)
            if "error" in event:
                raise StreamError(f"the server reported an error: {event['error']}")
            content = _delta_content(event)
            if content:
                if first is None:
                    first = time.perf_counter()
                deltas += 1
                pieces.append(content)
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
    ended = time.perf_counter()
    if first is None:
        raise StreamError("the stream carried no content")
    if usage and usage.get("completion_tokens"):
        tokens, source = int(usage["completion_tokens"]), "usage"
    else:
        tokens, source = deltas, "deltas"
    return Stream(started, first, ended, tokens, source, "".join(pieces), usage, timings)


def _delta_content(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    content: str | None = (choices[0].get("delta") or {}).get("content")
    return content or ""


@dataclass(frozen=True)
class Round:
    concurrency: int
    seconds: float
    streams: list[Stream]
    errors: dict[str, int]

    @property
    def tokens(self) -> int:
        return sum(stream.completion_tokens for stream in self.streams)

    @property
    def aggregate_tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


async def run_round(
    session: aiohttp.ClientSession, endpoint: Endpoint, prompts: Sequence[str], max_tokens: int
) -> Round:
    """All `prompts` at once; the round lasts from the first send to the last stream's end."""
    began = time.perf_counter()
    outcomes = await asyncio.gather(
        *(
            stream_chat(session, endpoint, endpoint.body(prompt, max_tokens, index))
            for index, prompt in enumerate(prompts)
        ),
        return_exceptions=True,
    )
    streams = [outcome for outcome in outcomes if isinstance(outcome, Stream)]
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            kind = f"{type(outcome).__name__}: {outcome}"[:200]
            errors[kind] = errors.get(kind, 0) + 1
    ended = max((stream.ended for stream in streams), default=time.perf_counter())
    return Round(len(prompts), ended - began, streams, errors)


@dataclass(frozen=True)
class Target:
    """A running server under test."""

    name: str
    endpoint: Endpoint
    pid: int
    tail: Callable[[], str]
    command: list[str] = field(default_factory=list)


async def warm_up(session: aiohttp.ClientSession, target: Target, widest: int) -> None:
    """One stream, then the widest concurrency, short: loads caches, threads and slots."""
    for prompts in ([WARMUP_PROMPT], [WARMUP_PROMPT] * widest):
        warm = await run_round(session, target.endpoint, prompts, WARMUP_TOKENS)
        if not warm.streams:
            raise StreamError(f"every warm-up request to {target.name} failed: {warm.errors}")


async def measure_interleaved(
    targets: Sequence[Target],
    raw: RawEngine | None,
    schedule: dict[int, list[list[str]]],
    timeout_s: float,
) -> tuple[dict[str, dict[int, list[Round]]], list[dict[str, Any]]]:
    """Every round of every concurrency goes to each target in turn, the order rotating.

    The machine's speed drifts by several percent over minutes; interleaving puts every
    target through the same drift. Raw in-process decode (unless None) takes its turn in
    the one-stream rounds (the first prompt of the smallest concurrency's rounds).
    """
    # Rounds of the other targets leave a target's connections idle for seconds; uvicorn
    # closes idle ones after 5 s, so the client lets them go first rather than race it.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for warming in targets:
            await warm_up(session, warming, max(schedule))
        if raw is not None:
            raw.run(raw.prompt_tokens(_messages(WARMUP_PROMPT)), max_tokens=WARMUP_TOKENS)
        results: dict[str, dict[int, list[Round]]] = {t.name: {} for t in targets}
        raw_runs: list[dict[str, Any]] = []
        turns: list[Target | None] = [*targets, None] if raw is not None else [*targets]
        for concurrency, batches in schedule.items():
            for index, prompts in enumerate(batches):
                shift = index % len(turns)
                for turn in turns[shift:] + turns[:shift]:
                    if turn is None:  # raw's turn
                        if raw is not None and concurrency == min(schedule):
                            raw_runs.append(raw_run(raw, prompts[0], len(raw_runs)))
                        continue
                    done = await run_round(session, turn.endpoint, prompts, MAX_TOKENS)
                    results[turn.name].setdefault(concurrency, []).append(done)
                    _progress(turn.name, concurrency, index, done)
    return results, raw_runs


def _progress(name: str, concurrency: int, index: int, done: Round) -> None:
    ttfts = [stream.ttft_ms for stream in done.streams]
    errors = f", {sum(done.errors.values())} errors" if done.errors else ""
    streams = "streams" if concurrency > 1 else "stream "
    print(
        f"  {name:<18} {concurrency:>3} {streams}, round {index + 1}: "
        f"{done.aggregate_tok_s:7.1f} tok/s, {done.tokens} tokens in {done.seconds:6.2f} s, "
        f"TTFT max {max(ttfts, default=0):8.1f} ms{errors}",
        flush=True,
    )


# --- raw llama-cpp-python, in process -----------------------------------------------------------


def raw_run(raw: RawEngine, prompt: str, index: int) -> dict[str, Any]:
    """One stream in this process, greedy, MAX_TOKENS."""
    run = raw.run(raw.prompt_tokens(_messages(prompt)), max_tokens=MAX_TOKENS)
    seconds = run.ttft_ms / 1000 + (run.completion_tokens - 1) / run.decode_tok_s
    row = {
        "aggregate_tok_s": run.completion_tokens / seconds,
        "decode_tok_s": run.decode_tok_s,
        "ttft_ms": run.ttft_ms,
        "completion_tokens": run.completion_tokens,
        "prompt_tokens": run.prompt_tokens,
        "seconds": seconds,
    }
    print(
        f"  {'raw':<18} {1:>3} stream,  round {index + 1}: "
        f"{row['aggregate_tok_s']:7.1f} tok/s, {run.completion_tokens} tokens in "
        f"{seconds:6.2f} s, decode {run.decode_tok_s:6.1f} tok/s",
        flush=True,
    )
    return row


def summarize_raw(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not runs:
        return None
    return {
        "aggregate_tok_s": statistics.median(r["aggregate_tok_s"] for r in runs),
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "ttft_p50_ms": percentile([r["ttft_ms"] for r in runs], 0.50),
        "ttft_p99_ms": percentile([r["ttft_ms"] for r in runs], 0.99),
        "completion_tokens": _token_range([r["completion_tokens"] for r in runs]),
        "rounds": runs,
    }


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


# --- server processes ---------------------------------------------------------------------------


@contextlib.contextmanager
def run_process(
    name: str,
    command: list[str],
    *,
    url: str,
    ready_path: str,
    log: Path,
    ready_timeout: float,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Start `command` in `log`'s folder (output to `log`), wait until GET url+ready_path is
    200, SIGTERM it."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=log.parent, env=env
        )
    server = Server(name, process, url=url, log=log)
    try:
        server.wait_http(ready_path, ready_timeout)
        yield server
    finally:
        server.stop()


def _run_logged(command: list[str], log: Path, *, timeout: float, cwd: Path | None = None) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=True, cwd=cwd
        )


def _tail(log: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    return ""


# --- llama-server (C++), built once -------------------------------------------------------------


def _sdist_llama_cpp(version: str, log: Path) -> Path:
    """vendor/llama.cpp from the llama-cpp-python sdist (downloaded and extracted once)."""
    top = f"llama_cpp_python-{version}"
    source = SRC_DIR / top / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    SRC_DIR.mkdir(parents=True, exist_ok=True)
    archive = SRC_DIR / f"{top}.tar.gz"
    if not archive.is_file():
        print(f"  downloading the llama-cpp-python {version} sdist into {SRC_DIR} ...", flush=True)
        pip = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}"]
        pip += ["--no-binary", ":all:", "--no-deps", "-d", str(SRC_DIR)]
        _run_logged(pip, log, timeout=1800)
    prefix = f"{top}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [member for member in tar.getmembers() if member.name.startswith(prefix)]
        tar.extractall(SRC_DIR, members=members, filter="data")
    if not (source / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{archive} has no vendor/llama.cpp")
    return source


def prepare_llama_server(version: str) -> tuple[Path | None, dict[str, Any]]:
    """The llama-server binary, built from the sdist's llama.cpp unless it exists already."""
    build = LLAMA_SERVER_DIR / "build"
    binary = build / "bin" / "llama-server"
    record = LLAMA_SERVER_DIR / "build.json"
    info: dict[str, Any] = {"binary": str(binary), "built_now": False, "skipped": None}
    if binary.is_file():
        with contextlib.suppress(OSError, ValueError):
            info |= json.loads(record.read_text())
        return binary, info
    LLAMA_SERVER_DIR.mkdir(parents=True, exist_ok=True)
    log = LLAMA_SERVER_DIR / "build.log"
    log.write_text("")
    print(f"  building llama-server from llama-cpp-python {version} (log: {log}) ...", flush=True)
    began = time.monotonic()
    try:
        source = _sdist_llama_cpp(version, log)
        download_s = time.monotonic() - began
        configure = ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
        configure += [
            f"-D{option}=OFF"
            for option in (
                "LLAMA_CURL",
                "LLAMA_BUILD_TESTS",
                "LLAMA_BUILD_EXAMPLES",
                "LLAMA_BUILD_UI",
                "LLAMA_USE_PREBUILT_UI",
                "LLAMA_OPENSSL",
                "BUILD_SHARED_LIBS",
            )
        ]
        configure += ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON"]
        _run_logged(configure, log, timeout=600)
        compile_began = time.monotonic()
        jobs = str(os.cpu_count() or 1)
        _run_logged(
            ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs],
            log,
            timeout=7200,
        )
    except (OSError, subprocess.SubprocessError, RuntimeError, tarfile.TarError) as exc:
        failure: str | None = str(exc)
    else:
        failure = None if binary.is_file() else f"the build finished without {binary}"
    if failure is not None:
        print(f"  building llama-server failed ({failure}); last lines of {log}:\n{_tail(log)}")
        info["skipped"] = f"building llama-server failed ({failure}); see {log}"
        return None, info
    built = {
        "llama_cpp_python_sdist": version,
        "source": str(source),
        "download_extract_s": round(download_s, 1),
        "build_s": round(time.monotonic() - compile_began, 1),
        "total_s": round(time.monotonic() - began, 1),
        "built_at": machine_info()["timestamp"],
    }
    record.write_text(json.dumps(built, indent=2) + "\n")
    print(f"  built {binary} in {built['total_s']:.0f} s", flush=True)
    return binary, info | built | {"built_now": True}


def llama_server_version(binary: Path) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        lines = (result.stdout + result.stderr).strip().splitlines()
        return next((line for line in lines if line.startswith("version")), None)
    return None


def llama_server_command(binary: Path, model: Path, port: int, slots: int) -> list[str]:
    return [
        str(binary),
        *("-m", str(model), "--host", "127.0.0.1", "--port", str(port)),
        *("-c", str(CONTEXT_LENGTH * slots), "-np", str(slots)),
        *("-t", str(THREADS), "-tb", str(THREADS), "--no-webui"),
    ]


# --- llama-cpp-python's server, in its own virtual env -----------------------------------------

_SERVER_CHECK = """
import llama_cpp, llama_cpp.server.app
print(llama_cpp.__version__, llama_cpp.__file__)
"""


def _server_venv_state(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    try:
        result = subprocess.run(
            [str(python), "-c", _SERVER_CHECK],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=venv,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _cached_wheel(version: str) -> Path | None:
    """llama-cpp-python's wheel as pip built and cached it earlier, when there is one."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python", "--format=abspath"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in result.stdout.splitlines():
        path = Path(line.strip())
        if path.name.startswith(f"llama_cpp_python-{version}-") and path.is_file():
            return path
    return None


def prepare_llamacpp_server(version: str) -> tuple[Path | None, dict[str, Any]]:
    """The env's python once it runs llama_cpp.server at `version`; None and why not otherwise.

    Installs the cached wheel with its [server] extras into a plain venv; without a cached
    wheel (a rebuild takes minutes), installs only the extras and a .pth onto our own
    site-packages, so the server uses this env's llama_cpp build. Our .venv is never touched.
    """
    venv = LLAMACPP_SERVER_VENV
    info: dict[str, Any] = {"venv": str(venv), "skipped": None}
    record = venv / "bench-install.json"
    state = _server_venv_state(venv)
    if state is None:
        log = BENCH_DIR / "llamacpp-server-install.log"
        print(f"  installing llama-cpp-python's server into {venv} (log: {log}) ...", flush=True)
        try:
            BENCH_DIR.mkdir(parents=True, exist_ok=True)
            log.write_text("")
            if not (venv / "bin" / "python").is_file():
                _run_logged([sys.executable, "-m", "venv", str(venv)], log, timeout=300)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
            wheel = _cached_wheel(version)
            if wheel is not None:
                _run_logged([*pip, f"{wheel}[server]"], log, timeout=1800)
                how = f"cached wheel {wheel.name} with [server] extras"
            else:
                extras = ["sse-starlette", "starlette-context", "pydantic-settings", "fastapi"]
                _run_logged([*pip, *extras, "uvicorn"], log, timeout=1800)
                _link_our_site_packages(venv)
                how = "server extras plus a .pth onto /work/main/.venv's llama_cpp"
            record.write_text(json.dumps({"installed": how}) + "\n")
        except (OSError, subprocess.SubprocessError) as exc:
            info["skipped"] = f"installing llama-cpp-python's server failed ({exc}); see {log}"
            print(f"  {info['skipped']}:\n{_tail(log)}", flush=True)
            return None, info
        state = _server_venv_state(venv)
        if state is None:
            info["skipped"] = f"llama_cpp.server is still not importable in {venv}; see {log}"
            return None, info
    with contextlib.suppress(OSError, ValueError):
        info |= json.loads(record.read_text())
    found, _, where = state.partition(" ")
    info |= {"llama_cpp_python": found, "llama_cpp_module": where}
    if found != version:
        info["skipped"] = f"{venv} has llama-cpp-python {found}, not {version}"
        return None, info
    return venv / "bin" / "python", info


def _link_our_site_packages(venv: Path) -> None:
    ours = Path(llama_cpp.__file__).resolve().parent.parent
    theirs = next((venv / "lib").glob("python*/site-packages"))
    (theirs / "palisade-bench-llama-cpp.pth").write_text(f"{ours}\n")


def llamacpp_server_command(python: Path, model: Path, port: int, threads: int | None) -> list[str]:
    """The issue's command (`threads` None: the server's own defaults), or with `threads`."""
    command = [
        *(str(python), "-m", "llama_cpp.server", "--model", str(model)),
        *("--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(CONTEXT_LENGTH)),
        *("--interrupt_requests", "False"),
    ]
    if threads is not None:
        command += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    return command


# --- running the targets --------------------------------------------------------------------


def settle(settings: Settings, *pids: int) -> bool:
    """Wait, at most `quiet_wait_s`, until other processes leave the cores to the targets."""
    waited, quiet = wait_idle([], [os.getpid(), *pids], settings.quiet_wait_s)
    if not quiet and settings.quiet_wait_s > 0:
        print(
            f"  other processes still used more than {QUIET_CORES:g} cores after "
            f"{waited:.0f} s; measuring anyway",
            flush=True,
        )
    return quiet


def appliance_config(model: Path) -> str:
    fields: dict[str, object] = {"path": str(model), "context_length": CONTEXT_LENGTH}
    return model_toml(**fields, **BATCHING_KEYS)


def appliance_command(config: Path, port: int) -> list[str]:
    """`palisade appliance serve` as the benchmark runs it, for the checkout and a baseline."""
    return [
        *(sys.executable, "-m", "palisade", "appliance", "serve", "--config", str(config)),
        *("--no-auth", "--host", "127.0.0.1", "--port", str(port)),
    ]


def appliance_environment(home: Path, source: Path) -> dict[str, str]:
    """The appliance's environment: `source`'s packages come first (before the installed
    ones)."""
    return os.environ | {
        "PALISADE_HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(source),
    }


def start_appliance(
    stack: contextlib.ExitStack, name: str, model: Path, scratch: Path, source: Path = REPO
) -> Target:
    """The appliance of `source` (this checkout, or a baseline's worktree), each started the
    same way, from its own home folder (so `python -m` puts no other tree first)."""
    home = scratch / name.replace("@", "-")
    home.mkdir(parents=True)
    config = home / "appliance.toml"
    config.write_text(appliance_config(model))
    port = _free_port()
    command = appliance_command(config, port)
    environment = appliance_environment(home, source)
    _check_imports_from(source, home, environment)
    server = stack.enter_context(
        run_process(
            name,
            command,
            url=f"http://127.0.0.1:{port}",
            ready_path="/readyz",
            log=home / "appliance.log",
            ready_timeout=300,
            env=environment,
        )
    )
    endpoint = Endpoint(f"{server.url}/v1/chat/completions", DEFAULT_MODEL_ID)
    shown = [f"PYTHONPATH={source}", *command]
    return Target(name, endpoint, server.process.pid, server.tail, shown)


_WHERE_FROM = "import appliance, palisade; print(appliance.__file__); print(palisade.__file__)"


def _check_imports_from(source: Path, home: Path, environment: dict[str, str]) -> None:
    """Refuse to measure an appliance whose packages would not come from `source`."""
    result = subprocess.run(
        [sys.executable, "-c", _WHERE_FROM],
        capture_output=True,
        text=True,
        cwd=home,
        env=environment,
        timeout=120,
        check=False,
    )
    found = result.stdout.split()
    if result.returncode != 0 or not all(Path(f).is_relative_to(source) for f in found):
        raise RuntimeError(
            f"the appliance's packages do not import from {source}: {result.stdout}{result.stderr}"
        )


# --- the baseline: another commit's appliance, checked out beside the checkout ----------------


def resolve_revision(revision: str) -> str:
    """The full commit id `revision` names in this repository (ValueError when none)."""
    result = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise ValueError(f"{revision!r} is not a commit of {REPO}")
    return result.stdout.strip()


@contextlib.contextmanager
def baseline_worktree(commit: str, where: Path) -> Iterator[Path]:
    """A detached worktree of `commit` at `where`, removed (and pruned) afterwards."""
    git = ["git", "-C", str(REPO), "worktree"]
    added = subprocess.run(
        [*git, "add", "--detach", str(where), commit],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if added.returncode != 0:
        raise RuntimeError(f"git worktree add {commit} failed: {added.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(
            [*git, "remove", "--force", str(where)], capture_output=True, timeout=300, check=False
        )
        subprocess.run([*git, "prune"], capture_output=True, timeout=300, check=False)


def start_server(
    stack: contextlib.ExitStack, name: str, command: list[str], *, url: str, ready_path: str,
    scratch: Path,
) -> Target:  # fmt: skip
    """An external OpenAI-compatible server, started and stopped with the stack."""
    server = stack.enter_context(
        run_process(
            name,
            command,
            url=url,
            ready_path=ready_path,
            log=scratch / f"{name}.log",
            ready_timeout=300,
        )
    )
    # llama-cpp-python's server defaults to a repeat penalty of 1.1; all decode with none.
    endpoint = Endpoint(f"{url}/v1/chat/completions", DEFAULT_MODEL_ID, {"repeat_penalty": 1.0})
    return Target(name, endpoint, server.process.pid, server.tail)


# --- summary ------------------------------------------------------------------------------------


def _token_range(counts: Sequence[int]) -> dict[str, int]:
    return {"min": min(counts, default=0), "max": max(counts, default=0), "total": sum(counts)}


def summarize_rounds(rounds: list[Round]) -> dict[str, Any]:
    streams = [stream for done in rounds for stream in done.streams]
    ttfts = [stream.ttft_ms for stream in streams]
    errors: dict[str, int] = {}
    for done in rounds:
        for kind, count in done.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    aggregates = [done.aggregate_tok_s for done in rounds]
    decodes = [
        (stream.completion_tokens - 1) / (stream.ended - stream.first)
        for stream in streams
        if stream.completion_tokens > 1 and stream.ended > stream.first
    ]
    return {
        "aggregate_tok_s": statistics.median(aggregates) if aggregates else None,
        # Per stream, after its first token: what "raw in-process decode" is compared with.
        "decode_tok_s": statistics.median(decodes) if decodes else None,
        "aggregate_tok_s_rounds": aggregates,
        "round_seconds": [done.seconds for done in rounds],
        "ttft_p50_ms": percentile(ttfts, 0.50),
        "ttft_p99_ms": percentile(ttfts, 0.99),
        "ttft_max_ms": max(ttfts, default=None),
        "requests": sum(done.concurrency for done in rounds),
        "ok": len(streams),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "completion_tokens": _token_range([stream.completion_tokens for stream in streams]),
        "tokens_from": sorted({stream.tokens_from for stream in streams}),
    }


def _value(results: dict[str, Any], target: str, streams: int, key: str) -> float | None:
    row = results.get(target, {}).get(str(streams))
    value: float | None = row.get(key) if row else None
    return value


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def ratios(results: dict[str, Any], raw: dict[str, Any] | None) -> dict[str, float | None]:
    ours = _value(results, "appliance", JUDGED_STREAMS, "aggregate_tok_s")
    single = _value(results, "appliance", 1, "aggregate_tok_s")
    return {
        f"appliance_vs_llama_server_{JUDGED_STREAMS}": _ratio(
            ours, _value(results, "llama-server", JUDGED_STREAMS, "aggregate_tok_s")
        ),
        **{
            f"appliance_vs_{name.replace('-', '_')}_{JUDGED_STREAMS}": _ratio(
                ours, _value(results, name, JUDGED_STREAMS, "aggregate_tok_s")
            )
            for name in LLAMACPP_SERVERS
        },
        "appliance_1_vs_raw": _ratio(single, raw["aggregate_tok_s"] if raw else None),
        "appliance_1_decode_vs_raw": _ratio(
            _value(results, "appliance", 1, "decode_tok_s"), raw["decode_tok_s"] if raw else None
        ),
    }


def constrained(appliance: Target) -> Target:
    """`appliance` with every other stream of a round constrained by a JSON schema."""
    endpoint = dataclasses.replace(appliance.endpoint, odd_extra={"response_format": STORY_FORMAT})
    return dataclasses.replace(appliance, name=GRAMMAR_TARGET, endpoint=endpoint)


def grammar_ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """Per concurrency, the constrained mix's aggregate tok/s over the all-free appliance's."""
    free = results.get("appliance", {})
    return {
        streams: _ratio(row["aggregate_tok_s"], free.get(streams, {}).get("aggregate_tok_s"))
        for streams, row in results.get(GRAMMAR_TARGET, {}).items()
    }


def baseline_ratios(results: dict[str, Any], baseline: str) -> dict[str, dict[str, float | None]]:
    """Per concurrency, the appliance's figures over the baseline's: aggregate tok/s (median
    rounds, and the median of the ratios of rounds run side by side) and TTFT p50."""
    found: dict[str, dict[str, float | None]] = {}
    for streams, row in results.get("appliance", {}).items():
        base = results.get(baseline, {}).get(streams)
        if base is None:
            continue
        paired = [
            ours / theirs
            for ours, theirs in zip(
                row["aggregate_tok_s_rounds"], base["aggregate_tok_s_rounds"], strict=False
            )
            if theirs > 0
        ]
        found[streams] = {
            "aggregate_tok_s": _ratio(row["aggregate_tok_s"], base["aggregate_tok_s"]),
            "aggregate_tok_s_paired_median": statistics.median(paired) if paired else None,
            "ttft_p50_ms": _ratio(row["ttft_p50_ms"], base["ttft_p50_ms"]),
        }
    return found


def judge_baseline(found: dict[str, dict[str, float | None]], baseline: str) -> list[Any]:
    """No regression: tok/s at least BASELINE_RATIO of the baseline's, TTFT p50 at most its
    inverse, at every concurrency measured."""
    rows = []
    for streams, ratio in found.items():
        throughput, ttft = ratio["aggregate_tok_s"], ratio["ttft_p50_ms"]
        rows.append(
            _target(
                f"appliance / {baseline} agg tok/s, {_streams(streams)}",
                throughput,
                "ratio",
                f">= {BASELINE_RATIO:g}x",
                _at_least(throughput, BASELINE_RATIO),
            )
        )
        rows.append(
            _target(
                f"appliance / {baseline} TTFT p50, {_streams(streams)}",
                ttft,
                "ratio",
                f"<= {1 / BASELINE_RATIO:.3f}x",
                None if ttft is None else ttft <= 1 / BASELINE_RATIO,
            )
        )
    return rows


def _streams(count: str) -> str:
    return f"{count} stream" if count == "1" else f"{count} streams"


def _target(name: str, value: float | None, unit: str, goal: str, met: bool | None) -> Any:
    return {"name": name, "value": value, "unit": unit, "goal": goal, "met": met}


def _at_least(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def judge(results: dict[str, Any], found: dict[str, float | None]) -> list[dict[str, Any]]:
    ttft = _value(results, "appliance", JUDGED_STREAMS, "ttft_p99_ms")
    return [
        _target(
            f"appliance / llama-server, {JUDGED_STREAMS} streams",
            found[f"appliance_vs_llama_server_{JUDGED_STREAMS}"],
            "x",
            f">= {LLAMA_SERVER_RATIO:g}x",
            _at_least(found[f"appliance_vs_llama_server_{JUDGED_STREAMS}"], LLAMA_SERVER_RATIO),
        ),
        *(
            _target(
                f"appliance / {name}, {JUDGED_STREAMS} streams",
                found[f"appliance_vs_{name.replace('-', '_')}_{JUDGED_STREAMS}"],
                "x",
                f">= {LLAMACPP_SERVER_RATIO:g}x",
                _at_least(
                    found[f"appliance_vs_{name.replace('-', '_')}_{JUDGED_STREAMS}"],
                    LLAMACPP_SERVER_RATIO,
                ),
            )
            for name in LLAMACPP_SERVERS
        ),
        _target(
            "appliance 1 stream decode / raw in-process decode",
            found["appliance_1_decode_vs_raw"],
            "x",
            f">= {RAW_RATIO:.0%}",
            _at_least(found["appliance_1_decode_vs_raw"], RAW_RATIO),
        ),
        _target(
            "appliance 1 stream / raw, incl. first token",
            found["appliance_1_vs_raw"],
            "x",
            "(shown)",
            None,
        ),
        _target(
            f"appliance TTFT p99, {JUDGED_STREAMS} streams",
            ttft,
            "ms",
            f"<= {TTFT_P99_MS:g} ms",
            None if ttft is None else ttft <= TTFT_P99_MS,
        ),
    ]


def _deliberate(why: str) -> bool:
    return why.startswith("--") or why == NOT_CHOSEN


def warnings(
    results: dict[str, Any],
    raw: dict[str, Any] | None,
    contention: dict[str, dict[str, float] | None],
    skipped: dict[str, str],
) -> list[str]:
    # A target left out on purpose (--skip-…, --targets) is not a warning, one that failed is.
    failed = {target: why for target, why in skipped.items() if not _deliberate(why)}
    found = [f"{target} skipped: {why}" for target, why in failed.items()]
    for target, used in contention.items():
        if used is not None and max(used.values()) > BUSY_CORES:
            found.append(
                f"{target}: other processes used {used['other_cores']:.2f} cores and the "
                f"hypervisor stole {used['stolen_cores']:.2f} on average: its figures are "
                "unreliable; rerun on a quiet machine"
            )
    short = []
    for target, rows in results.items():
        for streams, row in rows.items():
            if row["errors"]:
                found.append(f"{target}, {streams} streams: {row['errors']} requests failed")
            if row["completion_tokens"]["min"] < MAX_TOKENS:
                short.append(f"{target}/{streams}: {row['completion_tokens']['min']}")
    if raw is not None and raw["completion_tokens"]["min"] < MAX_TOKENS:
        short.append(f"raw/1: {raw['completion_tokens']['min']}")
    if short:
        found.append(
            f"some streams ended before {MAX_TOKENS} tokens (fewest: {', '.join(short)}); "
            "tokens/s counts the tokens actually produced"
        )
    return found


# --- report -------------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("PASS" if met else "MISS")


def _shown(row: dict[str, Any]) -> str:
    value, unit = row["value"], row["unit"]
    if value is None:
        return "n/a"
    if unit == "ratio":
        return f"{value:.3f}x"
    return f"{value:,.0f} ms" if unit == "ms" else f"{value:.2f}x"


def print_table(
    summary: dict[str, Any], settings: Settings, found: list[str], skipped: dict[str, str]
) -> None:
    print(
        f"\nBatching benchmark: {summary['model']}, greedy, max_tokens {MAX_TOKENS}, "
        f"{THREADS} threads, {settings.rounds} rounds per concurrency (median aggregate; "
        "TTFT over all requests)"
    )
    name = max([17, *(len(target) + 2 for target in summary["results"])])
    print(
        f"  {'target':<{name}}{'streams':>8}{'agg tok/s':>11}{'TTFT p50 ms':>13}"
        f"{'TTFT p99 ms':>13}{'tokens/stream':>15}{'errors':>8}"
    )
    raw = summary["raw"]
    if raw is not None:
        tokens = raw["completion_tokens"]
        print(
            f"  {'raw (in-process)':<{name}}{1:>8}{_num(raw['aggregate_tok_s'], '.1f'):>11}"
            f"{_num(raw['ttft_p50_ms'], ',.0f'):>13}{_num(raw['ttft_p99_ms'], ',.0f'):>13}"
            f"{_span(tokens):>15}{0:>8}"
        )
    for target, rows in summary["results"].items():
        for streams, row in rows.items():
            print(
                f"  {target:<{name}}{streams:>8}{_num(row['aggregate_tok_s'], '.1f'):>11}"
                f"{_num(row['ttft_p50_ms'], ',.0f'):>13}{_num(row['ttft_p99_ms'], ',.0f'):>13}"
                f"{_span(row['completion_tokens']):>15}{row['errors']:>8}"
            )
    if raw is not None:
        print(f"  raw decode-only speed (after the first token): {raw['decode_tok_s']:.1f} tok/s")
    if summary.get("baseline"):
        print_baseline(summary["baseline"])
    # Targets about what was not measured (a peer skipped, no raw) have no value to show.
    shown_rows = [row for row in summary["targets"] if row["value"] is not None]
    if shown_rows:
        print("\n  Targets (informational, never asserted)")
        width = max([40, *(len(row["name"]) + 2 for row in shown_rows)])
        print(f"  {'':<{width}}{'value':>10}{'goal':>13}{'result':>8}")
    for row in shown_rows:
        shown, verdict = _shown(row), _verdict(row["met"])
        print(f"  {row['name']:<{width}}{shown:>10}{row['goal']:>13}{verdict:>8}")
    for note in summary["notes"]:
        print(f"  NOTE: {note}")
    left_out = [target for target, why in skipped.items() if _deliberate(why)]
    if left_out:
        print(f"  not measured (as asked): {', '.join(left_out)}")
    for warning in found:
        print(f"  WARNING: {warning}")


def print_baseline(baseline: dict[str, Any]) -> None:
    print(
        f"\n  Against the baseline {baseline['target']} ({baseline['commit']}): "
        "appliance / baseline, same rounds"
    )
    print(f"  {'streams':>9}{'agg tok/s':>11}{'paired rounds':>15}{'TTFT p50':>10}")
    for streams, ratio in baseline["ratios"].items():
        print(
            f"  {streams:>9}{_num(ratio['aggregate_tok_s'], '.3f'):>11}"
            f"{_num(ratio['aggregate_tok_s_paired_median'], '.3f'):>15}"
            f"{_num(ratio['ttft_p50_ms'], '.3f'):>10}"
        )


def _span(tokens: dict[str, int]) -> str:
    low, high = tokens["min"], tokens["max"]
    return str(low) if low == high else f"{low}-{high}"


def write_json(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "batching.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


# --- the run --------------------------------------------------------------------------------


# Builds and installs come first, so they never share the cores with a measurement.


def _llama_server(
    settings: Settings, version: str, skipped: dict[str, str]
) -> tuple[Path | None, dict[str, Any]]:
    if not settings.llama_server:
        skipped["llama-server"] = "--skip-llama-server"
        return None, {}
    binary, info = prepare_llama_server(version)
    if binary is None:
        skipped["llama-server"] = info["skipped"]
    else:
        info["version"] = llama_server_version(binary)
    return binary, info


def _llamacpp_server(
    settings: Settings, version: str, skipped: dict[str, str]
) -> tuple[Path | None, dict[str, Any]]:
    if not settings.llamacpp_server:
        skipped |= dict.fromkeys(LLAMACPP_SERVERS, "--skip-llamacpp-server")
        return None, {}
    python, info = prepare_llamacpp_server(version)
    if python is None:
        skipped |= dict.fromkeys(LLAMACPP_SERVERS, info["skipped"])
        print(f"  llamacpp-server skipped: {info['skipped']}", flush=True)
    return python, info


def run(*, out_dir: Path, settings: Settings | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write `out_dir`/batching.json; returns the summary."""
    settings = settings or Settings()
    model = default_model_path()
    version: str = llama_cpp.__version__
    commit = resolve_revision(settings.baseline) if settings.baseline else None
    baseline = f"appliance@{commit[:7]}" if commit else None
    chosen = ["raw"] if settings.raw else []
    chosen += ["appliance"] + ([GRAMMAR_TARGET] if settings.grammar else [])
    chosen += [baseline] if baseline else []
    chosen += ["llama-server"] if settings.llama_server else []
    chosen += list(LLAMACPP_SERVERS) if settings.llamacpp_server else []
    streams = ", ".join(str(c) for c in settings.streams)
    print(
        f"Batching benchmark: {', '.join(chosen)}; {model.name}, {streams} streams, "
        f"{settings.rounds} rounds, max_tokens {MAX_TOKENS}",
        flush=True,
    )
    skipped: dict[str, str] = {} if settings.raw else {"raw": NOT_CHOSEN}
    binary, llama_server = _llama_server(settings, version, skipped)
    python, llamacpp_server = _llamacpp_server(settings, version, skipped)
    schedule = prompt_schedule(settings.streams, settings.rounds)
    commands: dict[str, Any] = {"appliance_config": appliance_config(model)}
    tails: dict[str, str] = {}
    with (
        tempfile.TemporaryDirectory(prefix="batching-bench-", dir=_mkdir(out_dir)) as scratch_dir,
        contextlib.ExitStack() as stack,
    ):
        scratch = Path(scratch_dir)
        targets = [start_appliance(stack, "appliance", model, scratch)]
        if settings.grammar:  # its own server: a shared one would evict the free one's cache
            targets.append(constrained(start_appliance(stack, GRAMMAR_TARGET, model, scratch)))
        if commit is not None and baseline is not None:
            source = stack.enter_context(baseline_worktree(commit, scratch / "baseline-source"))
            targets.append(start_appliance(stack, baseline, model, scratch, source))
        commands |= {target.name: target.command for target in targets}
        externals: list[tuple[str, list[str], int, str]] = []
        if binary is not None:
            port = _free_port()
            command = llama_server_command(binary, model, port, MAX_SEQUENCES)
            externals.append(("llama-server", command, port, "/health"))
        if python is not None:
            for name, threads in LLAMACPP_SERVERS.items():
                port = _free_port()
                command = llamacpp_server_command(python, model, port, threads)
                externals.append((name, command, port, "/v1/models"))
        for name, command, port, ready_path in externals:
            commands[name] = command
            url = f"http://127.0.0.1:{port}"
            try:
                targets.append(
                    start_server(
                        stack, name, command, url=url, ready_path=ready_path, scratch=scratch
                    )
                )
            except (RuntimeError, TimeoutError, OSError) as exc:
                skipped[name] = f"{name} failed: {exc}"[:2000]
                print(f"  {name} skipped: {skipped[name]}", flush=True)
        raw = RawEngine(model) if settings.raw else None
        if raw is not None:
            stack.callback(raw.close)
        pids = [target.pid for target in targets]
        quiet = settle(settings, *pids)
        watch = CpuWatch(os.getpid(), *pids)
        measured, raw_runs = asyncio.run(
            measure_interleaved(targets, raw, schedule, settings.timeout_s)
        )
        contention = {"run": watch.report()}
        tails = {target.name: target.tail() for target in targets}
    raw_summary = summarize_raw(raw_runs)
    results: dict[str, Any] = {
        name: {str(concurrency): summarize_rounds(rounds) for concurrency, rounds in rows.items()}
        for name, rows in measured.items()
    }
    notes: list[str] = []
    for target, rows in results.items():
        if any("deltas" in row["tokens_from"] for row in rows.values()):
            notes.append(
                f"{target} sent no usage in its streams: its completion tokens are counted "
                "one per content delta"
            )
    found_ratios = ratios(results, raw_summary)
    judged = judge(results, found_ratios)
    grammar = grammar_ratios(results)
    judged += [
        _target(
            f"{GRAMMAR_TARGET} / appliance agg tok/s, {_streams(s)}", r, "ratio", "(shown)", None
        )
        for s, r in grammar.items()
    ]
    against: dict[str, Any] | None = None
    if baseline is not None:
        versus = baseline_ratios(results, baseline)
        against = {"revision": settings.baseline, "commit": commit, "target": baseline}
        against["ratios"] = versus
        judged += judge_baseline(versus, baseline)
    summary: dict[str, Any] = {
        "model": model.name,
        "targets_measured": ["raw", *results] if raw_summary else list(results),
        "raw": raw_summary,
        "results": results,
        "ratios": found_ratios,
        "baseline": against,
        "grammar_vs_free": grammar,
        "targets": judged,
        "contention": contention,
        "notes": notes,
    }
    found = warnings(results, raw_summary, contention, skipped)
    if not quiet:
        found.append(f"the run started while other processes used more than {QUIET_CORES:g} cores")
    print_table(summary, settings, found, skipped)
    report = {
        "benchmark": "batching",
        "machine": machine_info()
        | {"llama_server": llama_server or None, "llamacpp_server": llamacpp_server or None},
        "setup": {
            "model": model.name,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "context_length": CONTEXT_LENGTH,
            "threads": THREADS,
            "streams": list(settings.streams),
            "rounds": settings.rounds,
            "baseline": against and {k: v for k, v in against.items() if k != "ratios"},
            "timeout_s": settings.timeout_s,
            "quiet_wait_s": settings.quiet_wait_s,
            "warmup": f"1 then {max(settings.streams)} streams, max_tokens {WARMUP_TOKENS}",
            "order": "interleaved: each round goes to every target in turn, rotating",
            "prompt_example": PROMPTS[0],
            "distinct_prompts": len(PROMPTS),
            "commands": commands,
        },
        "summary": summary,
        "skipped": skipped,
        "warnings": found,
        "log_tails": tails,
    }
    path = write_json(report, out_dir)
    print(f"\nwrote {path}")
    return summary


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
