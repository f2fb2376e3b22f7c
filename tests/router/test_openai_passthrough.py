"""What agent frameworks send passes through the router unchanged, and the router's
`/v1/models` says what the nodes serve.

A real router and one real appliance (the `openai` engine in front of the stand-in
upstream, which records the body it got), each its own process, enrolled as in
production; the client is the `openai` SDK with an org key. The rule for a model's
capabilities across several nodes is checked in-process on the router's own `Node`s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
)
from openai.types.shared_params import ResponseFormatJSONSchema

from federation import NodeModel, Pricing
from router._private.app import _shared_capabilities
from router._private.fleet import Node
from tests.appliance.engines.conformance import WEATHER
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, running_fleet, upstream_toml
from tests.federation.tenants import admin_of
from tests.support import wait_for

ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "weather in Oslo?"}]
SCHEMA: ResponseFormatJSONSchema = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {"type": "object", "properties": {"answer": {"type": "string"}}},
        "strict": True,
    },
}
TIGHT_BUDGET = 700  # one answer of 400 tokens fits, two do not
PRICING = Pricing(input_per_million=2.0, output_per_million=4.0, cached_input_per_million=0.5)
PRICED = {f"pricing.{name}": getattr(PRICING, name) for name in PRICING.__struct_fields__}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root: Path = tmp_path_factory.mktemp("passthrough")
    with running_fleet(root) as running:
        upstream = running.standin("upstream", tokens=3)
        running.start_member("eu-1", "eu-west", upstream_toml(upstream, "gpu", **PRICED))
        running.wait_joined("eu-1")
        yield running


@pytest.fixture(scope="module")
def key(fleet: Fleet) -> str:
    return fleet.org_key("acme", ["eu-west"])


@pytest.fixture(scope="module")
def tight(fleet: Fleet) -> str:
    """A key of an org whose whole budget fits one answer of 400 tokens, not two."""
    fleet.admin.create_org("tight", ["eu-west"], budget=TIGHT_BUDGET)
    return fleet.admin.member("tight", "org_admin", "owner@tight.test").key


@pytest.fixture(scope="module")
def client(fleet: Fleet, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0, timeout=30) as made:
        yield made


def sent(fleet: Fleet) -> dict[str, Any]:
    """The body the upstream got last."""
    body: dict[str, Any] = fleet.standins["upstream"].stats()["last_body"]
    return body


def test_the_router_card_lists_the_nodes_capabilities(client: openai.OpenAI) -> None:
    card = client.models.retrieve(UPSTREAM_MODEL).model_dump()
    assert card["capabilities"] == [
        "embeddings",
        "logprobs",
        "n",
        "tools",
        "structured_output",
        "logit_bias",
        "echo",
        "several_prompts",
    ]


def test_chat_features_reach_the_upstream_unchanged(fleet: Fleet, client: openai.OpenAI) -> None:
    named: ChatCompletionNamedToolChoiceParam = {
        "type": "function",
        "function": {"name": "get_weather"},
    }
    reply = client.chat.completions.create(
        model=UPSTREAM_MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice=named,
        parallel_tool_calls=False,
        response_format=SCHEMA,
        logprobs=True,
        top_logprobs=2,
        n=2,
        logit_bias={"7": 5, "50": -100},
        max_tokens=8,
    )
    body = sent(fleet)
    assert body["messages"] == ASK
    assert body["tools"] == [WEATHER]
    assert body["tool_choice"] == named
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == SCHEMA
    assert (body["logprobs"], body["top_logprobs"], body["n"]) == (True, 2, 2)
    assert body["logit_bias"] == {"7": 5.0, "50": -100.0}
    assert [choice.index for choice in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls or []
        assert all(isinstance(call, ChatCompletionMessageFunctionToolCall) for call in calls)
        functions = [
            call.function
            for call in calls
            if isinstance(call, ChatCompletionMessageFunctionToolCall)
        ]
        assert [function.name for function in functions] == ["get_weather"]
        assert json.loads(functions[0].arguments) == {"city": "standin"}


def test_a_conversation_with_tool_results_passes_through(
    fleet: Fleet, client: openai.OpenAI
) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages: list[ChatCompletionMessageParam] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    reply = client.chat.completions.create(
        model=UPSTREAM_MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=3
    )
    assert reply.choices[0].message.content == " tok0 tok1 tok2"
    body = sent(fleet)
    assert body["messages"][1]["tool_calls"] == [call]
    assert body["messages"][2] == {
        "role": "tool",
        "content": "sunny, 21 C",
        "tool_call_id": "call_1",
    }
    assert body["tool_choice"] == "none"


def test_a_streamed_tool_call_arrives_in_the_openai_shape(client: openai.OpenAI) -> None:
    name, arguments, reasons = "", "", []
    usage = None
    stream = client.chat.completions.create(
        model=UPSTREAM_MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=8,
    )
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for fragment in choice.delta.tool_calls or ():
                if fragment.function is not None:
                    name += fragment.function.name or ""
                    arguments += fragment.function.arguments or ""
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": "standin"}
    assert reasons == ["tool_calls"]
    assert usage is not None
    assert usage.completion_tokens > 0


def test_completion_features_reach_the_upstream_unchanged(
    fleet: Fleet, client: openai.OpenAI
) -> None:
    reply = client.completions.create(
        model=UPSTREAM_MODEL,
        prompt=["one two", "three"],
        n=2,
        echo=True,
        logprobs=1,
        logit_bias={"11": 1},
        max_tokens=3,
    )
    body = sent(fleet)
    assert body["prompt"] == ["one two", "three"]
    assert (body["n"], body["echo"], body["logprobs"]) == (2, True, 1)
    assert body["logit_bias"] == {"11": 1.0}
    texts = [(choice.index, choice.text.split(" ")[0]) for choice in reply.choices]
    assert texts == [(0, "one"), (1, "one"), (2, "three"), (3, "three")]
    first = reply.choices[0].logprobs
    assert first is not None
    assert (first.token_logprobs or [])[0] is None  # the echoed prompt's first token


@pytest.mark.parametrize(
    ("path", "extra", "choices"),
    [
        ("/v1/chat/completions", {"messages": ASK, "n": 3}, 3),
        ("/v1/completions", {"prompt": ["a", "b"], "n": 2}, 4),
        ("/v1/completions", {"prompt": [[1, 2], [3]]}, 2),
    ],
)
def test_the_router_reserves_max_tokens_for_every_choice(
    fleet: Fleet, tight: str, path: str, extra: dict[str, Any], choices: int
) -> None:
    body = json.dumps({"model": UPSTREAM_MODEL, "max_tokens": 400} | extra).encode()
    before = fleet.standins["upstream"].stats()["requests"].get(path, 0)
    refused = httpx.post(
        f"{fleet.router.url}{path}",
        content=body,
        headers={"Authorization": f"Bearer {tight}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert f"this request may need {len(body) + 400 * choices})" in error["message"]
    assert fleet.standins["upstream"].stats()["requests"].get(path, 0) == before


def node_serving(node_id: str, capabilities: list[str], *, down: bool = False) -> Node:
    served = NodeModel(
        id="m", device_class="gpu", context_length=4096, ready=True, capabilities=capabilities
    )
    return Node(node_id, "eu-west", "https://x", "1", {"m": served}, last_beat=0.0, down=down)


def test_a_model_card_lists_what_every_live_node_serving_it_serves() -> None:
    full = node_serving("a", ["logprobs", "n", "tools", "echo"])
    partial = node_serving("b", ["n", "echo", "embeddings"])
    bare_but_down = node_serving("c", [], down=True)
    assert _shared_capabilities("m", [full, partial, bare_but_down]) == ["n", "echo"]
    assert _shared_capabilities("m", [full]) == ["logprobs", "n", "tools", "echo"]
    # Every node down: the card still says what they serve together.
    assert _shared_capabilities("m", [bare_but_down, node_serving("d", ["n"], down=True)]) == []


def test_one_prompt_of_token_ids_is_one_answer(fleet: Fleet, tight: str) -> None:
    body = {"model": UPSTREAM_MODEL, "max_tokens": 400, "prompt": [1, 2, 3]}
    answered = httpx.post(
        f"{fleet.router.url}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {tight}"},
        timeout=30,
    )
    assert answered.status_code == 200, answered.text
    assert len(answered.json()["choices"]) == 1


def test_cached_tokens_pass_through_and_are_metered_once(fleet: Fleet) -> None:
    """The upstream's cached prompt tokens reach the client through the appliance and the
    router, and the router's one usage record charges them at the cached price."""
    fleet.admin.create_org("cachy", ["eu-west"])
    key = fleet.admin.member("cachy", "org_admin", "owner@cachy.test").key
    standin = fleet.standins["upstream"]
    standin.control(cached_tokens=2)
    try:
        with openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0) as cachy:
            whole = cachy.chat.completions.create(model=UPSTREAM_MODEL, messages=ASK, max_tokens=3)
            chunks = list(
                cachy.chat.completions.create(
                    model=UPSTREAM_MODEL,
                    messages=ASK,
                    max_tokens=3,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
    finally:
        standin.control(cached_tokens=None)
    usages = [whole.usage, chunks[-1].usage]
    for usage in usages:
        assert usage is not None
        assert usage.prompt_tokens == 3  # the stand-in counts the words of ASK
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == 2

    def books() -> list[dict[str, Any]] | None:
        reply = fleet.admin.ok("GET", "/admin/v1/usage/records", org="cachy")
        data: list[dict[str, Any]] = reply["data"]
        return data if len(data) >= len(usages) else None

    records = wait_for(books, timeout=15)
    assert len(records) == len(usages)  # one record per request: metered once
    for record in records:
        assert (record["input_tokens"], record["cached_tokens"]) == (3, 2)
        cost = PRICING.cost(3, record["output_tokens"], cached=2)
        assert record["cost"] == pytest.approx(cost)
        assert record["cost"] < PRICING.cost(3, record["output_tokens"])
    # The appliance served the router's requests: it keeps no usage record of its own.
    node_books = admin_of(fleet.members["eu-1"]).ok("GET", "/admin/v1/usage/records", all="true")
    assert [r for r in node_books["data"] if r["org"] == "cachy"] == []
