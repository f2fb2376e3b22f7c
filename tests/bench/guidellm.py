"""guidellm lane: the usual serving benchmark, with its defaults, against the appliance and
against the router in front of it, in one run.

guidellm (pinned to GUIDELLM_VERSION) lives in its own virtual env, var/bench/guidellm-venv,
installed by this benchmark: a CPU build of torch first (guidellm needs torch, and the
index's default build pulls in gigabytes of CUDA libraries), then guidellm and gguf. The
Hugging Face hub may be out of reach, so guidellm's tokenizer is the default model's own:
transformers exports it from the GGUF (`gguf_file=`) into var/bench/guidellm-tokenizer, and
guidellm runs offline (HF_HUB_OFFLINE=1).

Targets, real processes on 127.0.0.1: `palisade router serve` and one appliance (llama.cpp,
the default model, one thread: see THREADS) that joined it. guidellm runs its default
profile, a sweep (synchronous, throughput, then constant rates evenly spaced between the
two; the throughput step at `max_concurrency` streams, 16 rather than guidellm's 512: see
Settings), over synthetic prompts of `prompt_tokens` with `output_tokens` each (guidellm
sends `ignore_eos`, so every answer has that length), each benchmark bounded to `seconds`;
first straight to the appliance (a key of its own tenancy), then through the router (an org
key). The appliance's queue (`max_queue`) would hold even guidellm's 512 streams instead of
refusing most of them with 503 queue_full, as vLLM's unbounded queue would. The table shows
guidellm's figures per sweep step for both targets and the ratios router / appliance;
guidellm's own JSON reports and logs are kept under var/bench/guidellm/. guidellm, the
router and the appliance share the machine: only ratios mean much, and nothing is asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from appliance import DEFAULT_MODEL_ID
from tests.bench.batching import _run_logged, _tail
from tests.bench.engine import BUSY_CORES, CpuWatch, machine_info
from tests.e2e.fleet import Fleet, running_fleet
from tests.federation.tenants import Admin
from tests.support import REPO, default_model_path, model_toml

GUIDELLM_VERSION = "0.8.1"
BENCH_DIR = REPO / "var" / "bench"  # always here, whatever --out says: installed once
VENV = BENCH_DIR / "guidellm-venv"
TOKENIZER_DIR = BENCH_DIR / "guidellm-tokenizer"
INSTALL_LOG = BENCH_DIR / "guidellm-install.log"
REGION = "bench"
NODE = "bench-1"
MAX_QUEUE = 1024  # room for guidellm's default throughput step (512 streams at once)
# llama.cpp's threads wait on each other at every step, so on a machine whose other core runs
# guidellm and the router, one thread decodes several times faster than two (measured here:
# 64 tokens in 1.7 s with one thread, 11 to 27 s with two, the machine busy).
THREADS = 1
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TARGETS = ("appliance", "router")


@dataclass(frozen=True)
class Settings:
    seconds: float = 30.0
    prompt_tokens: int = 64
    output_tokens: int = 32
    sweep_size: int = 10  # guidellm's default
    # The sweep's throughput step, and so its highest rate. guidellm's default (512) is made
    # for GPU servers: here, 512 streams queued on one CPU appliance finished none within a
    # 30 s step, the sweep's rates collapsed to 0 and guidellm aborted. 16 fills the
    # appliance's batch (`max_sequences`).
    max_concurrency: int = 16


# --- guidellm, in its own virtual env ---------------------------------------------------------

_CHECK = """
import importlib.metadata, gguf, torch, transformers
print(importlib.metadata.version("guidellm"))
"""


def _installed(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not (python.is_file() and (venv / "bin" / "guidellm").is_file()):
        return None
    try:
        result = subprocess.run(
            [str(python), "-c", _CHECK], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def prepare_guidellm(venv: Path = VENV) -> tuple[Path | None, str | None]:
    """(the env's python, None) once it has guidellm GUIDELLM_VERSION; (None, why not)."""
    python = venv / "bin" / "python"
    if _installed(venv) == GUIDELLM_VERSION:
        return python, None
    print(f"  installing guidellm {GUIDELLM_VERSION} into {venv} (log: {INSTALL_LOG}) ...")
    try:
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        INSTALL_LOG.write_text("")
        if not python.is_file():
            _run_logged([sys.executable, "-m", "venv", str(venv)], INSTALL_LOG, timeout=300)
        _install_cpu_torch(python)
        pip = [str(python), "-m", "pip", "install", "-q"]
        _run_logged([*pip, f"guidellm=={GUIDELLM_VERSION}", "gguf"], INSTALL_LOG, timeout=3600)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"installing guidellm failed ({exc}); see {INSTALL_LOG}"
    found = _installed(venv)
    if found != GUIDELLM_VERSION:
        return None, f"{venv} has guidellm {found}, not {GUIDELLM_VERSION}; see {INSTALL_LOG}"
    return python, None


def _install_cpu_torch(python: Path) -> None:
    """A torch wheel pip already has on this machine (its find-links), so that guidellm's
    own install does not pull a CUDA build of several GB; without one, guidellm's install
    takes torch from the package index."""
    pip = [str(python), "-m", "pip"]
    with tempfile.TemporaryDirectory() as wheels:
        fetch = [*pip, "download", "-q", "--no-index", "--no-deps", "torch", "-d", wheels]
        with contextlib.suppress(subprocess.CalledProcessError):
            _run_logged(fetch, INSTALL_LOG, timeout=600)
        local = sorted(Path(wheels).glob("torch-*.whl"))
        if local:
            _run_logged([*pip, "install", "-q", str(local[-1])], INSTALL_LOG, timeout=3600)


_EXPORT = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
model = Path(sys.argv[1])
AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name).save_pretrained(sys.argv[2])
"""


def export_tokenizer(python: Path, model: Path) -> Path:
    """The model's tokenizer as a Hugging Face tokenizer directory (made once per model)."""
    stamp = TOKENIZER_DIR / "palisade-source.json"
    source = {"model": model.name, "bytes": model.stat().st_size}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == source and (TOKENIZER_DIR / "tokenizer.json").is_file():
            return TOKENIZER_DIR
    print(f"  exporting {model.name}'s tokenizer to {TOKENIZER_DIR} ...", flush=True)
    command = [str(python), "-c", _EXPORT, str(model), str(TOKENIZER_DIR)]
    subprocess.run(command, check=True, timeout=600, env=os.environ | OFFLINE,
                   capture_output=True)  # fmt: skip
    stamp.write_text(json.dumps(source) + "\n")
    return TOKENIZER_DIR


# --- the targets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    key: str


@contextlib.contextmanager
def run_targets(scratch: Path, model: Path) -> Iterator[tuple[Fleet, list[Target]]]:
    """A router and one appliance that joined it; a key for each (neither limited)."""
    config = model_toml(path=str(model), max_queue=MAX_QUEUE, threads=THREADS)
    with running_fleet(scratch) as fleet:
        member = fleet.start_member(NODE, REGION, config)
        fleet.wait_joined(NODE, timeout=180)
        local = Admin(member.url, (member.home / "admin.key").read_text().strip())
        local.create_org("bench-local", [REGION])
        appliance_key = local.member("bench-local", "org_user", "bench@local.test").key
        router_key = fleet.org_key("bench", [REGION])
        yield (
            fleet,
            [
                Target("appliance", member.url, appliance_key),
                Target("router", fleet.router.url, router_key),
            ],
        )


def guidellm_command(
    python: Path, target: Target, tokenizer: Path, report: Path, settings: Settings
) -> list[str]:
    # On the command line (guidellm reads it nowhere else), but the key is a throwaway of the
    # benchmark's own fleet, and guidellm masks it in its logs and reports.
    backend = f"kind=openai_http,target={target.url},model={DEFAULT_MODEL_ID},api_key={target.key}"
    data = (
        f"kind=synthetic_text,prompt_tokens={settings.prompt_tokens},"
        f"output_tokens={settings.output_tokens}"
    )
    return [
        str(python.parent / "guidellm"), "run",
        "--backend", backend,
        "--profile",
        f"kind=sweep,sweep_size={settings.sweep_size},max_concurrency={settings.max_concurrency}",
        "--constraint", f"kind=max_duration,seconds={settings.seconds:g}",
        "--data", data,
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
        "--output", f"kind=json,path={report}",
        "--output", "kind=console",
        "--disable-progress",
    ]  # fmt: skip


@dataclass
class Sweep:
    """One guidellm run: its report (None if it failed, and why), time and contention."""

    target: str
    report: Path | None
    wall_s: float
    other_cores: float | None
    failure: str | None = None


def run_guidellm(
    python: Path, target: Target, tokenizer: Path, out_dir: Path, *, settings: Settings,
    servers: list[int],
) -> Sweep:  # fmt: skip
    """guidellm's sweep against `target`; `servers` are the PIDs of the fleet's processes."""
    report = out_dir / f"{target.name}.json"
    report.unlink(missing_ok=True)
    log = out_dir / f"{target.name}.log"
    command = guidellm_command(python, target, tokenizer, report, settings)
    print(f"  guidellm sweep against the {target.name} ({target.url}), log {log} ...", flush=True)
    watch = CpuWatch(os.getpid(), *servers)
    before, started = os.times(), time.monotonic()
    with log.open("w") as out:
        returncode = _run_in_own_group(
            command,
            out,
            env=os.environ | OFFLINE | {"COLUMNS": "200"},
            cwd=out_dir,
            timeout=settings.sweep_size * (settings.seconds + 300) + 600,
        )
    wall, contention, after = time.monotonic() - started, watch.report(), os.times()
    # guidellm and its workers, reaped by now, are ours too, not other processes.
    guidellm_cpu = (after.children_user + after.children_system) - (
        before.children_user + before.children_system
    )
    other = None
    if contention is not None:
        other = max(0.0, contention["other_cores"] - guidellm_cpu / wall)
    if returncode != 0 or not report.is_file():
        failure = f"guidellm failed against the {target.name}:\n{_tail(log, 15)}"
        print(f"  {failure}", flush=True)
        return Sweep(target.name, None, wall, other, failure)
    return Sweep(target.name, report, wall, other)


def _run_in_own_group(
    command: list[str], out: IO[str], *, env: dict[str, str], cwd: Path, timeout: float
) -> int:
    """Run `command` in a process group of its own and return its exit code; whatever it
    left behind (guidellm's worker processes) is ended with the group, even on Ctrl-C."""
    process = subprocess.Popen(
        command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
    )
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1
    finally:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


# --- figures ----------------------------------------------------------------------------------


def _stat(metrics: dict[str, Any], name: str, group: str, statistic: str) -> float | None:
    value = metrics.get(name, {}).get(group, {})
    found = value.get("percentiles", {}).get(statistic) if statistic.startswith("p") else None
    found = value.get(statistic) if found is None else found
    return float(found) if isinstance(found, int | float) else None


def _strategy(config: dict[str, Any]) -> str:
    """guidellm's name for a step: `synchronous`, `throughput@512`, `constant@1.23/s`."""
    strategy = config["strategy"]
    kind: str = strategy["type_"]
    if isinstance(rate := strategy.get("rate"), int | float):
        return f"{kind}@{rate:.2f}/s"
    if kind == "throughput" and isinstance(streams := strategy.get("max_concurrency"), int):
        return f"{kind}@{streams}"
    return kind


def steps(report: Path) -> list[dict[str, Any]]:
    """Per benchmark of the sweep: guidellm's headline figures (latencies of completed
    requests; throughput of all, as guidellm's own console shows it)."""
    found = []
    for benchmark in json.loads(report.read_text())["benchmarks"]:
        metrics = benchmark["metrics"]
        totals = metrics["request_totals"]
        found.append(
            {
                "strategy": _strategy(benchmark["config"]),
                "completed": totals["successful"],
                "errored": totals["errored"],
                "incomplete": totals["incomplete"],
                "requests_per_s": _stat(metrics, "requests_per_second", "successful", "mean"),
                "output_tok_per_s": _stat(metrics, "output_tokens_per_second", "total", "mean"),
                "ttft_median_ms": _stat(metrics, "time_to_first_token_ms", "successful", "median"),
                "ttft_p95_ms": _stat(metrics, "time_to_first_token_ms", "successful", "p95"),
                "itl_median_ms": _stat(metrics, "inter_token_latency_ms", "successful", "median"),
                "tpot_median_ms": _stat(
                    metrics, "time_per_output_token_ms", "successful", "median"
                ),
            }
        )
    return found


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


RATIO_KEYS = ("requests_per_s", "output_tok_per_s", "ttft_median_ms", "itl_median_ms")


def ratios(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Router / appliance, step by step of the two sweeps (same position, same kind)."""
    return [
        {"step": index, "strategy": theirs["strategy"]}
        | {key: _ratio(ours[key], theirs[key]) for key in RATIO_KEYS}
        for index, (theirs, ours) in enumerate(
            zip(results["appliance"], results["router"], strict=False)
        )
    ]


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[str, list[dict[str, Any]]], found: list[dict[str, Any]]) -> None:
    shown = [name for name in TARGETS if name in results]
    if not shown:
        print("\n  no figures: every guidellm run failed")
        return
    print(
        f"\n  {'step':<24}{'target':<11}{'done':>6}{'err':>6}{'req/s':>8}{'out tok/s':>11}"
        f"{'TTFT p50 ms':>13}{'TTFT p95 ms':>13}{'ITL p50 ms':>12}"
    )
    for index in range(max(len(results[name]) for name in shown)):
        for target in shown:
            if index < len(results[target]):
                _print_row(target, results[target][index])
        if index < len(found):
            ratio = found[index]
            print(
                f"  {'':<24}{'router/app':<11}{'':>12}"
                f"{_num(ratio['requests_per_s'], '.2f'):>8}"
                f"{_num(ratio['output_tok_per_s'], '.2f'):>11}"
                f"{_num(ratio['ttft_median_ms'], '.2f'):>13}{'':>13}"
                f"{_num(ratio['itl_median_ms'], '.2f'):>12}"
            )


def _print_row(target: str, row: dict[str, Any]) -> None:
    print(
        f"  {row['strategy']:<24}{target:<11}{row['completed']:>6}{row['errored']:>6}"
        f"{_num(row['requests_per_s'], '.2f'):>8}{_num(row['output_tok_per_s'], '.1f'):>11}"
        f"{_num(row['ttft_median_ms'], '.1f'):>13}{_num(row['ttft_p95_ms'], '.1f'):>13}"
        f"{_num(row['itl_median_ms'], '.2f'):>12}"
    )


def warnings(sweeps: list[Sweep]) -> list[str]:
    found = [sweep.failure for sweep in sweeps if sweep.failure is not None]
    found.extend(
        f"other processes used {sweep.other_cores:.2f} cores on average during the "
        f"{sweep.target} sweep: its figures are unreliable; rerun on a quiet machine"
        for sweep in sweeps
        if sweep.other_cores is not None and sweep.other_cores > BUSY_CORES
    )
    return found


# --- the run ----------------------------------------------------------------------------------


def run(*, out_dir: Path, settings: Settings | None = None) -> dict[str, Any]:
    """Install guidellm if needed, run its sweep against both targets, print the table, write
    `out_dir`/guidellm.json (and guidellm's reports under `out_dir`/guidellm/)."""
    settings = settings or Settings()
    model = default_model_path()
    print(
        f"guidellm benchmark: sweep of {settings.sweep_size} (at most "
        f"{settings.max_concurrency} streams), {settings.seconds:g} s each, "
        f"{settings.prompt_tokens} prompt / {settings.output_tokens} output tokens, "
        f"{model.name}; appliance, then router",
        flush=True,
    )
    python, skipped = prepare_guidellm()
    if python is None:
        print(f"  guidellm unavailable: {skipped}", flush=True)
        return {"skipped": skipped}
    tokenizer = export_tokenizer(python, model)
    reports_dir = out_dir / "guidellm"
    reports_dir.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="guidellm-bench-", dir=out_dir) as scratch,
        run_targets(Path(scratch), model) as (fleet, targets),
    ):
        servers = [fleet.router.process.pid, *(m.process.pid for m in fleet.members.values())]
        sweeps = [
            run_guidellm(python, target, tokenizer, reports_dir, settings=settings, servers=servers)
            for target in targets
        ]
    results = {sweep.target: steps(sweep.report) for sweep in sweeps if sweep.report}
    side_by_side = ratios(results) if len(results) == len(TARGETS) else []
    print_table(results, side_by_side)
    found = warnings(sweeps)
    for warning in found:
        print(f"  WARNING: {warning}")
    summary = {"results": results, "ratios_router_over_appliance": side_by_side}
    report = {
        "benchmark": "guidellm",
        "machine": machine_info() | {"guidellm": GUIDELLM_VERSION},
        "setup": {
            "model": model.name,
            "profile": (
                f"sweep, sweep_size {settings.sweep_size}, max_concurrency "
                f"{settings.max_concurrency} (guidellm's defaults otherwise)"
            ),
            "max_seconds_per_benchmark": settings.seconds,
            "data": {
                "kind": "synthetic_text",
                "prompt_tokens": settings.prompt_tokens,
                "output_tokens": settings.output_tokens,
            },
            "tokenizer": f"exported from {model.name} into {tokenizer}",
            "appliance": {
                "max_queue": MAX_QUEUE,
                "threads": THREADS,
                "node": NODE,
                "region": REGION,
            },
            "wall_s": {sweep.target: round(sweep.wall_s, 1) for sweep in sweeps},
            "other_cores": {sweep.target: sweep.other_cores for sweep in sweeps},
            "reports": {s.target: str(s.report) for s in sweeps if s.report is not None},
        },
        "summary": summary,
        "warnings": found,
    }
    path = out_dir / "guidellm.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return summary
