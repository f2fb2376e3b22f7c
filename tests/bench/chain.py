"""Chain benchmark: what each hop of client -> router -> appliance -> upstream adds, beside
LiteLLM in front of the same upstream, in one interleaved run.

Every target is a real process on 127.0.0.1:

- `standin`: the zero-delay stand-in upstream (`tests.standin`), reached directly;
- `appliance`: an appliance (`engine = "openai"` in front of the stand-in) with tenancy on,
  reached with a tenant key made through its admin API (an org, an invitation, the
  accepted member's `org_user` key): authentication, admission, settlement, a usage record
  and an audit row per request;
- `router`: `palisade router serve` with the same kind of tenant key (made through the
  router's admin API), forwarding to that appliance: the router authenticates, admits,
  meters and audits, signs a principal assertion; the appliance verifies it and writes its
  own audit row (a router-vouched request is metered at the router only);
- `litellm`: the LiteLLM proxy (installed into var/bench/litellm-venv, as the router
  benchmark does) routing the model to the stand-in.

By default the appliance joins the router with the lab join secret
(`PALISADE_LAB_JOIN_SECRET`: HMAC-signed heartbeats over plain HTTP, as the router
benchmark's plain fleet), so every hop is plain HTTP and each hop's figure is comparable with
the router benchmark's `router` column. With `--chain-mtls` it is enrolled as a real node is
(a token from the router's admin API, `palisade node init`, `palisade node enroll`): it then
serves HTTPS with its node certificate and takes assertions only over mTLS, and the router
serves HTTPS with a certificate from its fleet CA, which the load generator trusts; the
stand-in stays plain HTTP, so the appliance's figure includes its TLS listener. Hops are
measured against their own base: appliance - standin, router - appliance, litellm -
standin, and the whole chain router - standin.

Phases, on the router benchmark's machinery (`tests.bench.router.Bench`, the load generator
process `tests.bench.loadgen`): warm-up; concurrency 1, closed loop, each repeat sending
every target its requests in interleaved chunks (the table shows medians across repeats);
saturation, a closed loop of many workers per target. Around every load-generator call the
CPU time of each server process is read from /proc, so the report also gives CPU
milliseconds per request per process: a figure that survives a busy machine better than
latency or throughput do. Requests are the router benchmark's: non-streaming chat
completions, `max_tokens` 8 (with `--chain-stream`, the same streamed with
`stream_options.include_usage`; latency is then until the stream's end). Targets from
issue 16 are printed PASS/MISS, never asserted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from federation import JOIN_SECRET_ENV
from tests.bench.engine import BUSY_CORES, CpuWatch
from tests.bench.router import (
    CONNECTIONS,
    JOIN_SECRET,
    LITELLM_KEY,
    LITELLM_VENV,
    MAX_TOKENS,
    MODEL,
    REGION,
    REQUEST_BODY,
    SETTLE_TIMEOUT_S,
    Bench,
    LoadClient,
    Server,
    Settings,
    _at_most,
    _ms,
    _quotient,
    _signed,
    _target,
    _ticks,
    _verdict,
    enroll_standin,
    machine_info,
    prepare_litellm,
    run_litellm,
    run_router,
    summarize_c1,
    wait_for_model,
)
from tests.federation.tenants import Admin
from tests.standin import RunningStandin, run_standin
from tests.support import Appliance, start_server, write_config

NODE_ID = "chain-appliance"
ORG = "chain"
# Each target after the stand-in, and the target whose latency it is measured against.
HOP_BASES = {"appliance": "standin", "router": "appliance", "litellm": "standin"}
CHAIN_BASES = {"router": "standin"}  # the whole chain
HOP_LABELS = {
    "appliance": "appliance over stand-in",
    "router": "router over appliance",
    "litellm": "LiteLLM over stand-in",
}
PROCESSES = ("standin", "appliance", "router", "litellm")

# Issue 16's acceptance (informational: PASS/MISS is printed, never asserted).
APPLIANCE_ADDED_P50_MS = 1.0
APPLIANCE_SATURATION_RPS = 2000.0
ROUTER_ADDED_P50_MS = 1.0


def request_body(*, stream: bool) -> str:
    """The router benchmark's request, streamed (usage included) when `stream`."""
    if not stream:
        return REQUEST_BODY
    body = json.loads(REQUEST_BODY) | {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body)


def settings_for_chain(settings: Settings) -> Settings:
    """The router benchmark's settings without its open-loop phase, which the chain skips."""
    return dataclasses.replace(settings, rates=())


# --- the chain --------------------------------------------------------------------------------


@dataclass
class Chain:
    """The running chain: router -> appliance -> stand-in, and a tenant key for each server."""

    router: Server
    appliance: Appliance
    standin: RunningStandin
    router_key: str
    appliance_key: str
    # The fleet CA that clients trust (mTLS chain only: the router and the appliance serve
    # HTTPS with certificates from it).
    ca: Path | None = None

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return True if self.ca is None else ssl.create_default_context(cafile=self.ca)

    def pids(self) -> dict[str, int]:
        return {
            "standin": self.standin.process.pid,
            "appliance": self.appliance.process.pid,
            "router": self.router.process.pid,
        }


def appliance_config(router_url: str | None, standin: RunningStandin) -> str:
    """An appliance serving MODEL from the stand-in with the `openai` engine: unenrolled, in
    REGION, joining `router_url` with the lab join secret; or (`router_url` None) enrolled,
    its identity and router taken from its node certificate."""
    identity = (
        f'node_id = "{NODE_ID}"\nregion = "{REGION}"\nrouter_url = "{router_url}"\n'
        if router_url is not None
        else ""
    )
    return (
        identity + "[[models]]\n"
        f'id = "{MODEL}"\n'
        'engine = "openai"\n'
        f'upstream_url = "{standin.v1}"\n'
        'device_class = "gpu"\n'
    )


def tenant_key(server_url: str, home: Path, verify: ssl.SSLContext | bool) -> str:
    """Through the server's admin API, as an operator would: org ORG in REGION, an invitation
    for an `org_user`, accepted; returns the member's key."""
    admin = Admin(server_url, (home / "admin.key").read_text().strip(), verify)
    admin.create_org(ORG, [REGION])
    return admin.member(ORG, "org_user", f"bench@{ORG}.test").key


@contextlib.contextmanager
def run_chain(scratch: Path, *, mtls: bool = False) -> Iterator[Chain]:
    """The router, the stand-in, the appliance joining the router (lab join secret, or
    enrolled with `mtls`), a tenant key on each, and a wait until the router routes MODEL to
    the appliance."""
    with contextlib.ExitStack() as stack:
        router_home, home = scratch / "router", scratch / "appliance"
        router, _demo_key = stack.enter_context(run_router(router_home, tls=mtls))
        standin = stack.enter_context(run_standin(tokens=MAX_TOKENS, model=MODEL))
        ca = enroll_standin(router, router_home, home, NODE_ID).ca_path if mtls else None
        config = write_config(home, appliance_config(None if mtls else router.url, standin))
        environment = {} if mtls else {JOIN_SECRET_ENV: JOIN_SECRET}
        appliance = start_server("appliance", home, *config, env=environment)
        stack.callback(appliance.stop)
        appliance.verify = router.verify
        appliance.wait_ready()
        chain = Chain(
            router=router,
            appliance=appliance,
            standin=standin,
            router_key=tenant_key(router.url, router_home, router.verify),
            appliance_key=tenant_key(appliance.url, home, router.verify),
            ca=ca,
        )
        wait_for_model(router, chain.router_key)
        check_path(chain)
        yield chain


def check_path(chain: Chain) -> None:
    """One request each way: the router's answer must come from the appliance, and the
    appliance must take its tenant key (a broken chain fails here, not as a fast table)."""
    body = json.loads(REQUEST_BODY)
    routed = httpx.post(
        f"{chain.router.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {chain.router_key}"},
        timeout=30,
        verify=chain.verify,
    )
    node = routed.headers.get("x-palisade-node")
    if routed.status_code != 200 or node != NODE_ID:
        raise RuntimeError(
            f"the router did not serve through the appliance (HTTP {routed.status_code}, "
            f"node {node!r}): {routed.text[:300]}\n{chain.router.tail()}"
        )
    direct = httpx.post(
        f"{chain.appliance.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {chain.appliance_key}"},
        timeout=30,
        verify=chain.verify,
    )
    if direct.status_code != 200:
        raise RuntimeError(f"the appliance refused its tenant key: {direct.text[:300]}")


def metered_requests(url: str, home: Path, verify: ssl.SSLContext | bool) -> int:
    """Requests of org ORG in the server's usage report (it flushes before answering)."""
    admin = Admin(url, (home / "admin.key").read_text().strip(), verify)
    total: int = admin.ok("GET", "/admin/v1/usage", org=ORG)["total"]["requests"]
    return total


# --- CPU per request --------------------------------------------------------------------------


@dataclass
class ProcessUsage:
    """What the server processes spent while the load generator ran one phase on a target."""

    ticks: dict[str, int] = field(default_factory=dict)  # CPU clock ticks, per process
    served: int = 0  # successful requests
    seconds: float = 0.0  # wall time of the load generator's calls

    def add(self, ticks: dict[str, int], served: int, seconds: float) -> None:
        for name, count in ticks.items():
            self.ticks[name] = self.ticks.get(name, 0) + count
        self.served += served
        self.seconds += seconds

    def cpu_ms_per_request(self) -> dict[str, float | None]:
        per_tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        served = self.served
        return {n: (t * per_tick_ms / served if served else None) for n, t in self.ticks.items()}

    def busy_cores(self) -> dict[str, float | None]:
        """Cores each process kept busy on average: near 1 for a process that is the
        bottleneck, well below for one that waits (on a lock, the disk, its upstream)."""
        per_tick_s = 1 / os.sysconf("SC_CLK_TCK")
        seconds = self.seconds
        return {n: (t * per_tick_s / seconds if seconds else None) for n, t in self.ticks.items()}


class MeteredLoad(LoadClient):
    """The load generator, with the CPU time each server process spent during every closed
    loop, and the requests it sent, added up per phase and target."""

    def __init__(self, scratch: Path, processes: dict[str, int]) -> None:
        super().__init__(scratch)
        self.processes = processes
        self.phase = "warm-up"
        self.usage: dict[str, dict[str, ProcessUsage]] = {}
        self.sent: dict[str, int] = {}

    def call(self, **command: Any) -> dict[str, Any]:
        if command.get("op") != "closed":
            return super().call(**command)
        before = {name: _ticks([pid]) for name, pid in self.processes.items()}
        began = time.perf_counter()
        result = super().call(**command)
        seconds = time.perf_counter() - began
        ticks = {name: _ticks([pid]) - before[name] for name, pid in self.processes.items()}
        target = str(command["target"])
        usage = self.usage.setdefault(self.phase, {}).setdefault(target, ProcessUsage())
        usage.add(ticks, result["ok"], seconds)
        self.sent[target] = self.sent.get(target, 0) + result["ok"] + sum(result["errors"].values())
        return result

    def report(self, phase: str) -> dict[str, dict[str, dict[str, float | None]]]:
        """Per target: CPU ms per successful request and busy cores, per server process."""
        return {
            target: {"cpu_ms_per_request": u.cpu_ms_per_request(), "busy_cores": u.busy_cores()}
            for target, u in self.usage.get(phase, {}).items()
        }


# --- summary ----------------------------------------------------------------------------------


def summarize(
    repeats: list[dict[str, dict[str, Any]]],
    saturation: dict[str, dict[str, Any]],
    targets: list[str],
    load: MeteredLoad,
) -> dict[str, Any]:
    c1 = summarize_c1(repeats, targets, HOP_BASES)
    chain = summarize_c1(repeats, ["router"], CHAIN_BASES)["router"]
    summary: dict[str, Any] = {
        "targets_measured": targets,
        "concurrency_1": c1,
        "chain_over_standin": {
            "added_p50_ms": chain["added_p50_ms"],
            "added_p99_ms": chain["added_p99_ms"],
        },
        "saturation": saturation,
        "processes": {
            "concurrency_1": load.report("concurrency_1"),
            "saturation": load.report("saturation"),
        },
    }
    summary["ratios"] = ratios(summary)
    summary["targets"] = judge(summary)
    return summary


def _saturation_ratio(saturation: dict[str, Any], top: str, bottom: str) -> float | None:
    if top not in saturation or bottom not in saturation:
        return None
    return _quotient(saturation[top]["achieved_per_s"], saturation[bottom]["achieved_per_s"])


def _added(summary: dict[str, Any], target: str, pct: str) -> float | None:
    row = summary["concurrency_1"].get(target)
    return None if row is None else row[f"added_{pct}_ms"]


def ratios(summary: dict[str, Any]) -> dict[str, float | None]:
    saturation = summary["saturation"]
    found: dict[str, float | None] = {
        f"{top}_vs_{bottom}_saturation": _saturation_ratio(saturation, top, bottom)
        for top, bottom in (
            ("appliance", "standin"),
            ("router", "appliance"),
            ("router", "standin"),
            ("litellm", "standin"),
            ("appliance", "litellm"),
            ("router", "litellm"),
        )
    }
    for pct in ("p50", "p99"):
        litellm = _added(summary, "litellm", pct)
        found[f"appliance_vs_litellm_added_{pct}"] = _quotient(
            _added(summary, "appliance", pct), litellm
        )
        found[f"chain_vs_litellm_added_{pct}"] = _quotient(
            summary["chain_over_standin"][f"added_{pct}_ms"], litellm
        )
    return found


def judge(summary: dict[str, Any]) -> list[dict[str, Any]]:
    appliance_p50 = _added(summary, "appliance", "p50")
    router_p50 = _added(summary, "router", "p50")
    rps = summary["saturation"].get("appliance", {}).get("achieved_per_s")
    return [
        _target(
            "appliance added p50, concurrency 1",
            appliance_p50,
            "ms",
            f"<= {APPLIANCE_ADDED_P50_MS:g} ms",
            _at_most(appliance_p50, APPLIANCE_ADDED_P50_MS),
        ),
        _target(
            "appliance saturation (tenant key)",
            rps,
            "req/s",
            f">= {APPLIANCE_SATURATION_RPS:,.0f} req/s",
            None if rps is None else rps >= APPLIANCE_SATURATION_RPS,
        ),
        _target(
            "router added p50 over the appliance, c=1",
            router_p50,
            "ms",
            f"<= {ROUTER_ADDED_P50_MS:g} ms",
            _at_most(router_p50, ROUTER_ADDED_P50_MS),
        ),
    ]


def warnings(
    summary: dict[str, Any],
    bench: Bench,
    metered: dict[str, int | None],
    sent: dict[str, int],
    litellm_skipped: str | None,
) -> list[str]:
    found = []
    if litellm_skipped is not None:
        found.append(f"LiteLLM columns skipped: {litellm_skipped}")
    contention = summary["contention"]
    if contention is not None and max(contention.values()) > BUSY_CORES:
        found.append(
            f"other processes used {contention['other_cores']:.2f} cores and the hypervisor "
            f"stole {contention['stolen_cores']:.2f} on average during the runs: the figures "
            "are unreliable; rerun on a quiet machine"
        )
    slow = [wait for wait in bench.settle_waits if wait >= SETTLE_TIMEOUT_S]
    if slow:
        found.append(f"{len(slow)} phases started before the servers were idle")
    if bench.noisy_phases:
        found.append(
            f"{bench.noisy_phases} of {len(bench.settle_waits)} phases started while other "
            "processes were busy"
        )
    for target, row in summary["concurrency_1"].items():
        errors = row["errors"] + summary["saturation"].get(target, {}).get("errors", 0)
        if errors:
            found.append(f"{errors} requests to {target} failed")
    for server, count in metered.items():
        # Every request sent to it (+1: `check_path`'s) must be in its usage, exactly once.
        expected = sent.get(server, 0) + 1
        if count != expected:
            found.append(
                f"the {server}'s usage report counts {count} requests of org {ORG}, "
                f"{expected} were sent to it"
            )
    return found


# --- report -----------------------------------------------------------------------------------


def print_table(
    summary: dict[str, Any], settings: Settings, found: list[str], load_average: str, mode: str
) -> None:
    print(
        f"\nChain benchmark: client -> router -> appliance (openai engine, tenant keys) -> "
        f"stand-in; chat completions, max_tokens {MAX_TOKENS}, {mode}; "
        f"load average {load_average}"
    )
    c1 = summary["concurrency_1"]
    print(f"\n  Concurrency 1, closed loop (median of {settings.repeats} interleaved repeats)")
    print(
        f"  {'target':<11}{'requests':>11}{'p50 ms':>9}{'p99 ms':>9}  {'hop':<25}"
        f"{'added p50':>10}{'added p99':>10}{'errors':>8}"
    )
    for target, row in c1.items():
        count = f"{row['repeats']}x{row['requests_per_repeat']}"
        print(
            f"  {target:<11}{count:>11}{_ms(row['p50_ms']):>9}{_ms(row['p99_ms']):>9}  "
            f"{HOP_LABELS.get(target, '-'):<25}{_signed(row['added_p50_ms']):>10}"
            f"{_signed(row['added_p99_ms']):>10}{row['errors']:>8}"
        )
    chain = summary["chain_over_standin"]
    print(
        f"  {'':<40}{'chain (router) over stand-in':<25}"
        f"{_signed(chain['added_p50_ms']):>10}{_signed(chain['added_p99_ms']):>10}"
    )
    print(
        f"\n  Saturation, closed loop, {settings.workers} workers, "
        f"{settings.saturation_seconds:g} s per target"
    )
    print(f"  {'target':<11}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for target, row in summary["saturation"].items():
        print(
            f"  {target:<11}{row['achieved_per_s']:>8,.0f}{_ms(row['p50_ms']):>9}"
            f"{_ms(row['p99_ms']):>9}{row['errors']:>8}"
        )
    for phase, title in (("concurrency_1", "concurrency 1"), ("saturation", "saturation")):
        print(f"\n  Server processes during {title}: CPU ms per request / busy cores")
        print(f"  {'target':<11}" + "".join(f"{name:>17}" for name in PROCESSES))
        for target, usage in summary["processes"][phase].items():
            cpu, cores = usage["cpu_ms_per_request"], usage["busy_cores"]
            print(
                f"  {target:<11}"
                + "".join(f"{_cpu(cpu.get(name), cores.get(name)):>17}" for name in PROCESSES)
            )
    print("\n  Ratios")
    for name, value in summary["ratios"].items():
        print(f"  {name:<42}{'-' if value is None else f'{value:.2f}x':>10}")
    print("\n  Targets (issue 16; informational, never asserted)")
    print(f"  {'':<42}{'value':>14}{'goal':>16}{'result':>8}")
    for row in summary["targets"]:
        value = row["value"]
        shown = "n/a" if value is None else f"{value:+.2f} ms"
        if value is not None and row["unit"] == "req/s":
            shown = f"{value:,.0f} req/s"
        print(f"  {row['name']:<42}{shown:>14}{row['goal']:>16}{_verdict(row['met']):>8}")
    for warning in found:
        print(f"  WARNING: {warning}")


def _cpu(ms: float | None, cores: float | None) -> str:
    return "-" if ms is None or cores is None else f"{ms:.2f} / {cores:.2f}"


def _load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    return "unknown"


def write_json(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "chain.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


# --- the run ----------------------------------------------------------------------------------


@dataclass
class _Litellm:
    version: str | None = None
    skipped: str | None = None
    server: Server | None = None


def _start_litellm(
    settings: Settings, standin: RunningStandin, scratch: Path, stack: contextlib.ExitStack
) -> _Litellm:
    found = _Litellm(skipped=None if settings.litellm else "--no-litellm")
    if not settings.litellm:
        return found
    found.version, found.skipped = prepare_litellm(LITELLM_VENV)
    if found.skipped is not None:
        print(f"  LiteLLM unavailable, skipping its column: {found.skipped}", flush=True)
        return found
    try:
        found.server = stack.enter_context(run_litellm(LITELLM_VENV, standin, scratch))
    except (RuntimeError, TimeoutError) as exc:
        found.skipped = f"LiteLLM did not start: {exc}"
        print(f"  {found.skipped}", flush=True)
    return found


def endpoints(chain: Chain, litellm: Server | None) -> dict[str, dict[str, Any]]:
    json_header = {"Content-Type": "application/json"}
    # The router and the appliance serve HTTPS from the fleet CA in the mTLS chain.
    trust = {} if chain.ca is None else {"cafile": str(chain.ca)}
    found: dict[str, dict[str, Any]] = {
        "standin": {"url": f"{chain.standin.v1}/chat/completions", "headers": json_header},
        "appliance": {
            "url": f"{chain.appliance.v1}/chat/completions",
            "headers": json_header | {"Authorization": f"Bearer {chain.appliance_key}"},
        }
        | trust,
        "router": {
            "url": f"{chain.router.url}/v1/chat/completions",
            "headers": json_header | {"Authorization": f"Bearer {chain.router_key}"},
        }
        | trust,
    }
    if litellm is not None:
        found["litellm"] = {
            "url": f"{litellm.url}/v1/chat/completions",
            "headers": json_header | {"Authorization": f"Bearer {LITELLM_KEY}"},
        }
    return found


def _warm(bench: Bench, litellm: _Litellm) -> None:
    """Warm every target; drop LiteLLM if it never answered, fail on any other."""
    for target, result in bench.warm_up().items():
        if result["ok"] > 0:
            continue
        if target == "litellm" and litellm.server is not None:
            litellm.skipped = f"every warm-up request to LiteLLM failed ({result['errors']})"
            print(f"  {litellm.skipped}:\n{litellm.server.tail()}", flush=True)
            bench.targets.remove("litellm")
            continue
        raise RuntimeError(f"every warm-up request to {target} failed ({result['errors']})")


def transport(*, mtls: bool) -> str:
    if mtls:
        return (
            "enrolled appliance: HTTPS (fleet CA) to the router and to the appliance, mTLS "
            "router -> appliance, plain HTTP appliance -> stand-in"
        )
    return "appliance joined with the lab join secret, plain HTTP on every hop"


def run(
    *,
    out_dir: Path,
    settings: Settings | None = None,
    stream: bool = False,
    mtls: bool = False,
) -> dict[str, Any]:
    """Run the benchmark, print the table, write `out_dir`/chain.json; returns the summary."""
    settings = settings_for_chain(settings or Settings())
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = "standin, appliance, router" + (", litellm" if settings.litellm else "")
    kind = "streamed" if stream else "non-streaming"
    print(
        f"Chain benchmark: {targets}; model {MODEL!r}, max_tokens {MAX_TOKENS}, {kind}",
        flush=True,
    )
    load_before = _load_average()
    with (
        tempfile.TemporaryDirectory(prefix="chain-bench-", dir=out_dir) as scratch_dir,
        contextlib.ExitStack() as stack,
    ):
        scratch = Path(scratch_dir)
        chain = stack.enter_context(run_chain(scratch, mtls=mtls))
        litellm = _start_litellm(settings, chain.standin, scratch, stack)
        processes = chain.pids()
        if litellm.server is not None:
            processes["litellm"] = litellm.server.process.pid
        load = MeteredLoad(scratch, processes)
        stack.callback(load.close)
        load.call(
            op="setup",
            targets=endpoints(chain, litellm.server),
            body=request_body(stream=stream),
            timeout_s=settings.timeout_s,
            connections=CONNECTIONS,
        )
        servers = list(processes.values())
        own = [os.getpid(), load.process.pid, *servers]
        bench = Bench(settings, load, list(endpoints(chain, litellm.server)), servers, own)
        _warm(bench, litellm)
        watch = CpuWatch(*own)
        load.phase = "concurrency_1"
        repeats = bench.concurrency_one()
        load.phase = "saturation"
        saturation = bench.saturation()
        contention = watch.report()
        summary = summarize(repeats, saturation, bench.targets, load)
        summary["contention"] = contention
        verify = chain.verify
        metered: dict[str, int | None] = {
            "appliance": metered_requests(chain.appliance.url, chain.appliance.home, verify),
            "router": metered_requests(chain.router.url, scratch / "router", verify),
        }
        found = warnings(summary, bench, metered, load.sent, litellm.skipped)
    load_after = _load_average()
    print_table(
        summary,
        settings,
        found,
        f"{load_before} -> {load_after}",
        f"{kind}, {transport(mtls=mtls)}",
    )
    report = {
        "benchmark": "chain",
        "machine": machine_info(litellm.version)
        | {"load_average_before": load_before, "load_average_after": load_after},
        "setup": {
            "model": MODEL,
            "max_tokens": MAX_TOKENS,
            "request_body": json.loads(request_body(stream=stream)),
            "stream": stream,
            "transport": transport(mtls=mtls),
            "tenant_keys": f"org {ORG!r} (region {REGION!r}), org_user keys from each "
            "server's admin API; org logging mode: the default",
            "repeats": settings.repeats,
            "requests": settings.requests,
            "litellm_requests": settings.litellm_requests,
            "saturation_seconds": settings.saturation_seconds,
            "saturation_workers": settings.workers,
            "warmup_requests": settings.warmup_requests,
            "timeout_s": settings.timeout_s,
            "quiet_wait_s": settings.quiet_wait_s,
            "litellm": litellm.version,
            "litellm_skipped": litellm.skipped,
            "settle_waits_s": bench.settle_waits,
            "noisy_phases": bench.noisy_phases,
            "requests_sent": load.sent,
            "usage_metered": metered,
        },
        "summary": summary,
        "concurrency_1_repeats": repeats,
        "warnings": found,
    }
    path = write_json(report, out_dir)
    print(f"\nwrote {path}")
    return summary
