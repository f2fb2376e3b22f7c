"""Audit-log benchmark: durable append throughput and offline verification throughput.

Appends go through a real `AuditLog` (WAL, synchronous=FULL, a signed checkpoint every
1,000 entries) on the disk that holds the report folder, never a tmpfs. Entries are shaped
like the request metadata the appliance records (about 200 bytes of JSON before the log
adds index, prev and time). Three ways of appending:

- concurrent submit: 8 threads call `log.submit` without waiting, as the appliance records
  request metadata, then every future is awaited; the clock stops when the last entry is
  durable. This is the figure the target applies to.
- concurrent append: 8 threads each wait for their entry to be durable before the next
  (like management events), so at most 8 entries share a commit.
- sequential append: one caller, one entry per commit: one fsync per entry, for contrast.

Verification runs `verify_export` (with the trusted key) on a full export of 100,000 entries
(100 checkpoints) and on one org's export (half the entries, each with an inclusion proof).
The figure is wall time; the CPU time of the same runs is reported beside it, since it hardly
moves when other processes share the machine.

With `--baseline REV` the same two export files are also verified by the `compliance` package
of commit REV (a worktree, removed afterwards) and by this checkout's, each in fresh processes,
in interleaved rounds, and the report gives the medians side by side and their ratio.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from compliance import AuditLog, Scope, build_export, canonical, verify_export
from federation import NodeIdentity
from tests.bench.batching import baseline_worktree, resolve_revision
from tests.bench.engine import BUSY_CORES, CpuWatch
from tests.support import REPO

ORIGIN = "edge-eu-1"
CHECKPOINT_EVERY = 1000
THREADS = 8
CONCURRENT_ENTRIES = 20_000
SEQUENTIAL_ENTRIES = 5_000
VERIFY_ENTRIES = 100_000
VERIFY_REPEATS = 3  # median of this many verifications per export
ORGS = 2  # entries alternate between orgs, so one org's export holds half of them
APPEND_TARGET = 5_000.0  # durable entries/s under concurrent traffic
VERIFY_TARGET = 100_000.0  # verified entries/s
BASELINE_ROUNDS = 5  # with --baseline: interleaved rounds, VERIFY_REPEATS runs per side in each


def request_entry(n: int) -> dict[str, Any]:
    """Request metadata as the appliance records it (see appliance `_settle`)."""
    return {
        "kind": "request",
        "id": f"chatcmpl-{n:024x}",
        "org": f"org-{n % ORGS}",
        "user": f"usr_{(n * 7919) % 10_000:016x}",
        "key_id": f"key_{(n * 104_729) % 100_000:016x}",
        "model": "smollm2-135m-instruct",
        "region": "eu-west",
        "node": ORIGIN,
        "input_tokens": 100 + n % 900,
        "output_tokens": 1 + n % 512,
        "status": "ok",
    }


def _open(path: Path, node: NodeIdentity) -> AuditLog:
    return AuditLog(path, node, origin=ORIGIN, checkpoint_every=CHECKPOINT_EVERY)


# --- appending -------------------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _run_threads(count: int, work: Callable[[int], None]) -> float:
    """Run `work(thread_number)` on `count` threads released together; returns the release."""
    start = threading.Barrier(count + 1)

    def body(number: int) -> None:
        start.wait()
        work(number)

    threads = [threading.Thread(target=body, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return began


def concurrent_submit(path: Path, node: NodeIdentity) -> dict[str, Any]:
    """THREADS threads submit without waiting; time until the last entry is durable."""
    log = _open(path, node)
    share = CONCURRENT_ENTRIES // THREADS
    submitted = [0.0] * (share * THREADS)
    durable = [0.0] * (share * THREADS)
    futures: list[list[Future[int]]] = [[] for _ in range(THREADS)]

    def acknowledge(slot: int) -> Callable[[Future[int]], None]:
        def done(_: Future[int]) -> None:
            durable[slot] = time.perf_counter()

        return done

    def submit(number: int) -> None:
        for offset in range(share):
            slot = number * share + offset
            submitted[slot] = time.perf_counter()
            future = log.submit(request_entry(slot))
            future.add_done_callback(acknowledge(slot))
            futures[number].append(future)

    began = _run_threads(THREADS, submit)
    for future in (f for batch in futures for f in batch):
        future.result()
    elapsed = max(durable) - began
    log.close()
    latencies = [(d - s) * 1000 for s, d in zip(submitted, durable, strict=True)]
    return {
        "entries": len(submitted),
        "threads": THREADS,
        "seconds": elapsed,
        "entries_per_s": len(submitted) / elapsed,
        "ack_latency_ms": {
            "p50": _percentile(latencies, 0.50),
            "p99": _percentile(latencies, 0.99),
            "max": max(latencies),
        },
    }


def concurrent_append(path: Path, node: NodeIdentity) -> dict[str, Any]:
    """THREADS threads each append and wait for durability, one entry at a time."""
    log = _open(path, node)
    share = CONCURRENT_ENTRIES // THREADS
    latencies: list[list[float]] = [[] for _ in range(THREADS)]

    def append(number: int) -> None:
        for offset in range(share):
            started = time.perf_counter()
            log.append(request_entry(number * share + offset))
            latencies[number].append((time.perf_counter() - started) * 1000)

    began = _run_threads(THREADS, append)
    elapsed = time.perf_counter() - began
    log.close()
    every = [value for values in latencies for value in values]
    return {
        "entries": len(every),
        "threads": THREADS,
        "seconds": elapsed,
        "entries_per_s": len(every) / elapsed,
        "ack_latency_ms": {
            "p50": _percentile(every, 0.50),
            "p99": _percentile(every, 0.99),
            "max": max(every),
        },
    }


def sequential_append(path: Path, node: NodeIdentity) -> dict[str, Any]:
    """One caller: each `append` returns once its own commit is on disk."""
    log = _open(path, node)
    latencies = []
    began = time.perf_counter()
    for n in range(SEQUENTIAL_ENTRIES):
        started = time.perf_counter()
        log.append(request_entry(n))
        latencies.append((time.perf_counter() - started) * 1000)
    elapsed = time.perf_counter() - began
    log.close()
    return {
        "entries": SEQUENTIAL_ENTRIES,
        "threads": 1,
        "seconds": elapsed,
        "entries_per_s": SEQUENTIAL_ENTRIES / elapsed,
        "ack_latency_ms": {
            "p50": _percentile(latencies, 0.50),
            "p99": _percentile(latencies, 0.99),
            "max": max(latencies),
        },
    }


# --- verifying -------------------------------------------------------------------------------


def fill(path: Path, node: NodeIdentity) -> None:
    log = _open(path, node)
    futures = [log.submit(request_entry(n)) for n in range(VERIFY_ENTRIES)]
    for future in futures:
        future.result()
    log.close()


def verification(db: Path, node: NodeIdentity, scope: Scope) -> dict[str, Any]:
    """Build one export, then time `verify_export` on it VERIFY_REPEATS times."""
    began = time.perf_counter()
    data = build_export(db, node, origin=ORIGIN, scope=scope)
    built = time.perf_counter() - began
    times, cpu_times = [], []
    for _ in range(VERIFY_REPEATS):
        began, cpu_began = time.perf_counter(), time.process_time()
        report = verify_export(data, trusted_key=node.public_key)
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu_began)
        if not report.ok:
            raise RuntimeError(f"the benchmark's own export does not verify: {report.problem}")
    seconds = statistics.median(times)
    return {
        "scope": "full" if scope.full else f"org {scope.org}",
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "export_bytes": len(data),
        "build_seconds": built,
        "verify_seconds": seconds,
        "verify_seconds_all": times,
        "entries_per_s": report.entries / seconds,
        "cpu_seconds": statistics.median(cpu_times),
        "cpu_entries_per_s": report.entries / statistics.median(cpu_times),
    }


# --- before/after: the same files verified by another commit ----------------------------------

# Runs in a fresh interpreter whose `compliance` is the checkout being measured.
_TIMER = """
import json, sys, time
from pathlib import Path
import compliance
key, repeats, runs = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), {}
for name in sys.argv[3:]:
    data, times = Path(name).read_bytes(), []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        report = compliance.verify_export(data, trusted_key=key)
        times.append([time.perf_counter() - wall, time.process_time() - cpu])
        if not report.ok:
            raise SystemExit(f"{name}: {report.problem}")
    runs[name] = times
print(json.dumps({"module": compliance.__file__, "runs": runs}))
"""


def time_checkout(source: Path, files: list[Path], key: bytes) -> dict[str, list[list[float]]]:
    """[wall, cpu] seconds of each verification of each file by `source`'s `compliance`."""
    result = subprocess.run(
        [sys.executable, "-c", _TIMER, key.hex(), str(VERIFY_REPEATS), *map(str, files)],
        cwd=source,
        env=os.environ | {"PYTHONPATH": str(source)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"verifying with {source} failed: {result.stderr.strip()}")
    answer = json.loads(result.stdout)
    if not Path(answer["module"]).resolve().is_relative_to(source.resolve()):
        raise RuntimeError(f"{source} verified with another checkout's code: {answer['module']}")
    runs: dict[str, list[list[float]]] = answer["runs"]
    return runs


def side_by_side(
    files: dict[str, Path], entries: dict[str, int], key: bytes, baseline: Path
) -> dict[str, Any]:
    """Medians of this checkout's and `baseline`'s verification of each file, and the ratios."""
    sources = {"current": REPO, "baseline": baseline}
    runs: dict[str, dict[str, list[list[float]]]] = {side: {} for side in sources}
    for number in range(BASELINE_ROUNDS):
        order = list(sources) if number % 2 == 0 else list(reversed(sources))
        for side in order:
            for name, times in time_checkout(sources[side], list(files.values()), key).items():
                runs[side].setdefault(name, []).extend(times)
    found: dict[str, Any] = {}
    for scope, file in files.items():
        sides = {}
        for side in sources:
            times = runs[side][str(file)]
            wall = statistics.median(t[0] for t in times)
            cpu = statistics.median(t[1] for t in times)
            sides[side] = {
                "runs": len(times),
                "verify_seconds": wall,
                "cpu_seconds": cpu,
                "entries_per_s": entries[scope] / wall,
                "cpu_entries_per_s": entries[scope] / cpu,
            }
        found[scope] = sides | {
            "ratio": sides["baseline"]["verify_seconds"] / sides["current"]["verify_seconds"],
            "cpu_ratio": sides["baseline"]["cpu_seconds"] / sides["current"]["cpu_seconds"],
        }
    return found


def compare_with(
    revision: str, db: Path, node: NodeIdentity, scratch: Path, entries: dict[str, int]
) -> dict[str, Any]:
    """Verify the benchmark's two exports with commit `revision` and with this checkout."""
    commit = resolve_revision(revision)
    files = {}
    for scope in (Scope(), Scope(org="org-0")):
        name = "full" if scope.full else f"org {scope.org}"
        files[name] = scratch / f"export-{name.replace(' ', '-')}.json"
        files[name].write_bytes(build_export(db, node, origin=ORIGIN, scope=scope))
    with baseline_worktree(commit, scratch / "baseline-source") as source:
        found = side_by_side(files, entries, node.public_key, source)
    return {"revision": revision, "commit": commit, "rounds": BASELINE_ROUNDS, "scopes": found}


# --- report ----------------------------------------------------------------------------------


def _filesystem(path: Path) -> str | None:
    """The type of the filesystem holding `path`, from /proc/mounts (Linux only)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    resolved, best, kind = str(path.resolve()), "", None
    for fields in mounts:
        point = fields[1]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def machine_info(db_dir: Path) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cryptography": version("cryptography"),
        "filesystem": _filesystem(db_dir),
        "timestamp": datetime.now(UTC).astimezone().isoformat(),
    }


def summarize(
    appends: dict[str, dict[str, Any]],
    verifies: dict[str, dict[str, Any]],
    contention: dict[str, float] | None,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    append_rate = appends["concurrent_submit"]["entries_per_s"]
    verify_rate = min(v["entries_per_s"] for v in verifies.values())
    return {
        "append": appends,
        "verify": verifies,
        "targets": {
            "append_min_entries_per_s": APPEND_TARGET,
            "append_met": append_rate >= APPEND_TARGET,
            "verify_min_entries_per_s": VERIFY_TARGET,
            "verify_met": verify_rate >= VERIFY_TARGET,
        },
        "contention": contention,
        "baseline": baseline,
    }


def warnings(summary: dict[str, Any], filesystem: str | None) -> list[str]:
    found = []
    contention = summary["contention"]
    if contention is not None and max(contention.values()) > BUSY_CORES:
        found.append(
            f"other processes used {contention['other_cores']:.2f} cores and the hypervisor "
            f"stole {contention['stolen_cores']:.2f} on average during the runs: the figures "
            "are unreliable; rerun on a quiet machine"
        )
    if filesystem in {"tmpfs", "ramfs"}:
        found.append(f"the log was on {filesystem}: fsync is free there, appends look too fast")
    return found


APPEND_LABELS = {
    "concurrent_submit": f"{THREADS} threads, submit (not awaited)",
    "concurrent_append": f"{THREADS} threads, append (each waits)",
    "sequential_append": "1 caller, sequential append",
}


def print_table(summary: dict[str, Any], found: list[str]) -> None:
    print("\nAudit benchmark: durable appends (WAL, synchronous=FULL, checkpoint every 1000)")
    print(f"  {'':<38}{'entries':>9}{'seconds':>9}{'entries/s':>12}{'p50 ms':>9}{'p99 ms':>9}")
    for name, label in APPEND_LABELS.items():
        row = summary["append"][name]
        latency = row["ack_latency_ms"]
        print(
            f"  {label:<38}{row['entries']:>9}{row['seconds']:>9.2f}"
            f"{row['entries_per_s']:>12,.0f}{latency['p50']:>9.2f}{latency['p99']:>9.2f}"
        )
    print(
        "  (latency: submit -> durable; the submit row queues all entries at once, so its "
        "latency is the backlog)"
    )
    print("\nAudit benchmark: verify_export with the trusted key (median of 3)")
    print(
        f"  {'':<26}{'entries':>9}{'MiB':>8}{'build s':>9}{'verify s':>10}{'entries/s':>12}"
        f"{'CPU s':>8}{'/CPU s':>10}"
    )
    for row in summary["verify"].values():
        print(
            f"  {'export, ' + row['scope']:<26}{row['entries']:>9}"
            f"{row['export_bytes'] / 2**20:>8.1f}{row['build_seconds']:>9.2f}"
            f"{row['verify_seconds']:>10.2f}{row['entries_per_s']:>12,.0f}"
            f"{row['cpu_seconds']:>8.2f}{row['cpu_entries_per_s']:>10,.0f}"
        )
    targets = summary["targets"]
    print(
        f"  target >= {APPEND_TARGET:,.0f} durable entries/s ({APPEND_LABELS['concurrent_submit']})"
        f": {_met(targets['append_met'])}"
    )
    print(
        f"  target >= {VERIFY_TARGET:,.0f} verified entries/s (both exports): "
        f"{_met(targets['verify_met'])}"
    )
    if summary["baseline"] is not None:
        print_baseline(summary["baseline"])
    for warning in found:
        print(f"  WARNING: {warning}")


def print_baseline(baseline: dict[str, Any]) -> None:
    print(
        f"\n  Against {baseline['revision']} ({baseline['commit'][:7]}): the same files, fresh "
        f"processes, {baseline['rounds']} interleaved rounds of {VERIFY_REPEATS} per side"
    )
    print(f"  {'':<20}{'side':<10}{'verify s':>10}{'entries/s':>12}{'CPU s':>8}{'/CPU s':>10}")
    for scope, row in baseline["scopes"].items():
        for side in ("baseline", "current"):
            figures = row[side]
            print(
                f"  {'export, ' + scope:<20}{side:<10}{figures['verify_seconds']:>10.3f}"
                f"{figures['entries_per_s']:>12,.0f}{figures['cpu_seconds']:>8.3f}"
                f"{figures['cpu_entries_per_s']:>10,.0f}"
            )
        print(
            f"  {'':<20}{'current / baseline entries/s':<38}{row['ratio']:.2f}x"
            f" (CPU {row['cpu_ratio']:.2f}x)"
        )


def _met(met: bool) -> str:
    return "met" if met else "NOT met (informational)"


def write_json(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "audit.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def run(*, out_dir: Path, baseline: str | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write `out_dir`/audit.json; returns the summary.

    With `baseline` (a git revision), also compare verification with that commit's.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    size = len(canonical(request_entry(CONCURRENT_ENTRIES)))
    print(f"Audit benchmark: request entries of about {size} bytes, on {out_dir}")
    # Under the report folder, so the log sits on a real disk (/tmp may be a tmpfs).
    with tempfile.TemporaryDirectory(prefix="audit-bench-", dir=out_dir) as scratch:
        home = Path(scratch)
        node = NodeIdentity.load_or_create(home)
        machine = machine_info(home)
        watch = CpuWatch(os.getpid())
        appends: dict[str, dict[str, Any]] = {}
        for name, scenario in (
            ("concurrent_submit", concurrent_submit),
            ("concurrent_append", concurrent_append),
            ("sequential_append", sequential_append),
        ):
            appends[name] = scenario(home / f"{name}.db", node)
            print(f"  {APPEND_LABELS[name]}: {appends[name]['entries_per_s']:,.0f} entries/s")
        fill(home / "verify.db", node)
        verifies = {
            "full": verification(home / "verify.db", node, Scope()),
            "org": verification(home / "verify.db", node, Scope(org="org-0")),
        }
        for row in verifies.values():
            print(f"  verify {row['scope']}: {row['entries_per_s']:,.0f} entries/s")
        contention = watch.report()
        compared = None
        if baseline is not None:
            entries = {row["scope"]: row["entries"] for row in verifies.values()}
            compared = compare_with(baseline, home / "verify.db", node, home, entries)
    summary = summarize(appends, verifies, contention, compared)
    found = warnings(summary, machine["filesystem"])
    print_table(summary, found)
    report = {
        "benchmark": "audit",
        "machine": machine,
        "setup": {
            "entry_bytes": size,
            "checkpoint_every": CHECKPOINT_EVERY,
            "threads": THREADS,
            "concurrent_entries": CONCURRENT_ENTRIES,
            "sequential_entries": SEQUENTIAL_ENTRIES,
            "verify_entries": VERIFY_ENTRIES,
            "verify_repeats": VERIFY_REPEATS,
            "orgs": ORGS,
            "synchronous": "FULL",
            "journal_mode": "WAL",
        },
        "summary": summary,
        "warnings": found,
    }
    path = write_json(report, out_dir)
    print(f"\nwrote {path}")
    return summary
