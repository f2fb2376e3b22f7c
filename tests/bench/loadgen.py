"""The router benchmark's load generator, a process of its own: `python -m tests.bench.loadgen`.

It reads one JSON command per line on stdin and answers each with one JSON line on stdout,
so the connections it opens stay warm across phases. One aiohttp session (large connection
limit, per-request timeout) on uvloop serves every target. Commands:

- `{"op": "setup", "targets": {name: {"url", "headers", "cafile"?}}, "body", "timeout_s",
  "connections"}`: an `https://` target is verified against `cafile` (a PEM CA file).
- `{"op": "closed", "target", "workers", "requests" | "seconds"}`: closed loop; `workers`
  callers each send the next request when the previous one completes, until `requests`
  have been sent in all or `seconds` have passed.
- `{"op": "open", "target", "rate", "seconds"}`: open loop; request i is *started* at
  start + i / rate whether or not earlier ones completed, and its latency runs from that
  scheduled time when it started late (no coordinated omission).
- `{"op": "quit"}`

Every answer carries `latencies_ms` of the successful requests, `ok`, `errors` (counts by
kind: `http_<status>` or the exception's name) and `elapsed_s`.
"""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True)
class Target:
    url: str
    headers: dict[str, str]
    # For an https:// target: the context that trusts its CA (aiohttp's default otherwise).
    tls: ssl.SSLContext | None = None


def _target(spec: dict[str, Any]) -> Target:
    cafile = spec.get("cafile")
    tls = ssl.create_default_context(cafile=cafile) if cafile else None
    return Target(url=spec["url"], headers=dict(spec["headers"]), tls=tls)


class LoadGenerator:
    def __init__(self, command: dict[str, Any]) -> None:
        self.targets = {name: _target(spec) for name, spec in command["targets"].items()}
        self.body = str(command["body"]).encode()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=int(command["connections"]), limit_per_host=0, keepalive_timeout=60
            ),
            timeout=aiohttp.ClientTimeout(total=float(command["timeout_s"])),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        await self.session.close()

    async def one(self, target: Target) -> str | None:
        """One request; None when it succeeded, else the kind of failure."""
        try:
            async with self.session.post(
                target.url, data=self.body, headers=target.headers, ssl=target.tls or True
            ) as r:
                data = await r.read()
                if r.status != 200:
                    return f"http_{r.status}"
                if b'"choices"' not in data:
                    return "bad_body"
                return None
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__

    async def closed(self, command: dict[str, Any]) -> dict[str, Any]:
        target = self.targets[command["target"]]
        workers = int(command.get("workers", 1))
        budget = command.get("requests")
        seconds = command.get("seconds")
        remaining = [int(budget) if budget is not None else -1]
        latencies: list[float] = []
        errors: dict[str, int] = {}
        began = time.perf_counter()
        deadline = began + float(seconds) if seconds is not None else float("inf")

        async def worker() -> None:
            while time.perf_counter() < deadline and remaining[0] != 0:
                remaining[0] -= 1
                started = time.perf_counter()
                failure = await self.one(target)
                if failure is None:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[failure] = errors.get(failure, 0) + 1

        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.perf_counter() - began
        return _result(latencies, errors, elapsed)

    async def open(self, command: dict[str, Any]) -> dict[str, Any]:
        target = self.targets[command["target"]]
        rate = float(command["rate"])
        count = max(1, round(rate * float(command["seconds"])))
        latencies: list[float] = []
        errors: dict[str, int] = {}
        lags: list[float] = []
        last_done = [0.0]

        async def request(since: float) -> None:
            failure = await self.one(target)
            done = time.perf_counter()
            last_done[0] = max(last_done[0], done)
            if failure is None:
                latencies.append((done - since) * 1000)
            else:
                errors[failure] = errors.get(failure, 0) + 1

        tasks: list[asyncio.Task[None]] = []
        began = time.perf_counter() + 0.01
        for index in range(count):
            due = began + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            lags.append(max(0.0, now - due) * 1000)
            # From the scheduled start when late; from the actual one when a timer fired early.
            tasks.append(asyncio.create_task(request(max(now, due))))
        sent = time.perf_counter() - began
        await asyncio.gather(*tasks)
        # Achieved rate: successes over the scheduled window, or longer if answers lagged.
        window = max(last_done[0] - began, count / rate)
        result = _result(latencies, errors, window)
        lags.sort()
        result |= {
            "scheduled": count,
            "sent_per_s": count / max(sent, 1e-9),
            "start_lag_p99_ms": round(lags[min(len(lags) - 1, round(0.99 * (len(lags) - 1)))], 3),
        }
        return result


def _result(latencies: list[float], errors: dict[str, int], elapsed: float) -> dict[str, Any]:
    return {
        "latencies_ms": [round(value, 4) for value in latencies],
        "ok": len(latencies),
        "errors": errors,
        "elapsed_s": elapsed,
    }


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    generator: LoadGenerator | None = None
    try:
        while line := await reader.readline():
            command: dict[str, Any] = json.loads(line)
            op = command["op"]
            if op == "quit":
                break
            if op == "setup":
                generator = LoadGenerator(command)
                result: dict[str, Any] = {"ok": True}
            elif generator is None:
                raise RuntimeError("the first command must be `setup`")
            elif op == "closed":
                result = await generator.closed(command)
            elif op == "open":
                result = await generator.open(command)
            else:
                raise RuntimeError(f"unknown command {op!r}")
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
    finally:
        if generator is not None:
            await generator.close()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, present with uvicorn[standard]
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
