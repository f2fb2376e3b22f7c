"""A request after which its node died is never replayed onto another node; a node that
refuses the connection is. Real router and appliance processes, killed with real signals.

The fleet: `rdu-1` in eu-west (preferred, so it is always tried first) and `gpu-1` in
us-east, each fronting a stand-in upstream, and a key allowed in both regions: the shape in
which one poison request used to take down both regions.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, running_fleet, upstream_toml
from tests.support import wait_for, write_config

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "poison?"}]
CHAT = "/v1/chat/completions"
# Slow enough heartbeat expiry and probes that the killed node is still `up` in the router's
# view when the next request comes: that request finds a dead node that refuses it.
ROUTER_TOML = """
[health]
missed_beats_down = 30
probe_interval_s = 60
"""


@contextmanager
def two_regions(tmp_path: Path) -> Iterator[tuple[Fleet, openai.OpenAI]]:
    config = write_config(tmp_path / "router", ROUTER_TOML, name="router.toml")
    with running_fleet(tmp_path, *config) as fleet:
        rdu = fleet.standin("rdu", ttft_ms=30_000)  # answers long after the test is over
        gpu = fleet.standin("gpu", ttft_ms=50)
        fleet.start_member("rdu-1", "eu-west", upstream_toml(rdu, "rdu"))
        fleet.start_member("gpu-1", "us-east", upstream_toml(gpu, "gpu"))
        fleet.wait_joined("rdu-1", "gpu-1")
        key = fleet.org_key("acme", ["eu-west", "us-east"])
        client = openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0, timeout=60)
        try:
            yield fleet, client
        finally:
            client.close()


def kill_rdu_while_it_holds_a_request(
    fleet: Fleet, client: openai.OpenAI, *, stream: bool
) -> openai.APIStatusError:
    """Send a request, SIGKILL `rdu-1` once its upstream has it; the client's error."""
    rdu = fleet.standins["rdu"]

    def send() -> None:
        client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, stream=stream)

    with ThreadPoolExecutor(max_workers=1) as pool:
        sent = pool.submit(send)
        wait_for(lambda: rdu.stats()["in_flight"] == 1, timeout=30)
        fleet.members["rdu-1"].process.send_signal(signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as failure:
            sent.result(timeout=30)
    return failure.value


def requests_seen(fleet: Fleet, standin: str) -> int:
    count: int = fleet.standins[standin].stats()["requests"].get(CHAT, 0)
    return count


def usage_records(fleet: Fleet) -> list[dict[str, Any]]:
    page = fleet.admin.ok("GET", "/admin/v1/usage/records", org="acme")
    records: list[dict[str, Any]] = page["data"]
    return records


def failed_attempts(fleet: Fleet, node: str) -> float:
    return fleet.router.metric("palisade_router_attempts_total", node=node, outcome="failed")


def test_a_request_that_kills_its_node_gets_502_and_never_reaches_the_other_region(
    tmp_path: Path,
) -> None:
    with two_regions(tmp_path) as (fleet, client):
        gpu = fleet.members["gpu-1"].process
        gpu_pid = gpu.pid

        error = kill_rdu_while_it_holds_a_request(fleet, client, stream=False)

        assert error.status_code == 502
        assert error.code == "backend_crashed"
        assert "rdu-1" in error.message
        assert "not retried on another node" in error.message
        assert requests_seen(fleet, "gpu") == 0  # never replayed onto us-east
        assert (gpu.poll(), gpu.pid) == (None, gpu_pid)
        assert failed_attempts(fleet, "rdu-1") == 1  # the crash counts against the node
        assert fleet.router.metric("palisade_router_retries_total") == 0
        assert "failed while handling request" in fleet.router.log_text()
        [record] = wait_for(lambda: usage_records(fleet))  # settled once, on the node
        assert (record["status"], record["node"]) == ("backend_crashed", "rdu-1")

        # rdu-1 is dead but not yet known to be: the next request finds it refusing
        # connections, which proves it never got that request, so it goes to gpu-1.
        assert fleet.status()["rdu-1"]["state"] == "up"
        raw = client.chat.completions.with_raw_response.create(
            model=UPSTREAM_MODEL, messages=MESSAGES, max_tokens=4
        )
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-palisade-node"] == "gpu-1"
        assert failed_attempts(fleet, "rdu-1") == 2
        assert fleet.router.metric("palisade_router_retries_total") == 1
        assert requests_seen(fleet, "gpu") == 1


def test_a_stream_whose_node_dies_before_its_first_byte_is_not_replayed_either(
    tmp_path: Path,
) -> None:
    with two_regions(tmp_path) as (fleet, client):
        error = kill_rdu_while_it_holds_a_request(fleet, client, stream=True)

        assert (error.status_code, error.code) == (502, "backend_crashed")
        assert requests_seen(fleet, "gpu") == 0
        assert fleet.members["gpu-1"].process.poll() is None
