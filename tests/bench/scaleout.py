"""Scale-out benchmark: the router on SQLite against the router on PostgreSQL, and one router
behind HAProxy against three, in one run.

Every target is a real process on 127.0.0.1, in front of one fast stand-in upstream
(`tests.standin`, zero delay), registered with each router as node `standin` by heartbeats
signed with the lab join secret (plain HTTP on every hop, as the router benchmark's
`router` target):

- `direct`: the stand-in itself, the base every "added" figure is measured against;
- `router_sqlite`: a router on its own `policy.db`;
- `router_pg`: a router on a PostgreSQL store (a private cluster made here, `initdb`,
  migrated by `palisade db migrate`'s code), the same as `pg-1` below;
- `haproxy_1`: HAProxy (TCP) in front of that one PostgreSQL router;
- `haproxy_3`: HAProxy in front of three routers sharing that store.

The `demo` org the requests run as has a monthly budget (far above what the run uses), so
every admission on PostgreSQL goes through the router's budget slice, as a budgeted
tenant's would.

Phases: concurrency 1 (interleaved chunks, several repeats; p50 per target, the added p50
against `direct` in the same repeat, medians across repeats) for `direct`, `router_sqlite`
and `router_pg`; then saturation (a closed loop of many workers) for every target, with the
CPU time the router processes used during it (from /proc, user + system), per request; then
open loops through each HAProxy with the same accounting, in interleaved rounds (medians):
three routers and one carrying the same load (`FIXED_RATE`, below one router's saturation),
and one router carrying a third of it, the load each of the three carries then.

On a machine with fewer cores than routers, three routers cannot run faster than one: the
load generator, the stand-in, HAProxy and the routers share the cores. What scales is the
CPU time a request costs, summed over the router processes: if three routers cost no more
per request than one, they scale with cores. A router's CPU per request also depends on its
own request rate, whatever else runs (a process woken for each request finds its caches
cold and batches nothing per event-loop turn): one router at a third of the load costs more
per request than at the whole of it. So "three against one" is reported twice: at the same
total load (each of the three at a third of the rate: coordination and that rate effect
together), and at the same load per router (three at `FIXED_RATE` against one at a third of
it: what the store, slices and membership add when routers are added with their load).
Targets (informational, never asserted): added p50 on PostgreSQL at most 1.2 x SQLite's;
router CPU per request with three at most 1.1 x one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from federation import write_private
from federation._private.database import open_database
from federation._private.migrations import migrate
from router._private.haproxy import Backend, Haproxy
from router._private.postgres import PostgresCluster
from tests.bench.engine import CpuWatch
from tests.bench.router import (
    JOIN_SECRET,
    MAX_TOKENS,
    MODEL,
    REQUEST_BODY,
    Bench,
    Heartbeats,
    LoadClient,
    Server,
    Settings,
    _ms,
    _ticks,
    latency_stats,
    machine_info,
    run_router,
    wait_for_model,
)
from tests.standin import RunningStandin, run_standin

DATABASE = "bench"
PASSFILE_ENV = "PGPASSFILE"
# Far above what a run uses: admission on PostgreSQL then always goes through the slice.
BUDGET_TOKENS = 10**12
PG_ADDED_P50_RATIO = 1.2
CPU_PER_REQUEST_RATIO = 1.1
ROUTERS = 3
# Below one router's saturation here (about 1,600 req/s), for CPU per request at equal load.
FIXED_RATE = 800.0
# Open-loop rounds, interleaved (the figures are medians: one round varies by a third here).
FIXED_ROUNDS = 3


@dataclass
class _Router:
    server: Server
    key: str
    home: Path
    heartbeats: Heartbeats


@contextlib.contextmanager
def _postgres(scratch: Path) -> Iterator[str]:
    """A private cluster with the benchmark's database migrated; its URL without the password
    (which a 0600 passfile named by PGPASSFILE gives every router started here)."""
    cluster = PostgresCluster(scratch / "postgres")
    cluster.init()
    cluster.start()
    try:
        dsn = cluster.create_database(DATABASE)
        parts = urlsplit(dsn)
        assert parts.password is not None
        passfile = scratch / "pgpass"
        write_private(
            passfile,
            f"{parts.hostname}:{parts.port}:{DATABASE}:{parts.username}:"
            f"{unquote(parts.password)}\n",
        )
        asyncio.run(_migrate(dsn))
        previous = os.environ.get(PASSFILE_ENV)
        os.environ[PASSFILE_ENV] = str(passfile)
        try:
            yield f"postgresql://{parts.username}@{parts.hostname}:{parts.port}/{DATABASE}"
        finally:
            if previous is None:
                os.environ.pop(PASSFILE_ENV, None)
            else:
                os.environ[PASSFILE_ENV] = previous
    finally:
        cluster.stop()


async def _migrate(dsn: str) -> None:
    db = await open_database(dsn, Path())
    try:
        await migrate(db, now="2026-01-01T00:00:00.000+00:00")
    finally:
        await db.close()


@contextlib.contextmanager
def _router(
    stack: contextlib.ExitStack,
    home: Path,
    standin: RunningStandin,
    *,
    database: str | None = None,
    admin_from: Path | None = None,
) -> Iterator[_Router]:
    """A plain router (lab join secret) with the stand-in as its node. A router joining a
    store another one bootstrapped gets that one's admin key (only the first writes it)."""
    if admin_from is not None:
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(admin_from / "admin.key", home / "admin.key")
    extra = ("--database", database) if database is not None else ()
    server, key = stack.enter_context(run_router(home, tls=False, extra=extra))
    heartbeats = Heartbeats(server.url, standin.url, secret=JOIN_SECRET.encode())
    heartbeats.start()
    stack.callback(heartbeats.stop)
    wait_for_model(server, key)
    yield _Router(server, key, home, heartbeats)


def _budget(router: _Router) -> None:
    admin = (router.home / "admin.key").read_text().strip()
    reply = httpx.put(
        f"{router.server.url}/admin/v1/orgs/demo/budget",
        json={"tokens": BUDGET_TOKENS},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    if reply.status_code != 200:
        raise RuntimeError(f"setting the demo org's budget failed: {reply.text}")


def _haproxy(directory: Path, routers: Sequence[_Router]) -> Haproxy:
    backends = []
    for index, router in enumerate(routers):
        parts = urlsplit(router.server.url)
        assert parts.hostname is not None
        assert parts.port is not None
        backends.append(Backend(f"router-{index + 1}", parts.hostname, parts.port))
    proxy = Haproxy(directory, backends)
    proxy.start()
    return proxy


def _saturation(
    bench: Bench, target: str, routers: Sequence[_Router], proxy: Haproxy | None
) -> dict[str, Any]:
    """The closed loop of Settings.workers for saturation_seconds, with the CPU seconds the
    routers (and HAProxy) used meanwhile."""
    settings = bench.settings
    bench.settle()
    bench.rewarm(target, workers=settings.workers)
    pids = [router.server.process.pid for router in routers]
    proxy_pid = proxy.pid if proxy is not None else None
    tick = os.sysconf("SC_CLK_TCK")
    before = _ticks(pids), _ticks([proxy_pid] if proxy_pid else [])
    result = bench.load.call(
        op="closed", target=target, workers=settings.workers, seconds=settings.saturation_seconds
    )
    after = _ticks(pids), _ticks([proxy_pid] if proxy_pid else [])
    stats = latency_stats(result)
    router_cpu = (after[0] - before[0]) / tick
    stats["router_cpu_s"] = router_cpu
    stats["haproxy_cpu_s"] = (after[1] - before[1]) / tick
    stats["router_cpu_ms_per_request"] = router_cpu * 1000 / stats["ok"] if stats["ok"] else None
    print(
        f"  saturation, {target}: {stats['achieved_per_s']:,.0f} req/s, router CPU "
        f"{_ms(stats['router_cpu_ms_per_request'])} ms/request, {stats['errors']} errors",
        flush=True,
    )
    return stats


def _fixed_rate(
    bench: Bench, target: str, routers: Sequence[_Router], rate: float
) -> dict[str, Any]:
    """An open loop at `rate` requests/s for open_seconds, with the routers' CPU seconds."""
    bench.settle()
    bench.rewarm(target, workers=16)
    pids = [router.server.process.pid for router in routers]
    before = _ticks(pids)
    result = bench.load.call(
        op="open", target=target, rate=rate, seconds=bench.settings.open_seconds
    )
    cpu = (_ticks(pids) - before) / os.sysconf("SC_CLK_TCK")
    stats = latency_stats(result) | {"rate": rate, "router_cpu_s": cpu}
    stats["router_cpu_ms_per_request"] = cpu * 1000 / stats["ok"] if stats["ok"] else None
    print(
        f"  {rate:g}/s, {target}: p50 {_ms(stats['p50_ms'])} ms, router CPU "
        f"{_ms(stats['router_cpu_ms_per_request'])} ms/request, {stats['errors']} errors",
        flush=True,
    )
    return stats


def _fixed_rates(
    bench: Bench, one: Sequence[_Router], three: Sequence[_Router]
) -> dict[str, dict[str, Any]]:
    """`FIXED_ROUNDS` interleaved rounds of the three open loops: one router at a third of
    `FIXED_RATE` (`haproxy_1_third`), one at all of it, three at all of it. Per phase, the
    round with the median CPU per request (all rounds are kept under `rounds`)."""
    phases = {
        "haproxy_1_third": ("haproxy_1", one, FIXED_RATE / len(three)),
        "haproxy_1": ("haproxy_1", one, FIXED_RATE),
        "haproxy_3": ("haproxy_3", three, FIXED_RATE),
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in phases}
    for _ in range(FIXED_ROUNDS):
        for name, (target, routers, rate) in phases.items():
            rounds[name].append(_fixed_rate(bench, target, routers, rate))
    return {name: _median_round(runs) for name, runs in rounds.items()}


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [run for run in runs if run["router_cpu_ms_per_request"] is not None]
    if not measured:
        return runs[0] | {"rounds": runs}
    ordered = sorted(measured, key=lambda run: run["router_cpu_ms_per_request"])
    return ordered[(len(ordered) - 1) // 2] | {"rounds": runs}


def _added_p50(repeats: list[dict[str, dict[str, Any]]], target: str) -> float | None:
    added = [
        stats[target]["p50_ms"] - stats["direct"]["p50_ms"]
        for stats in repeats
        if stats[target]["p50_ms"] is not None and stats["direct"]["p50_ms"] is not None
    ]
    return statistics.median(added) if added else None


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return None if top is None or bottom is None or bottom <= 0 else top / bottom


def summarize(
    repeats: list[dict[str, dict[str, Any]]],
    saturation: dict[str, dict[str, Any]],
    fixed: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    c1 = {
        target: {
            "p50_ms": statistics.median(r[target]["p50_ms"] for r in repeats),
            "p99_ms": statistics.median(r[target]["p99_ms"] for r in repeats),
            "added_p50_ms": _added_p50(repeats, target) if target != "direct" else None,
        }
        for target in repeats[0]
    }
    cpu = {t: s["router_cpu_ms_per_request"] for t, s in saturation.items()}
    ratios = {
        "pg_vs_sqlite_added_p50": _ratio(
            c1["router_pg"]["added_p50_ms"], c1["router_sqlite"]["added_p50_ms"]
        ),
        "pg_vs_sqlite_saturation": _ratio(
            saturation["router_pg"]["achieved_per_s"],
            saturation["router_sqlite"]["achieved_per_s"],
        ),
        "three_vs_one_cpu_per_request": _ratio(cpu.get("haproxy_3"), cpu.get("haproxy_1")),
        "three_vs_one_saturation": _ratio(
            saturation["haproxy_3"]["achieved_per_s"], saturation["haproxy_1"]["achieved_per_s"]
        ),
        "three_vs_one_cpu_per_request_at_fixed_rate": _ratio(
            fixed["haproxy_3"]["router_cpu_ms_per_request"],
            fixed["haproxy_1"]["router_cpu_ms_per_request"],
        ),
        "three_vs_one_cpu_per_request_at_equal_router_load": _ratio(
            fixed["haproxy_3"]["router_cpu_ms_per_request"],
            fixed["haproxy_1_third"]["router_cpu_ms_per_request"],
        ),
        "one_router_third_vs_whole_load_cpu_per_request": _ratio(
            fixed["haproxy_1_third"]["router_cpu_ms_per_request"],
            fixed["haproxy_1"]["router_cpu_ms_per_request"],
        ),
    }
    targets = [
        {
            "name": "added p50, PostgreSQL / SQLite",
            "value": ratios["pg_vs_sqlite_added_p50"],
            "goal": f"<= {PG_ADDED_P50_RATIO}",
            "met": _at_most(ratios["pg_vs_sqlite_added_p50"], PG_ADDED_P50_RATIO),
        },
        {
            "name": "router CPU per request, 3 routers / 1",
            "value": ratios["three_vs_one_cpu_per_request"],
            "goal": f"<= {CPU_PER_REQUEST_RATIO}",
            "met": _at_most(ratios["three_vs_one_cpu_per_request"], CPU_PER_REQUEST_RATIO),
        },
        {
            "name": f"the same, {FIXED_RATE:g} req/s in all",
            "value": ratios["three_vs_one_cpu_per_request_at_fixed_rate"],
            "goal": f"<= {CPU_PER_REQUEST_RATIO}",
            "met": _at_most(
                ratios["three_vs_one_cpu_per_request_at_fixed_rate"], CPU_PER_REQUEST_RATIO
            ),
        },
        {
            "name": f"the same, {FIXED_RATE / ROUTERS:.0f} req/s per router",
            "value": ratios["three_vs_one_cpu_per_request_at_equal_router_load"],
            "goal": f"<= {CPU_PER_REQUEST_RATIO}",
            "met": _at_most(
                ratios["three_vs_one_cpu_per_request_at_equal_router_load"],
                CPU_PER_REQUEST_RATIO,
            ),
        },
    ]
    return {
        "concurrency_1": c1,
        "saturation": saturation,
        "fixed_rate": fixed,
        "ratios": ratios,
        "targets": targets,
    }


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def print_table(summary: dict[str, Any], settings: Settings) -> None:
    print(f"\n  Concurrency 1, median of {settings.repeats} repeats")
    print(f"  {'target':<15}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}")
    for target, row in summary["concurrency_1"].items():
        added = row["added_p50_ms"]
        print(
            f"  {target:<15}{_ms(row['p50_ms']):>9}{_ms(row['p99_ms']):>9}"
            f"{'-' if added is None else f'{added:+.2f}':>11}"
        )
    print(f"\n  Saturation, closed loop, {settings.workers} workers")
    print(f"  {'target':<15}{'req/s':>9}{'p50 ms':>9}{'router CPU ms/req':>19}{'errors':>8}")
    for target, row in summary["saturation"].items():
        print(
            f"  {target:<15}{row['achieved_per_s']:>9,.0f}{_ms(row['p50_ms']):>9}"
            f"{_ms(row['router_cpu_ms_per_request']):>19}{row['errors']:>8}"
        )
    print(
        f"\n  Open loops, {settings.open_seconds:g} s each, median of {FIXED_ROUNDS} "
        "interleaved rounds"
    )
    print(
        f"  {'target':<17}{'req/s':>9}{'p50 ms':>9}{'router CPU ms/req':>19}"
        f"{'(each round)':>22}{'errors':>8}"
    )
    for target, row in summary["fixed_rate"].items():
        each = "/".join(_ms(run["router_cpu_ms_per_request"]) for run in row["rounds"])
        print(
            f"  {target:<17}{row['achieved_per_s']:>9,.0f}{_ms(row['p50_ms']):>9}"
            f"{_ms(row['router_cpu_ms_per_request']):>19}{each:>22}{row['errors']:>8}"
        )
    print("\n  Ratios")
    for name, value in summary["ratios"].items():
        print(f"  {name:<50}{'-' if value is None else f'{value:.2f}':>8}")
    print("\n  Targets (informational, never asserted)")
    for row in summary["targets"]:
        verdict = {True: "PASS", False: "MISS", None: "-"}[row["met"]]
        value = "-" if row["value"] is None else f"{row['value']:.2f}"
        print(f"  {row['name']:<42}{value:>8}{row['goal']:>10}{verdict:>8}")


def run(*, out_dir: Path, settings: Settings | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write `out_dir`/scaleout.json; the summary."""
    settings = settings or Settings()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        "Scale-out benchmark: direct, router_sqlite, router_pg, haproxy_1, haproxy_3; "
        f"model {MODEL!r}, max_tokens {MAX_TOKENS}",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="scaleout-bench-", dir=out_dir) as scratch_dir,
        contextlib.ExitStack() as stack,
    ):
        scratch = Path(scratch_dir)
        url = stack.enter_context(_postgres(scratch))
        standin = stack.enter_context(run_standin(tokens=MAX_TOKENS, model=MODEL))
        sqlite = stack.enter_context(_router(stack, scratch / "sqlite", standin))
        shared = [stack.enter_context(_router(stack, scratch / "pg-1", standin, database=url))]
        for index in range(2, ROUTERS + 1):
            home = scratch / f"pg-{index}"
            shared.append(
                stack.enter_context(
                    _router(stack, home, standin, database=url, admin_from=shared[0].home)
                )
            )
        for router in (sqlite, shared[0]):
            _budget(router)
        one = _haproxy(scratch / "haproxy-1", shared[:1])
        stack.callback(one.stop)
        three = _haproxy(scratch / "haproxy-3", shared)
        stack.callback(three.stop)
        json_header = {"Content-Type": "application/json"}

        def through(base: str, key: str) -> dict[str, Any]:
            return {
                "url": f"{base}/v1/chat/completions",
                "headers": json_header | {"Authorization": f"Bearer {key}"},
            }

        endpoints = {
            "direct": {"url": f"{standin.v1}/chat/completions", "headers": json_header},
            "router_sqlite": through(sqlite.server.url, sqlite.key),
            "router_pg": through(shared[0].server.url, shared[0].key),
            # HAProxy passes TCP through, and these routers serve plain HTTP.
            "haproxy_1": through(f"http://127.0.0.1:{one.port}", shared[0].key),
            "haproxy_3": through(f"http://127.0.0.1:{three.port}", shared[0].key),
        }
        load = LoadClient(scratch)
        stack.callback(load.close)
        load.call(
            op="setup",
            targets=endpoints,
            body=REQUEST_BODY,
            timeout_s=settings.timeout_s,
            connections=4096,
        )
        routers = [sqlite, *shared]
        servers = [standin.process.pid, *(r.server.process.pid for r in routers)]
        proxies = [pid for pid in (one.pid, three.pid) if pid is not None]
        own = [os.getpid(), load.process.pid, *servers, *proxies]
        bench = Bench(settings, load, list(endpoints), servers + proxies, own)
        for target, result in bench.warm_up().items():
            if result["ok"] == 0:
                raise RuntimeError(f"every warm-up request to {target} failed: {result}")
        watch = CpuWatch(*own)
        bench.targets = ["direct", "router_sqlite", "router_pg"]
        repeats = bench.concurrency_one()
        saturation = {
            "direct": _saturation(bench, "direct", [], None),
            "router_sqlite": _saturation(bench, "router_sqlite", [sqlite], None),
            "router_pg": _saturation(bench, "router_pg", shared[:1], None),
            "haproxy_1": _saturation(bench, "haproxy_1", shared[:1], one),
            "haproxy_3": _saturation(bench, "haproxy_3", shared, three),
        }
        fixed = _fixed_rates(bench, shared[:1], shared)
        summary = summarize(repeats, saturation, fixed)
        summary["contention"] = watch.report()
    print_table(summary, settings)
    report = {
        "benchmark": "scaleout",
        "machine": machine_info(None),
        "setup": {
            "model": MODEL,
            "max_tokens": MAX_TOKENS,
            "repeats": settings.repeats,
            "requests": settings.requests,
            "saturation_seconds": settings.saturation_seconds,
            "saturation_workers": settings.workers,
            "routers": ROUTERS,
            "fixed_rate": FIXED_RATE,
            "fixed_rounds": FIXED_ROUNDS,
            "budget_tokens": BUDGET_TOKENS,
            "settle_waits_s": bench.settle_waits,
            "noisy_phases": bench.noisy_phases,
        },
        "summary": summary,
        "concurrency_1_repeats": repeats,
    }
    path = out_dir / "scaleout.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return summary
