"""Failover, gray failure, latency awareness and mid-stream failure, with real processes.

Each appliance fronts a stand-in OpenAI upstream (the stand-in for an RDU or GPU endpoint
that cannot run here) and declares its device class; the router and the appliances are
the real thing, killed and stopped with real signals.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from openai import Stream
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, running_fleet, upstream_toml
from tests.standin import RunningStandin
from tests.support import run_palisade, wait_for

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "ping"}]

_TEARDOWN_S = 0.25  # SIGKILL to the node's sockets being closed, at the most


@dataclass
class Outcome:
    started: float
    ended: float
    device: str | None
    node: str | None
    error: str | None = None
    code: str | None = None


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def since(self, moment: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.started >= moment]

    def failures(self) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.error is not None]


@contextmanager
def steady_load(base_url: str, key: str, workers: int = 4) -> Iterator[Load]:
    """Non-streaming requests back to back from `workers` threads, each one recorded."""
    load = Load()
    done = threading.Event()

    def worker() -> None:
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
        while not done.is_set():
            started = time.monotonic()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=UPSTREAM_MODEL, messages=MESSAGES, max_tokens=4
                )
                raw.parse()
                outcome = Outcome(
                    started,
                    time.monotonic(),
                    raw.headers.get("x-palisade-device"),
                    raw.headers.get("x-palisade-node"),
                )
            except openai.APIError as exc:
                outcome = Outcome(started, time.monotonic(), None, None, repr(exc), exc.code)
            with load.lock:
                load.outcomes.append(outcome)
        client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        yield load
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=60)


def rdu_and_gpu(fleet: Fleet) -> str:
    rdu_upstream = fleet.standin("rdu")
    gpu_upstream = fleet.standin("gpu")
    fleet.start_member("rdu-1", "eu-west", upstream_toml(rdu_upstream, "rdu"))
    fleet.start_member("gpu-1", "eu-west", upstream_toml(gpu_upstream, "gpu"))
    fleet.wait_joined("rdu-1", "gpu-1")
    return fleet.org_key("acme", ["eu-west"])


def attempts_on(fleet: Fleet, node: str) -> float:
    router = fleet.router
    return sum(
        router.metric("palisade_router_attempts_total", node=node, outcome=outcome)
        for outcome in ("ok", "failed", "overloaded")
    )


def test_sigkill_of_the_rdu_node_fails_only_its_own_requests_and_moves_traffic_to_gpu(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        key = rdu_and_gpu(fleet)
        status = run_palisade(
            "fleet", "status", "--url", fleet.router.url, "--json",
            env={"PALISADE_HOME": str(fleet.router.home)},
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        nodes = {node["node_id"]: node for node in json.loads(status.stdout)["nodes"]}
        assert nodes["rdu-1"]["device_classes"] == ["rdu"]
        assert nodes["gpu-1"]["state"] == "up"

        with steady_load(fleet.router.v1, key) as load:
            start = time.monotonic()
            wait_for(lambda: len(load.since(start)) >= 40, timeout=30)
            assert {o.device for o in load.since(start)} == {"rdu"}  # preferred class first

            killed = time.monotonic()
            fleet.members["rdu-1"].process.send_signal(signal.SIGKILL)
            wait_for(lambda: time.monotonic() >= killed + 2.0, timeout=5)
            tried_rdu = attempts_on(fleet, "rdu-1")
            wait_for(lambda: len(load.since(killed + 2.0)) >= 100, timeout=30)
            assert attempts_on(fleet, "rdu-1") == tried_rdu  # nothing sent to it after 2 s

        # Requests the node held when it died are not replayed (they may have killed it):
        # each gets 502 backend_crashed. Requests sent after it died find it refusing
        # connections, and go to gpu-1 without an error. The kernel tears the process down
        # a few milliseconds after send_signal returns, so a request sent in that window
        # still reached the node, and counts as one it held.
        failures = load.failures()
        assert len(failures) <= 4  # one per worker at most: those in flight at the kill
        assert all(o.code == "backend_crashed" for o in failures), failures
        assert all(o.started < killed + _TEARDOWN_S for o in failures), failures
        after = load.since(killed + 2.0)
        assert {o.device for o in after} == {"gpu"}
        assert fleet.status()["rdu-1"]["state"] in ("ejected", "down")


def test_sigstop_gray_failure_moves_traffic_within_5s_and_sigcont_brings_it_back(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        key = rdu_and_gpu(fleet)
        rdu = fleet.members["rdu-1"].process
        with steady_load(fleet.router.v1, key) as load:
            start = time.monotonic()
            wait_for(lambda: len(load.since(start)) >= 40, timeout=30)

            stopped = time.monotonic()
            rdu.send_signal(signal.SIGSTOP)
            fleet.wait_state("down", "rdu-1", timeout=5)
            moved = time.monotonic()
            tried_rdu = attempts_on(fleet, "rdu-1")
            wait_for(lambda: len(load.since(moved)) >= 50, timeout=30)
            assert attempts_on(fleet, "rdu-1") == tried_rdu
            assert {o.device for o in load.since(moved)} == {"gpu"}

            rdu.send_signal(signal.SIGCONT)
            resumed = time.monotonic()
            # Heartbeats resume at once, but only a passed half-open probe lets traffic back.
            wait_for(
                lambda: any(o.device == "rdu" for o in load.since(resumed)),
                timeout=15,
            )
            back = time.monotonic()
            wait_for(lambda: len(load.since(back + 0.5)) >= 20, timeout=30)
            assert {o.device for o in load.since(back + 0.5)} == {"rdu"}

        assert moved - stopped <= 5.0
        # A node that stopped heart-beating is frozen or cut off, not known to have crashed:
        # requests waiting on it were re-sent elsewhere (once each), none failed.
        assert load.failures() == []
        assert "ejected -> up" in fleet.router.log_text()


def test_latency_aware_selection_sends_most_traffic_to_the_faster_node(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        fast = fleet.standin("fast")
        slow = fleet.standin("slow", ttft_ms=120)
        fleet.start_member("fast-1", "eu-west", upstream_toml(fast, "gpu"))
        fleet.start_member("slow-1", "eu-west", upstream_toml(slow, "gpu"))
        fleet.wait_joined("fast-1", "slow-1")
        key = fleet.org_key("acme", ["eu-west"])
        client = openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0)

        def measured() -> bool:
            status = fleet.status()
            return all(status[n]["ttft_p50_ms"] is not None for n in ("fast-1", "slow-1"))

        def warm() -> bool:  # both nodes get traffic until each has reported a TTFT
            for _ in range(2):
                client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES)
            return measured()

        wait_for(warm, timeout=30)
        with steady_load(fleet.router.v1, key, workers=4) as load:
            start = time.monotonic()
            wait_for(lambda: len(load.since(start)) >= 200, timeout=60)
        counted = load.since(start)
        on_fast = sum(1 for o in counted if o.node == "fast-1")
        assert load.failures() == []
        assert on_fast / len(counted) >= 0.8, (on_fast, len(counted))


def _stream_through_one_node(
    fleet: Fleet, *, token_ms: int, tokens: int
) -> tuple[RunningStandin, Stream[ChatCompletionChunk]]:
    """A streamed chat completion through the router to its one node `eu-1`, which fronts
    a slow stand-in upstream (returned too)."""
    upstream = fleet.standin("slow", token_ms=token_ms, tokens=tokens)
    fleet.start_member("eu-1", "eu-west", upstream_toml(upstream, "gpu"))
    fleet.wait_joined("eu-1")
    key = fleet.org_key("acme", ["eu-west"])
    client = openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0)
    stream = client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, stream=True)
    return upstream, stream


def test_a_node_killed_mid_stream_ends_the_stream_with_an_error_frame(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        _, stream = _stream_through_one_node(fleet, token_ms=100, tokens=60)
        received: list[str] = []

        def read_and_kill_after_three() -> None:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
                if len(received) == 3:
                    fleet.members["eu-1"].process.send_signal(signal.SIGKILL)

        with pytest.raises(openai.APIError) as failure:
            read_and_kill_after_three()
        assert len(received) >= 3
        assert len(received) < 60  # it did not run to a normal end
        assert "failed while streaming" in failure.value.message
        assert fleet.router.metric("palisade_router_midstream_failures_total") == 1


def test_a_client_hanging_up_through_the_router_stops_the_upstream_and_is_metered(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        upstream, stream = _stream_through_one_node(fleet, token_ms=50, tokens=200)
        for seen, _ in enumerate(stream):
            if seen == 3:
                break
        stream.close()
        wait_for(lambda: upstream.stats()["streams_cancelled"] == 1, timeout=20)
        assert upstream.stats()["streams_completed"] == 0

        def metered() -> dict[str, object] | None:
            rows = fleet.admin.ok("GET", "/admin/v1/usage/records", org="acme")["data"]
            return rows[0] if rows else None

        record = wait_for(metered, timeout=20)
        assert record["status"] == "cancelled"
        assert record["node"] == "eu-1"
        assert 0 < int(str(record["output_tokens"])) < 200
