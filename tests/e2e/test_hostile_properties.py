"""Property: whatever token ids or embedding inputs a tenant sends through the router to a
two-region fleet of llama.cpp appliances, the answer is never a 5xx and no process dies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from appliance import DEFAULT_MODEL_ID
from tests.e2e.fleet import Fleet, llama_toml, running_fleet

VOCABULARY = 49_152
NODES = {"eu-1": "eu-west", "us-1": "us-east"}


@dataclass(frozen=True)
class HostileFleet:
    fleet: Fleet
    key: str
    pids: dict[str, int]

    def assert_nothing_died(self) -> None:
        for name, server in [("router", self.fleet.router), *self.fleet.members.items()]:
            assert server.process.poll() is None, f"{name} died:\n{server.log_text()[-3000:]}"
            assert server.process.pid == self.pids[name]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileFleet]:
    root: Path = tmp_path_factory.mktemp("hostile-fleet")
    with running_fleet(root) as fleet:
        for node, region in NODES.items():
            fleet.start_member(node, region, llama_toml(threads=1, context_length=512))
        fleet.wait_joined(*NODES)
        key = fleet.org_key("mallory", sorted(set(NODES.values())))
        pids = {name: member.process.pid for name, member in fleet.members.items()}
        yield HostileFleet(fleet, key, pids | {"router": fleet.router.process.pid})


token_id = st.one_of(
    st.integers(min_value=0, max_value=VOCABULARY - 1),
    st.sampled_from([0, 1, 2, 3, 16, 17, 3299, VOCABULARY - 1, VOCABULARY, 999_999, -1, -5]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-(2**80), max_value=2**80),
)
token_ids = st.lists(token_id, max_size=8)
wrong = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
text = st.text(max_size=12)
hostile_input = st.one_of(
    text,
    token_ids,
    st.lists(token_ids, max_size=3),  # nested: a batch of token lists, some maybe empty
    st.lists(text, max_size=3),
    st.lists(st.one_of(text, token_id, token_ids), max_size=4),  # mixed forms
    st.lists(st.one_of(token_id, wrong), min_size=1, max_size=4),  # wrong types inside
    wrong,
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    endpoint=st.sampled_from(["completions", "embeddings"]),
    value=hostile_input,
    stream=st.booleans(),
)
def test_hostile_token_inputs_through_the_router_never_crash_a_node(
    hostile: HostileFleet, endpoint: str, value: Any, stream: bool
) -> None:
    body: dict[str, Any] = {"model": DEFAULT_MODEL_ID}
    if endpoint == "completions":
        body |= {"prompt": value, "max_tokens": 2, "temperature": 0, "stream": stream}
    else:
        body["input"] = value
    response = httpx.post(
        f"{hostile.fleet.router.v1}/{endpoint}",
        json=body,
        headers={"Authorization": f"Bearer {hostile.key}"},
        timeout=60,
    )
    assert response.status_code < 500, response.text
    code = "ok"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert {"message", "type", "code", "param"} <= set(error)
        code = error["code"]
    event(f"{endpoint}: {response.status_code} {code}")  # --hypothesis-show-statistics
    hostile.assert_nothing_died()


def test_a_benchmark_clients_stream_through_the_router_has_usage_in_every_chunk(
    hostile: HostileFleet,
) -> None:
    # What guidellm and vLLM's benchmark_serving send.
    body = {
        "model": DEFAULT_MODEL_ID,
        "prompt": "Once upon a time",
        "max_tokens": 12,
        "temperature": 0.0,
        "repetition_penalty": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream(
        "POST",
        f"{hostile.fleet.router.v1}/completions",
        json=body,
        headers={"Authorization": f"Bearer {hostile.key}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usages = [json.loads(event)["usage"] for event in events[:-1]]
    assert all(usage is not None for usage in usages)
    assert usages[-1]["completion_tokens"] == 12
    counts = [usage["completion_tokens"] for usage in usages]
    assert counts == sorted(counts)
    hostile.assert_nothing_died()
