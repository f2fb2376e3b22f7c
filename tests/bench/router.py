"""Router overhead benchmark: the Palisade router, with plain HTTP and with TLS on every hop,
and the LiteLLM proxy, each in front of a fast stand-in upstream, against the stand-in
reached directly, in one run.

Every target is a real process on 127.0.0.1. Two fleets of one router and one stand-in node
(`tests.standin`, zero delay) each; in both `palisade router serve --demo-regions bench`
has auth, selection, admission and metering on, and the stand-in is registered as node
`standin` by heartbeats sent from this process:

- plain (`direct`, `router`): the lab switch `PALISADE_LAB_JOIN_SECRET` on, plain HTTP from
  the client to the router and from the router to the node, heartbeats HMAC-signed;
- mTLS (`direct_tls`, `router_mtls`): the stand-in enrolled like a real node (a token from
  the admin API, `palisade node init`, `palisade node enroll`) and serving HTTPS with its
  node certificate; the router serving its public listener over HTTPS with a certificate
  from its fleet CA (as `palisade fleet up` does), reaching the node with its own fleet
  certificate (mTLS), heartbeats over mTLS to its fleet listener. The client trusts the
  fleet CA, both for the router and for the stand-in reached directly.

`router` is measured against `direct`, `router_mtls` against `direct_tls` (the client's own
TLS costs the same on both sides), so "added" is what the router adds in each mode. The
LiteLLM proxy (installed by this benchmark into its own virtual env under
var/bench/litellm-venv) fronts the plain stand-in. Requests are non-streaming chat
completions with a small body and `max_tokens` 8, sent by a load generator in a process of
its own (`tests.bench.loadgen`, aiohttp on uvloop, connections kept alive). Phases:

1. concurrency 1, closed loop: each repeat sends every target its requests in interleaved
   chunks; p50/p99 per target per repeat, and the added p50/p99 (target minus its direct
   base in the same repeat); the table shows the median across repeats.
2. open loop at fixed rates: requests start on schedule whatever the completions, latency
   runs from the scheduled start; errors (timeouts included) are counted, never hidden.
3. saturation: a closed loop of many concurrent workers; achieved requests/s.

Each phase starts once the servers are idle, and then on warm connection pools: a few
unmeasured requests with the phase's concurrency first (`Bench.rewarm`), since waiting for
quiet outlasts the servers' keep-alive and a cold pool's TLS handshakes are not the
router's per-request cost.

The machine's cores are shared by the load generator, the proxies and the upstream, so only
medians, differences and ratios mean anything; the targets are informational, never asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import httpx

from federation import (
    ENCODER,
    JOIN_SECRET_ENV,
    SIGNATURE_HEADER,
    Heartbeat,
    NodeCredentials,
    NodeModel,
    client_context,
    sign_fleet_message,
)
from router._private.local_fleet import public_certificate
from tests.bench.engine import BUSY_CORES, CpuWatch
from tests.standin import RunningStandin, StandinTLS, run_standin
from tests.support import REPO, wait_for
from tests.support import stop as stop_process

MODEL = "standin-model"
REGION = "bench"
NODE_ID = "standin"
MAX_TOKENS = 8
REQUEST_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": MAX_TOKENS,
    }
)
JOIN_SECRET = "router-bench-join-secret"  # noqa: S105 - a throwaway local fleet
LITELLM_KEY = "sk-router-bench-master-key"
CHUNKS = 10  # concurrency-1 requests are sent in this many interleaved chunks per repeat
REWARM_WORKERS = 16  # connections opened before an open-loop phase (see Bench.rewarm)
CONNECTIONS = 4096
HEARTBEAT_S = 1.0
SETTLE_CORES = 0.25  # before each phase, wait until the servers use less CPU than this
SETTLE_TIMEOUT_S = 60.0
QUIET_CORES = 0.3  # ... and, for at most Settings.quiet_wait_s, until other processes use less

# Targets from the issue (informational: PASS/MISS is printed, never asserted).
C1_ADDED_P50_MS = 1.0
C1_ADDED_P99_MS = 3.0
OPEN_RATE = 500.0
OPEN_ADDED_P99_MS = 10.0
SATURATION_RPS = 1500.0
LITELLM_RATIO = 0.2

# Always here, whatever --out says, so it is installed once.
LITELLM_VENV = REPO / "var" / "bench" / "litellm-venv"
_ROUTER_LISTENING = re.compile(r"listening on (?P<url>https?://\S+)")
_FLEET_LISTENING = re.compile(r"fleet \(mTLS\) on (?P<url>https://[^\s,]+)")
# Each router-through target, and the target it is measured against.
BASES = {
    "router": "direct",
    "litellm": "direct",
    "router_mtls": "direct_tls",
    "router_observed": "direct",
}
# `router_observed`: the plain router with JSON logs (an access line per request) and traces
# sampled at 1 % to an OTLP/HTTP sink; what that adds over `router` should stay small.
OBSERVED_ARGS = ("--log-format", "json", "--trace-sample-ratio", "0.01")
OBSERVED_ADDED_P50_MS = 0.1
_API_KEY = re.compile(r"pal-sk-\S+")


@dataclass(frozen=True)
class Settings:
    repeats: int = 3
    requests: int = 2000
    litellm_requests: int = 500
    rates: tuple[float, ...] = (200.0, 500.0)
    open_seconds: float = 5.0
    saturation_seconds: float = 5.0
    workers: int = 32
    warmup_requests: int = 200
    timeout_s: float = 10.0
    quiet_wait_s: float = 20.0
    litellm: bool = True
    observed: bool = True  # also the router with JSON logs and traces on (`router_observed`)


# --- processes --------------------------------------------------------------------------------


@dataclass
class Server:
    """A server process of the benchmark; `output` collects what it printed (when piped)."""

    name: str
    process: subprocess.Popen[str]
    url: str = ""
    output: list[str] = field(default_factory=list)
    log: Path | None = None
    # A router's fleet listener (mTLS), and what verifies its certificates (https:// only).
    fleet_url: str = ""
    verify: ssl.SSLContext | bool = True

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log is not None else ""
        return "".join(text.splitlines(keepends=True)[-lines:] or self.output[-lines:])

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n" + self.tail())

    def wait_http(self, path: str, timeout: float) -> None:
        """Until `GET url+path` answers 200 (fails at once if the process exits)."""

        def ready() -> bool:
            self.alive()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.url + path, timeout=2, verify=self.verify).status_code == 200
            return False

        try:
            wait_for(ready, timeout=timeout, interval=0.25)
        except TimeoutError:
            raise TimeoutError(
                f"{self.name} was not ready in {timeout:g} s:\n{self.tail()}"
            ) from None

    def stop(self) -> None:
        stop_process(self.process)


def _pump(process: subprocess.Popen[str], output: list[str], found: threading.Event) -> None:
    """Collect the router's output; `found` once it printed its fleet listener (after the
    public one)."""
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line)
        if _FLEET_LISTENING.search(line):
            found.set()
    found.set()


@contextlib.contextmanager
def run_router(
    home: Path, *, tls: bool, ready_timeout: float = 60.0, extra: Sequence[str] = ()
) -> Iterator[tuple[Server, str]]:
    """`palisade router serve --port 0 --fleet-port 0 --demo-regions bench`; yields it and
    the demo key. With `tls` its public listener serves HTTPS with a certificate from its
    fleet CA, and nodes must be enrolled; without, it runs with the lab join secret."""
    environment = {k: v for k, v in os.environ.items() if k != JOIN_SECRET_ENV}
    environment |= {"PALISADE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "palisade", "router", "serve", "--port", "0"]
    command += ["--fleet-port", "0", "--demo-regions", REGION, *extra]
    verify: ssl.SSLContext | bool = True
    if tls:
        home.mkdir(parents=True, exist_ok=True)
        ca, cert = public_certificate(home)
        command += ["--tls-cert", str(cert), "--tls-key", str(home / "node.key")]
        verify = ssl.create_default_context(cafile=ca)
    else:
        environment[JOIN_SECRET_ENV] = JOIN_SECRET
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        cwd=REPO,
    )
    server = Server("router-mtls" if tls else "router", process, verify=verify)
    found = threading.Event()
    reader = threading.Thread(target=_pump, args=(process, server.output, found), daemon=True)
    reader.start()
    try:
        found.wait(ready_timeout)
        text = "".join(server.output)
        match, fleet = _ROUTER_LISTENING.search(text), _FLEET_LISTENING.search(text)
        if match is None or fleet is None:
            raise RuntimeError("the router did not start:\n" + server.tail())
        server.url, server.fleet_url = match["url"], fleet["url"]
        key_file = home / "demo.key"

        def key_written() -> bool:
            server.alive()
            written = [key_file, home / "admin.key"]
            return all(path.is_file() and path.read_text().strip() for path in written)

        wait_for(key_written, timeout=ready_timeout, interval=0.05)
        yield server, key_file.read_text().strip()
    finally:
        server.stop()
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def enroll_standin(
    router: Server, router_home: Path, home: Path, node_id: str = NODE_ID
) -> NodeCredentials:
    """Enroll `node_id` (default: the stand-in's) as an operator would: a one-time token from
    the admin API, then `palisade node init` and `palisade node enroll` (real processes) in
    `home`."""
    admin = (router_home / "admin.key").read_text().strip()
    reply = httpx.post(
        f"{router.url}/admin/v1/fleet/tokens",
        json={"region": REGION, "node_id": node_id, "ttl_s": 600},
        headers={"Authorization": f"Bearer {admin}"},
        verify=router.verify,
        timeout=30,
    )
    if reply.status_code != 201:
        raise RuntimeError(f"the router refused an enrollment token: {reply.text}")
    token = reply.json()["token"]
    steps = [
        ["init", "--region", REGION, "--node-id", node_id, "--host", "127.0.0.1"],
        ["enroll", "--router", router.fleet_url, "--token", token],
    ]
    for step in steps:
        result = subprocess.run(
            [sys.executable, "-m", "palisade", "node", *step],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env=os.environ | {"PALISADE_HOME": str(home)},
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"palisade node {step[0]} failed:\n{result.stdout}{result.stderr}")
    return NodeCredentials.load(home)


class Heartbeats(threading.Thread):
    """Registers the stand-in with a router as node `standin`, one beat a second: signed
    with the lab secret (plain fleet), or sent over mTLS with the node's certificate."""

    def __init__(
        self,
        router_url: str,
        standin_url: str,
        *,
        secret: bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(name="heartbeats", daemon=True)
        self.url = f"{router_url}/federation/v1/heartbeat"
        self.standin_url = standin_url
        self.secret = secret
        self.tls = tls
        self.stopping = threading.Event()
        self.sent = 0
        self.failures: list[str] = []
        self.slowest_ms = 0.0

    def beat(self, client: httpx.Client, sequence: int) -> None:
        heartbeat = Heartbeat(
            node_id=NODE_ID,
            region=REGION,
            url=self.standin_url,
            version="bench",
            sequence=sequence,
            models=[
                NodeModel(
                    id=MODEL, device_class="gpu", context_length=4096, ready=True, ttft_ewma_ms=1.0
                )
            ],
        )
        body = ENCODER.encode(heartbeat)
        headers = {"Content-Type": "application/json"}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign_fleet_message(self.secret, body)
        started = time.perf_counter()
        try:
            reply = client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            return
        self.slowest_ms = max(self.slowest_ms, (time.perf_counter() - started) * 1000)
        self.sent += 1
        if reply.status_code != 200:
            self.failures.append(f"HTTP {reply.status_code}: {reply.text[:200]}")

    def run(self) -> None:
        began = time.monotonic()
        with httpx.Client(timeout=HEARTBEAT_S * 2, verify=self.tls or True) as client:
            sequence = 0
            while True:
                self.beat(client, sequence)
                sequence += 1
                wait = began + sequence * HEARTBEAT_S - time.monotonic()
                if self.stopping.wait(max(0.0, wait)):
                    return

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def wait_for_model(router: Server, key: str, *, timeout: float = 30.0) -> None:
    """Until the router lists MODEL for the demo key (the node has joined)."""
    headers = {"Authorization": f"Bearer {key}"}

    def listed() -> bool:
        router.alive()
        with contextlib.suppress(httpx.HTTPError):
            url = f"{router.url}/v1/models"
            reply = httpx.get(url, headers=headers, timeout=5, verify=router.verify)
            return reply.status_code == 200 and MODEL in {m["id"] for m in reply.json()["data"]}
        return False

    wait_for(listed, timeout=timeout, interval=0.1)


@dataclass
class BenchFleet:
    """A router with the stand-in as its one node, plain or mTLS."""

    router: Server
    key: str
    standin: RunningStandin
    heartbeats: Heartbeats
    # The fleet CA that clients trust (mTLS fleet only).
    ca: Path | None = None

    def pids(self) -> list[int]:
        return [self.standin.process.pid, self.router.process.pid]


@contextlib.contextmanager
def run_fleet(home: Path, *, tls: bool, extra: Sequence[str] = ()) -> Iterator[BenchFleet]:
    """The router, then (mTLS) the stand-in's enrollment, the stand-in, its heartbeats, and
    a wait until the router lists its model."""
    with contextlib.ExitStack() as stack:
        router, key = stack.enter_context(run_router(home / "router", tls=tls, extra=extra))
        settings: dict[str, Any] = {"tokens": MAX_TOKENS, "model": MODEL}
        ca = None
        if tls:
            node = enroll_standin(router, home / "router", home / "standin")
            ca = node.ca_path
            settings |= {
                "tls": StandinTLS(node.cert_path, node.key_path, node.ca_path),
                "verify": router.verify,
            }
        standin = stack.enter_context(run_standin(**settings))
        if tls:
            assert ca is not None
            node_tls = client_context(ca, node.cert_path, node.key_path)
            heartbeats = Heartbeats(router.fleet_url, standin.url, tls=node_tls)
        else:
            heartbeats = Heartbeats(router.url, standin.url, secret=JOIN_SECRET.encode())
        heartbeats.start()
        stack.callback(heartbeats.stop)
        wait_for_model(router, key)
        yield BenchFleet(router, key, standin, heartbeats, ca)


# --- LiteLLM ----------------------------------------------------------------------------------

_LITELLM_CHECK = """
import importlib.metadata, importlib.util, sys
if any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "backoff", "yaml")):
    sys.exit(1)
print(importlib.metadata.version("litellm"))
"""


def _litellm_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not (python.is_file() and (venv / "bin" / "litellm").is_file()):
        return None
    try:
        result = subprocess.run(
            [str(python), "-c", _LITELLM_CHECK],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def prepare_litellm(venv: Path) -> tuple[str | None, str | None]:
    """(LiteLLM version, None) once `venv` has litellm[proxy]; (None, why not) otherwise."""
    found = _litellm_version(venv)
    if found is not None:
        return found, None
    log = venv.parent / "litellm-install.log"
    print(f"  installing litellm[proxy] into {venv} (log: {log}) ...", flush=True)
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            if not (venv / "bin" / "python").is_file():
                subprocess.run(
                    [sys.executable, "-m", "venv", str(venv)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=300,
                    check=True,
                )
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "litellm[proxy]"],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=1800,
                check=True,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"installing litellm[proxy] failed ({exc}); see {log}"
    found = _litellm_version(venv)
    if found is None:
        return None, f"litellm[proxy] is still not importable after pip install; see {log}"
    return found, None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def litellm_config(standin: RunningStandin) -> str:
    return (
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {standin.v1}\n"
        "      api_key: anything\n"
        "litellm_settings:\n"
        "  telemetry: False\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
    )


@contextlib.contextmanager
def run_litellm(
    venv: Path, standin: RunningStandin, scratch: Path, *, ready_timeout: float = 180.0
) -> Iterator[Server]:
    """The LiteLLM proxy (one worker, no database, no telemetry) routing MODEL to the stand-in."""
    config = scratch / "litellm.yaml"
    config.write_text(litellm_config(standin))
    port = _free_port()
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_HOST", "REDIS_URL"}
    }
    environment |= {
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "PYTHONUNBUFFERED": "1",
    }
    log = scratch / "litellm.log"
    command = [str(venv / "bin" / "litellm"), "--config", str(config)]
    command += ["--port", str(port), "--host", "127.0.0.1", "--num_workers", "1"]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, text=True, env=environment, cwd=scratch
        )
    server = Server("litellm", process, url=f"http://127.0.0.1:{port}", log=log)
    try:
        server.wait_http("/health/liveliness", ready_timeout)
        yield server
    finally:
        server.stop()


# --- the load generator -----------------------------------------------------------------------


class LoadClient:
    """Talks to `python -m tests.bench.loadgen` (a process of its own) one JSON line at a time."""

    def __init__(self, scratch: Path) -> None:
        self.errlog = scratch / "loadgen.log"
        self._err: IO[str] = self.errlog.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            cwd=REPO,
        )

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=10)
            raise RuntimeError("the load generator died:\n" + self.errlog.read_text()[-3000:])
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.call_quit()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._err.close()

    def call_quit(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.process.stdin.close()


def wait_idle(servers: Sequence[int], ours: Sequence[int], quiet_wait: float) -> tuple[float, bool]:
    """Before a phase: wait until the `servers` are idle (a proxy may still be draining a
    backlog), then, for up to `quiet_wait` seconds, until the rest of the machine is quiet
    (processes not in `ours`). Returns the seconds waited and whether it was quiet."""
    began = time.monotonic()
    while time.monotonic() - began < SETTLE_TIMEOUT_S:
        if _cores(lambda: _ticks(servers)) < SETTLE_CORES:
            break
    quiet_from = time.monotonic()
    quiet = False
    while not quiet:
        quiet = _cores(lambda: _machine_ticks() - _ticks(ours)) < QUIET_CORES
        if time.monotonic() - quiet_from >= quiet_wait:
            break
    return time.monotonic() - began, quiet


def _cores(ticks: Callable[[], int], window: float = 0.3) -> float:
    before = ticks()
    time.sleep(window)
    return (ticks() - before) / os.sysconf("SC_CLK_TCK") / window


def _machine_ticks() -> int:
    with contextlib.suppress(OSError, ValueError):
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq = values[:7]
        return user + nice + system + irq + softirq
    return 0


def _ticks(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total


# --- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _minus(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def _merge(into: dict[str, int], errors: dict[str, int]) -> None:
    for kind, count in errors.items():
        into[kind] = into.get(kind, 0) + count


def latency_stats(result: dict[str, Any]) -> dict[str, Any]:
    latencies: list[float] = result["latencies_ms"]
    errors: dict[str, int] = result["errors"]
    return {
        "ok": result["ok"],
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies, default=None),
        "elapsed_s": result["elapsed_s"],
        "achieved_per_s": result["ok"] / result["elapsed_s"] if result["elapsed_s"] else 0.0,
    }


# --- phases -----------------------------------------------------------------------------------


@dataclass
class Bench:
    settings: Settings
    load: LoadClient
    targets: list[str]
    server_pids: list[int]
    own_pids: list[int]
    settle_waits: list[float] = field(default_factory=list)
    noisy_phases: int = 0

    def settle(self) -> None:
        waited, quiet = wait_idle(self.server_pids, self.own_pids, self.settings.quiet_wait_s)
        self.settle_waits.append(round(waited, 2))
        self.noisy_phases += not quiet

    def rewarm(self, target: str, workers: int) -> None:
        """Unmeasured requests with `workers` at once, just before a phase: the wait for
        quiet outlasts the servers' keep-alive (5 s), and a phase must not start on a cold
        connection pool, whose TLS handshakes (both hops with mTLS) would be measured as
        the router's latency. Pools are kept warm in steady state; the cold start is a
        separate cost (docs/architecture.md, "The cost of TLS on every hop")."""
        self.load.call(op="closed", target=target, workers=workers, requests=workers * 4)

    def count(self, target: str) -> int:
        return self.settings.litellm_requests if target == "litellm" else self.settings.requests

    def warm_up(self) -> dict[str, dict[str, Any]]:
        """Unmeasured requests per target, one at a time then 8 at once (LiteLLM starts slow)."""
        found = {}
        for target in self.targets:
            first = self.load.call(
                op="closed", target=target, workers=1, requests=self.settings.warmup_requests
            )
            burst = self.load.call(
                op="closed", target=target, workers=8, requests=self.settings.warmup_requests
            )
            errors: dict[str, int] = {}
            _merge(errors, first["errors"])
            _merge(errors, burst["errors"])
            found[target] = {"ok": first["ok"] + burst["ok"], "errors": errors}
            print(
                f"  warm-up {target}: {found[target]['ok']} ok, {sum(errors.values())} errors",
                flush=True,
            )
        return found

    def concurrency_one(self) -> list[dict[str, dict[str, Any]]]:
        """Per repeat: interleaved chunks of sequential requests; stats per target."""
        repeats = []
        for repeat in range(self.settings.repeats):
            self.settle()
            for target in self.targets:
                self.rewarm(target, workers=1)
            latencies: dict[str, list[float]] = {target: [] for target in self.targets}
            errors: dict[str, dict[str, int]] = {target: {} for target in self.targets}
            elapsed = dict.fromkeys(self.targets, 0.0)
            for chunk in range(CHUNKS):
                order = self.targets[chunk % len(self.targets) :]
                order += self.targets[: chunk % len(self.targets)]
                for target in order:
                    total = self.count(target)
                    size = total // CHUNKS + (1 if chunk < total % CHUNKS else 0)
                    if size == 0:
                        continue
                    result = self.load.call(op="closed", target=target, workers=1, requests=size)
                    latencies[target] += result["latencies_ms"]
                    _merge(errors[target], result["errors"])
                    elapsed[target] += result["elapsed_s"]
            stats = {
                target: latency_stats(
                    {
                        "latencies_ms": latencies[target],
                        "ok": len(latencies[target]),
                        "errors": errors[target],
                        "elapsed_s": elapsed[target],
                    }
                )
                for target in self.targets
            }
            repeats.append(stats)
            print(
                f"  concurrency 1, repeat {repeat + 1}: "
                + " | ".join(f"{t} p50 {_ms(s['p50_ms'])} ms" for t, s in stats.items()),
                flush=True,
            )
        return repeats

    def open_loop(self) -> dict[str, dict[str, dict[str, Any]]]:
        found: dict[str, dict[str, dict[str, Any]]] = {}
        for rate in self.settings.rates:
            row: dict[str, dict[str, Any]] = {}
            for target in self.targets:
                self.settle()
                self.rewarm(target, workers=REWARM_WORKERS)
                result = self.load.call(
                    op="open", target=target, rate=rate, seconds=self.settings.open_seconds
                )
                stats = latency_stats(result) | {
                    "rate": rate,
                    "scheduled": result["scheduled"],
                    "sent_per_s": result["sent_per_s"],
                    "start_lag_p99_ms": result["start_lag_p99_ms"],
                }
                row[target] = stats
                print(
                    f"  open loop {rate:g}/s, {target}: p50 {_ms(stats['p50_ms'])} ms, "
                    f"p99 {_ms(stats['p99_ms'])} ms, {stats['errors']} errors",
                    flush=True,
                )
            found[_rate_key(rate)] = row
        return found

    def saturation(self) -> dict[str, dict[str, Any]]:
        found = {}
        for target in self.targets:
            self.settle()
            self.rewarm(target, workers=self.settings.workers)
            result = self.load.call(
                op="closed",
                target=target,
                workers=self.settings.workers,
                seconds=self.settings.saturation_seconds,
            )
            found[target] = latency_stats(result)
            print(
                f"  saturation, {target}: {found[target]['achieved_per_s']:,.0f} req/s, "
                f"{found[target]['errors']} errors",
                flush=True,
            )
        return found


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- summary ----------------------------------------------------------------------------------


def summarize_c1(
    repeats: list[dict[str, dict[str, Any]]],
    targets: list[str],
    bases: Mapping[str, str] = BASES,
) -> dict[str, Any]:
    """Per target: medians across repeats, and what it adds over its base in `bases`."""
    found: dict[str, Any] = {}
    for target in targets:
        rows = [repeat[target] for repeat in repeats]
        base = bases.get(target)
        added50 = [_minus(r[target]["p50_ms"], r[base]["p50_ms"]) for r in repeats if base]
        added99 = [_minus(r[target]["p99_ms"], r[base]["p99_ms"]) for r in repeats if base]
        found[target] = {
            "requests_per_repeat": rows[0]["ok"] + rows[0]["errors"],
            "repeats": len(rows),
            "base": base,
            "p50_ms": _median([row["p50_ms"] for row in rows]),
            "p99_ms": _median([row["p99_ms"] for row in rows]),
            "added_p50_ms": None if base is None else _median(added50),
            "added_p99_ms": None if base is None else _median(added99),
            "errors": sum(row["errors"] for row in rows),
            "per_repeat": [
                {"p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"], "errors": row["errors"]}
                for row in rows
            ],
        }
    return found


def _with_added(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {}
    for target, row in rows.items():
        base = rows.get(BASES.get(target, ""))
        found[target] = row | {
            "added_p50_ms": None if base is None else _minus(row["p50_ms"], base["p50_ms"]),
            "added_p99_ms": None if base is None else _minus(row["p99_ms"], base["p99_ms"]),
        }
    return found


def _target(name: str, value: float | None, unit: str, goal: str, met: bool | None) -> Any:
    return {"name": name, "value": value, "unit": unit, "goal": goal, "met": met}


ROUTER_TARGETS = {"router": "router", "router_mtls": "router (mTLS)"}


def judge(summary: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for target, label in ROUTER_TARGETS.items():
        if target in summary["concurrency_1"]:
            found += _judge_router(summary, target, label)
    found += _judge_observed(summary["concurrency_1"])
    ratio = summary["ratios"]["router_vs_litellm_added_p50"]
    found.append(
        _target(
            "router added p50 / LiteLLM added p50",
            ratio,
            "",
            f"<= {LITELLM_RATIO:g}",
            _at_most(ratio, LITELLM_RATIO),
        )
    )
    return found


def _judge_observed(c1: dict[str, Any]) -> list[dict[str, Any]]:
    """What JSON logs and 1 %-sampled traces add to the router's added p50 (same run)."""
    if "router_observed" not in c1 or "router" not in c1:
        return []
    growth = _minus(c1["router_observed"]["added_p50_ms"], c1["router"]["added_p50_ms"])
    return [
        _target(
            "JSON logs + traces (1 %) growth of added p50, concurrency 1",
            growth,
            "ms",
            f"<= {OBSERVED_ADDED_P50_MS:g} ms",
            _at_most(growth, OBSERVED_ADDED_P50_MS),
        )
    ]


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """An OTLP/HTTP endpoint that accepts every export (the benchmark reads nothing of it)."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _judge_router(summary: dict[str, Any], target: str, label: str) -> list[dict[str, Any]]:
    router = summary["concurrency_1"][target]
    found = [
        _target(
            f"{label} added p50, concurrency 1",
            router["added_p50_ms"],
            "ms",
            f"<= {C1_ADDED_P50_MS:g} ms",
            _at_most(router["added_p50_ms"], C1_ADDED_P50_MS),
        ),
        _target(
            f"{label} added p99, concurrency 1",
            router["added_p99_ms"],
            "ms",
            f"<= {C1_ADDED_P99_MS:g} ms",
            _at_most(router["added_p99_ms"], C1_ADDED_P99_MS),
        ),
    ]
    at_rate = summary["open_loop"].get(_rate_key(OPEN_RATE), {}).get(target)
    added = at_rate["added_p99_ms"] if at_rate else None
    errors = at_rate["errors"] if at_rate else None
    found.append(
        _target(
            f"{label} added p99 at {OPEN_RATE:g} req/s",
            added,
            "ms",
            f"<= {OPEN_ADDED_P99_MS:g} ms",
            _at_most(added, OPEN_ADDED_P99_MS),
        )
    )
    found.append(
        _target(
            f"{label} errors at {OPEN_RATE:g} req/s",
            errors,
            "",
            "0",
            None if errors is None else errors == 0,
        )
    )
    rps = summary["saturation"][target]["achieved_per_s"]
    found.append(
        _target(
            f"{label} saturation throughput",
            rps,
            "req/s",
            f">= {SATURATION_RPS:,.0f} req/s",
            rps >= SATURATION_RPS,
        )
    )
    return found


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def ratios(summary: dict[str, Any]) -> dict[str, float | None]:
    c1, saturation = summary["concurrency_1"], summary["saturation"]
    found: dict[str, float | None] = {
        "router_vs_litellm_added_p50": None,
        "router_vs_litellm_added_p99": None,
        "router_vs_direct_saturation": _ratio(saturation, "router", "direct"),
        "litellm_vs_direct_saturation": None,
        "router_vs_litellm_saturation": None,
        # TLS on every hop against plain HTTP: the router's added latency and throughput.
        "mtls_vs_plain_added_p50": None,
        "mtls_vs_plain_added_p99": None,
        "router_mtls_vs_direct_tls_saturation": _ratio(saturation, "router_mtls", "direct_tls"),
        "mtls_vs_plain_saturation": _ratio(saturation, "router_mtls", "router"),
    }
    for pct in ("p50", "p99"):
        for theirs, key in (("litellm", "router_vs_litellm"), ("router_mtls", "mtls_vs_plain")):
            if theirs not in c1:
                continue
            # router/LiteLLM: ours over theirs; mTLS/plain: the mTLS router over the plain one.
            top, bottom = ("router", theirs) if theirs == "litellm" else (theirs, "router")
            found[f"{key}_added_{pct}"] = _quotient(
                c1[top][f"added_{pct}_ms"], c1[bottom][f"added_{pct}_ms"]
            )
    if "litellm" in saturation:
        found["litellm_vs_direct_saturation"] = _ratio(saturation, "litellm", "direct")
        found["router_vs_litellm_saturation"] = _ratio(saturation, "router", "litellm")
    return found


def _ratio(saturation: dict[str, Any], top: str, bottom: str) -> float | None:
    if top not in saturation or bottom not in saturation:
        return None
    return _quotient(saturation[top]["achieved_per_s"], saturation[bottom]["achieved_per_s"])


def _quotient(top: float | None, bottom: float | None) -> float | None:
    if top is None or bottom is None or bottom <= 0:
        return None
    return top / bottom


def warnings(
    summary: dict[str, Any],
    bench: Bench,
    heartbeats: dict[str, Heartbeats],
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
    for fleet, beats in heartbeats.items():
        if beats.failures:
            found.append(
                f"{len(beats.failures)} heartbeats of the {fleet} fleet failed "
                f"(first: {beats.failures[0]})"
            )
    slow = [wait for wait in bench.settle_waits if wait >= SETTLE_TIMEOUT_S]
    if slow:
        found.append(f"{len(slow)} phases started before the servers were idle")
    if bench.noisy_phases:
        found.append(
            f"{bench.noisy_phases} of {len(bench.settle_waits)} phases started while other "
            f"processes used more than {QUIET_CORES:g} cores"
        )
    for rate, rows in summary["open_loop"].items():
        for target, row in rows.items():
            if row["start_lag_p99_ms"] > 5:
                found.append(
                    f"open loop {rate}/s, {target}: the load generator started requests "
                    f"{row['start_lag_p99_ms']:.1f} ms late (p99): it was short of CPU"
                )
    for direct in ("direct", "direct_tls"):
        if direct not in summary["concurrency_1"]:
            continue
        direct_errors = summary["concurrency_1"][direct]["errors"] + sum(
            rows[direct]["errors"] for rows in summary["open_loop"].values()
        )
        if direct_errors:
            found.append(f"{direct_errors} requests straight to the stand-in failed ({direct})")
    return found


# --- report -----------------------------------------------------------------------------------


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _value(row: dict[str, Any]) -> str:
    value, unit = row["value"], row["unit"]
    if value is None:
        return "n/a"
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    if unit == "ms":
        return f"{value:+.2f} ms"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("PASS" if met else "MISS")


def print_table(summary: dict[str, Any], settings: Settings, found: list[str]) -> None:
    c1 = summary["concurrency_1"]
    print(
        f"\nRouter overhead benchmark: non-streaming chat completions, max_tokens {MAX_TOKENS}, "
        f"stand-in upstream with zero delay"
    )
    print(
        "  plain: direct, router (HTTP on every hop, lab join secret); mTLS: direct_tls, "
        "router_mtls (HTTPS to the router, mTLS router -> node); added = target - its base"
    )
    print(f"\n  Concurrency 1, closed loop (median of {settings.repeats} interleaved repeats)")
    print(
        f"  {'target':<13}{'requests':>12}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'added p50':>11}{'added p99':>11}{'errors':>8}"
    )
    for target, row in c1.items():
        count = f"{row['repeats']}x{row['requests_per_repeat']}"
        print(
            f"  {target:<13}{count:>12}"
            f"{_ms(row['p50_ms']):>9}{_ms(row['p99_ms']):>9}"
            f"{_signed(row['added_p50_ms']):>11}{_signed(row['added_p99_ms']):>11}"
            f"{row['errors']:>8}"
        )
    print(
        f"\n  Open loop, {settings.open_seconds:g} s per rate and target "
        f"(latency from the scheduled start; timeout {settings.timeout_s:g} s)"
    )
    print(
        f"  {'rate/s':<8}{'target':<13}{'achieved/s':>11}{'p50 ms':>9}{'p99 ms':>10}"
        f"{'added p50':>11}{'added p99':>11}{'errors':>8}"
    )
    for rate, rows in summary["open_loop"].items():
        for target, row in rows.items():
            print(
                f"  {rate:<8}{target:<13}{row['achieved_per_s']:>11,.0f}{_ms(row['p50_ms']):>9}"
                f"{_ms(row['p99_ms']):>10}{_signed(row['added_p50_ms']):>11}"
                f"{_signed(row['added_p99_ms']):>11}{row['errors']:>8}"
            )
    print(
        f"\n  Saturation, closed loop, {settings.workers} workers, "
        f"{settings.saturation_seconds:g} s per target"
    )
    print(f"  {'target':<13}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>10}{'errors':>8}{'of base':>9}")
    saturation = summary["saturation"]
    for target, row in saturation.items():
        share = _ratio(saturation, target, BASES.get(target, ""))
        print(
            f"  {target:<13}{row['achieved_per_s']:>9,.0f}{_ms(row['p50_ms']):>9}"
            f"{_ms(row['p99_ms']):>10}{row['errors']:>8}"
            f"{'-' if share is None else f'{share:.0%}':>9}"
        )
    ratios = summary["ratios"]
    if ratios["mtls_vs_plain_saturation"] is not None:
        print(
            "\n  mTLS / plain: added p50 "
            f"{_times(ratios['mtls_vs_plain_added_p50'])}, added p99 "
            f"{_times(ratios['mtls_vs_plain_added_p99'])}, saturation "
            f"{_times(ratios['mtls_vs_plain_saturation'])}"
        )
    print("\n  Targets (informational, never asserted)")
    print(f"  {'':<42}{'value':>14}{'goal':>16}{'result':>8}")
    for row in summary["targets"]:
        print(f"  {row['name']:<42}{_value(row):>14}{row['goal']:>16}{_verdict(row['met']):>8}")
    for warning in found:
        print(f"  WARNING: {warning}")


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def machine_info(litellm_version: str | None) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "uvloop": version("uvloop"),
        "litellm": litellm_version,
        "timestamp": datetime.now(UTC).astimezone().isoformat(),
    }


def write_json(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "router.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


# --- the run ----------------------------------------------------------------------------------


def run(*, out_dir: Path, settings: Settings | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write `out_dir`/router.json; returns the summary."""
    settings = settings or Settings()
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = "direct, router, direct_tls, router_mtls" + (", litellm" if settings.litellm else "")
    print(f"Router benchmark: {targets}; model {MODEL!r}, max_tokens {MAX_TOKENS}", flush=True)
    litellm_version: str | None = None
    skipped: str | None = None if settings.litellm else "--no-litellm"
    venv = LITELLM_VENV
    if settings.litellm:
        litellm_version, skipped = prepare_litellm(venv)
        if skipped is not None:
            print(f"  LiteLLM unavailable, skipping its columns: {skipped}", flush=True)
    # Under the report folder, so the router's databases sit on a real disk.
    with (
        tempfile.TemporaryDirectory(prefix="router-bench-", dir=out_dir) as scratch_dir,
        contextlib.ExitStack() as stack,
    ):
        scratch = Path(scratch_dir)
        plain = stack.enter_context(run_fleet(scratch / "plain", tls=False))
        mtls = stack.enter_context(run_fleet(scratch / "mtls", tls=True))
        fleets = {"plain": plain, "mTLS": mtls}
        if settings.observed:
            sink = stack.enter_context(otlp_sink())
            observed_args = (*OBSERVED_ARGS, "--otlp-endpoint", sink)
            fleets["observed"] = stack.enter_context(
                run_fleet(scratch / "observed", tls=False, extra=observed_args)
            )
        standin, router = plain.standin, plain.router
        litellm: Server | None = None
        if skipped is None:
            try:
                litellm = stack.enter_context(run_litellm(venv, standin, scratch))
            except (RuntimeError, TimeoutError) as exc:
                skipped = f"LiteLLM did not start: {exc}"
                print(f"  {skipped}", flush=True)
        json_header = {"Content-Type": "application/json"}
        assert mtls.ca is not None
        fleet_ca = {"cafile": str(mtls.ca)}
        endpoints: dict[str, dict[str, Any]] = {
            "direct": {"url": f"{standin.v1}/chat/completions", "headers": json_header},
            "router": {
                "url": f"{router.url}/v1/chat/completions",
                "headers": json_header | {"Authorization": f"Bearer {plain.key}"},
            },
            "direct_tls": {
                "url": f"{mtls.standin.v1}/chat/completions",
                "headers": json_header,
            }
            | fleet_ca,
            "router_mtls": {
                "url": f"{mtls.router.url}/v1/chat/completions",
                "headers": json_header | {"Authorization": f"Bearer {mtls.key}"},
            }
            | fleet_ca,
        }
        if "observed" in fleets:
            observed = fleets["observed"]
            endpoints["router_observed"] = {
                "url": f"{observed.router.url}/v1/chat/completions",
                "headers": json_header | {"Authorization": f"Bearer {observed.key}"},
            }
        if litellm is not None:
            endpoints["litellm"] = {
                "url": f"{litellm.url}/v1/chat/completions",
                "headers": json_header | {"Authorization": f"Bearer {LITELLM_KEY}"},
            }
        load = LoadClient(scratch)
        stack.callback(load.close)
        load.call(
            op="setup",
            targets=endpoints,
            body=REQUEST_BODY,
            timeout_s=settings.timeout_s,
            connections=CONNECTIONS,
        )
        pids = [pid for fleet in fleets.values() for pid in fleet.pids()]
        pids += [litellm.process.pid] if litellm is not None else []
        own = [os.getpid(), load.process.pid, *pids]
        bench = Bench(settings, load, list(endpoints), pids, own)
        warm = bench.warm_up()
        for target, result in warm.items():
            if result["ok"] > 0:
                continue
            if litellm is not None and target == "litellm":
                skipped = f"every warm-up request to LiteLLM failed ({result['errors']})"
                print(f"  {skipped}:\n{litellm.tail()}", flush=True)
                bench.targets.remove("litellm")
                continue
            failed = mtls.router if target.endswith("tls") else router
            raise RuntimeError(f"every warm-up request to {target} failed:\n{failed.tail()}")
        watch = CpuWatch(*own)
        repeats = bench.concurrency_one()
        open_loop = bench.open_loop()
        saturation = bench.saturation()
        contention = watch.report()
        summary: dict[str, Any] = {
            "targets_measured": bench.targets,
            "concurrency_1": summarize_c1(repeats, bench.targets),
            "open_loop": {rate: _with_added(rows) for rate, rows in open_loop.items()},
            "saturation": saturation,
            "contention": contention,
        }
        summary["ratios"] = ratios(summary)
        summary["targets"] = judge(summary)
        heartbeats = {name: fleet.heartbeats for name, fleet in fleets.items()}
        found = warnings(summary, bench, heartbeats, skipped)
        router_logs = {
            name: _API_KEY.sub("pal-sk-(redacted)", fleet.router.tail(50))
            for name, fleet in fleets.items()
        }
    print_table(summary, settings, found)
    report = {
        "benchmark": "router",
        "machine": machine_info(litellm_version),
        "setup": {
            "model": MODEL,
            "max_tokens": MAX_TOKENS,
            "request_body": json.loads(REQUEST_BODY),
            "repeats": settings.repeats,
            "requests": settings.requests,
            "litellm_requests": settings.litellm_requests,
            "chunks_per_repeat": CHUNKS,
            "rates": list(settings.rates),
            "open_seconds": settings.open_seconds,
            "saturation_seconds": settings.saturation_seconds,
            "saturation_workers": settings.workers,
            "warmup_requests": settings.warmup_requests,
            "rewarm_workers": {"concurrency_1": 1, "open_loop": REWARM_WORKERS},
            "timeout_s": settings.timeout_s,
            "quiet_wait_s": settings.quiet_wait_s,
            "litellm": litellm_version,
            "litellm_skipped": skipped,
            "heartbeats_sent": {name: beats.sent for name, beats in heartbeats.items()},
            "heartbeat_slowest_ms": {name: beats.slowest_ms for name, beats in heartbeats.items()},
            "settle_waits_s": bench.settle_waits,
            "noisy_phases": bench.noisy_phases,
        },
        "summary": summary,
        "concurrency_1_repeats": repeats,
        "warnings": found,
        "router_log_tail": router_logs,
    }
    path = write_json(report, out_dir)
    print(f"\nwrote {path}")
    return summary
