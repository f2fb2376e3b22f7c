"""The seam between the HTTP layer and the engines: capabilities drive validation, rich
output (`ChoiceDelta`) renders and aggregates, and one "request finished" path does the
metrics, the settlement and the audit row.

Rendering and validation are checked in-process; pass-through of n, tools, logprobs and
response_format and the finished path go through a real appliance (keys on) in front of
the stand-in upstream (tests/standin.py), with the `openai` SDK.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from appliance import (
    Capabilities,
    ChoiceDelta,
    LlamaCppEngine,
    LlamaCppModel,
    UnsupportedParameterError,
)
from appliance._private import inference
from appliance._private.engines.base import EngineContext
from appliance._private.http.rendering import Aggregate
from federation import (
    ENCODER,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionRequest,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
)
from tests.federation.tenants import Member, admin_of
from tests.standin import RunningStandin, run_standin
from tests.support import REPO, Appliance, default_model_path, run_appliance, wait_for

MODEL = "gpu-llama"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "three little words"}]
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


# --- in-process: rendering and validation ---------------------------------------------------


def test_plain_answers_keep_their_bytes() -> None:
    """The rich fields are left out (or null, as before) when unused."""
    chat = ENCODER.encode(ChatChoice(0, AssistantMessage(content="hi"), "stop"))
    assert chat == (
        b'{"index":0,"message":{"content":"hi","role":"assistant"},'
        b'"finish_reason":"stop","logprobs":null}'
    )
    chunk = ENCODER.encode(ChatChunkChoice(0, ChatDelta(content="hi")))
    assert chunk == b'{"index":0,"delta":{"content":"hi"},"finish_reason":null,"logprobs":null}'
    completion = ENCODER.encode(CompletionChoice(0, "hi", "stop"))
    assert completion == b'{"index":0,"text":"hi","finish_reason":"stop","logprobs":null}'


def test_aggregate_merges_choices_tool_calls_and_logprobs() -> None:
    answer = Aggregate(2)
    answer.add(" plain")
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
    answer.add(
        [
            " text",
            ChoiceDelta(1, " one", logprobs={"content": [{"token": " one", "logprob": -1.0}]}),
            ChoiceDelta(1, " more", logprobs={"content": [{"token": " more", "logprob": -2.0}]}),
            ChoiceDelta(0, tool_calls=[call | {"function": {"name": "f", "arguments": '{"a"'}}]),
            ChoiceDelta(0, tool_calls=[{"index": 0, "function": {"arguments": ": 1}"}}]),
            ChoiceDelta(1, finish_reason="length"),
        ]
    )
    first, second = answer.chat_choices("stop")
    assert first.message.content == " plain text"
    assert first.message.tool_calls == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert first.finish_reason == "tool_calls"  # called tools, no reason of its own
    assert (second.index, second.message.content, second.finish_reason) == (
        1,
        " one more",
        "length",
    )
    assert second.logprobs == {
        "content": [{"token": " one", "logprob": -1.0}, {"token": " more", "logprob": -2.0}]
    }
    completions = Aggregate(1)
    completions.add([ChoiceDelta(0, "a", logprobs={"tokens": ["a"], "token_logprobs": [-1.0]})])
    completions.add([ChoiceDelta(0, "b", logprobs={"tokens": ["b"], "token_logprobs": [-2.0]})])
    (only,) = completions.completion_choices("length")
    assert (only.text, only.finish_reason) == ("ab", "length")
    assert only.logprobs == {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0]}


def _llamacpp_capabilities() -> Capabilities:
    """What the llama.cpp engine declares (constructed, not loaded)."""
    path = default_model_path()
    config = LlamaCppModel(id="local-llama", path=str(path))
    context = EngineContext(home=path.parent, path=path, on_finish=lambda _, __: None)
    return LlamaCppEngine(config, context).capabilities


# A model with its own tokenizer that serves plain generation only.
PLAIN = Capabilities(tokenizes_locally=True, early_errors=False)


def test_llamacpp_declares_every_generation_capability() -> None:
    capabilities = _llamacpp_capabilities()
    generation = ("logprobs", "n", "tools", "structured_output", "logit_bias", "echo")
    assert all(getattr(capabilities, name) for name in (*generation, "several_prompts"))
    assert (capabilities.predict, capabilities.tokenizes_locally) == (False, True)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2, "logprobs": True}, "logprobs"),
        ({"tools": [WEATHER]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"messages": [{"role": "tool", "content": "18C", "tool_call_id": "call_1"}]},
            "messages[0]",
        ),
    ],
)
def test_a_model_refuses_what_it_cannot_serve_naming_the_model(
    fields: dict[str, Any], param: str
) -> None:
    body = {"model": "local-llama", "messages": HELLO} | fields
    request = msgspec.convert(body, ChatCompletionRequest)
    with pytest.raises(UnsupportedParameterError) as refused:
        inference.check_chat(request, PLAIN, "local-llama")
    assert refused.value.status_code == 400
    assert refused.value.code == "unsupported_parameter"
    assert refused.value.param == param
    assert "`local-llama`" in refused.value.message or param == "messages[0]"


def test_a_model_refuses_completion_features_it_lacks_and_takes_plain_requests() -> None:
    completion_features = (
        ({"logprobs": 1}, "logprobs"),
        ({"n": 3}, "n"),
        ({"echo": True}, "echo"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
    )
    for fields, param in completion_features:
        body = {"model": "local-llama", "prompt": "hi"} | fields
        request = msgspec.convert(body, CompletionRequest)
        with pytest.raises(UnsupportedParameterError, match="`local-llama`") as refused:
            inference.check_completion(request, PLAIN, "local-llama")
        assert refused.value.param == param
    plain = msgspec.convert(
        {"model": "local-llama", "messages": HELLO, "response_format": {"type": "text"}},
        ChatCompletionRequest,
    )
    inference.check_chat(plain, PLAIN, "local-llama")
    assert inference.chat_features(plain) is None


def test_no_http_module_names_an_engine() -> None:
    """Routes know capabilities, never an engine's tag or class."""
    from appliance import ENGINES  # noqa: PLC0415

    engine_words = {"LlamaCpp", "OpenAIUpstream", "Upstream", "Onnx", "Vllm", "TensorRT"}
    tags = set(ENGINES)
    engines = REPO / "appliance" / "_private" / "engines"
    for path in (REPO / "appliance" / "_private" / "http").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Name | ast.Attribute):
                name = node.id if isinstance(node, ast.Name) else node.attr
                assert not any(word in name for word in engine_words), f"{path}: {name}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in tags, f"{path}: names the engine {node.value!r}"
            if isinstance(node, ast.ImportFrom) and node.module:
                # The seam's own modules (base, registry, ...) are fine; an engine's room is not.
                room = node.module.removeprefix("appliance._private.engines.").split(".")[0]
                assert not (engines / room).is_dir(), f"{path}: imports {node.module}"


# --- through a real appliance in front of the stand-in --------------------------------------


@pytest.fixture(scope="module")
def standin() -> Iterator[RunningStandin]:
    with run_standin(model="standin-model") as running:
        yield running


@pytest.fixture(scope="module")
def appliance(
    standin: RunningStandin, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Appliance]:
    home = tmp_path_factory.mktemp("seam-home")
    config = (
        'node_id = "edge-gpu-1"\nregion = "eu-west"\n\n[[models]]\n'
        f'id = "{MODEL}"\nengine = "openai"\nupstream_url = "{standin.v1}"\n'
        'upstream_model = "standin-model"\ndevice_class = "gpu"\n'
    )
    with run_appliance(home, config) as running:
        yield running


@pytest.fixture(scope="module")
def member(appliance: Appliance) -> Member:
    admin = admin_of(appliance)
    admin.create_org("acme", ["eu-west"])
    return admin.member("acme", "org_user", "ada@acme.example")


@pytest.fixture(scope="module")
def client(appliance: Appliance, member: Member) -> openai.OpenAI:
    return openai.OpenAI(base_url=appliance.v1, api_key=member.key, max_retries=0, timeout=30)


def test_n_choices_pass_through_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, n=2, max_tokens=3)
    texts = [choice.message.content for choice in whole.choices]
    assert texts == [" tok0 tok1 tok2", " c1tok0 c1tok1 c1tok2"]
    assert [choice.finish_reason for choice in whole.choices] == ["length", "length"]
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, n=2, max_tokens=3, stream=True
    )
    streamed: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    assert streamed == {0: texts[0], 1: texts[1]}
    assert reasons == {0: "length", 1: "length"}
    completion = client.completions.create(model=MODEL, prompt="hi", n=2, max_tokens=2)
    assert [choice.text for choice in completion.choices] == [" tok0 tok1", " c1tok0 c1tok1"]


def test_tool_calls_pass_through_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER])
    (choice,) = whole.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert (call.id, call.function.name) == ("call_0", "get_weather")  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "standin"}  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, tools=[WEATHER], tool_choice="auto", stream=True
    )
    arguments, reasons = "", []
    for chunk in stream:
        for piece in chunk.choices:
            for fragment in piece.delta.tool_calls or ():
                arguments += (fragment.function.arguments or "") if fragment.function else ""
            if piece.finish_reason is not None:
                reasons.append(piece.finish_reason)
    assert json.loads(arguments) == {"city": "standin"}
    assert reasons == ["tool_calls"]
    # The conversation goes on with the tool's answer: full messages reach the upstream.
    history: list[ChatCompletionMessageParam] = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": "call_0", "content": "18C"},
    ]
    client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])


def test_tool_messages_reach_the_upstream_whole(
    client: openai.OpenAI, standin: RunningStandin
) -> None:
    call = {
        "id": "call_9",
        "type": "function",
        "function": {"name": "get_weather", "arguments": "{}"},
    }
    history: list[Any] = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_9", "content": "18C"},
    ]
    client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], parallel_tool_calls=False
    )
    body = httpx.get(f"{standin.url}/stats", timeout=10).json()["last_body"]
    assert body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert body["messages"][2] == {"role": "tool", "content": "18C", "tool_call_id": "call_9"}
    assert body["tools"] == [WEATHER]
    assert body["parallel_tool_calls"] is False


def test_logprobs_pass_through_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2, logprobs=True, top_logprobs=1
    )
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert [entry.token for entry in logprobs.content] == [" tok0", " tok1"]
    assert [len(entry.top_logprobs) for entry in logprobs.content] == [1, 1]
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2, logprobs=True, stream=True
    )
    tokens = [
        entry.token
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs is not None
        for entry in choice.logprobs.content or ()
    ]
    assert tokens == [" tok0", " tok1"]
    completion = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, logprobs=1)
    completion_logprobs = completion.choices[0].logprobs
    assert completion_logprobs is not None
    assert completion_logprobs.tokens == [" tok0", " tok1"]
    assert completion_logprobs.text_offset == [0, 5]


def test_response_format_json_schema_passes_through(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    form: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, response_format=form)
    assert json.loads(whole.choices[0].message.content or "") == {"name": "standin", "age": 1}
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, response_format={"type": "json_object"}, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert json.loads(text) == {"answer": "standin"}


def test_one_finished_path_for_completed_failed_and_cancelled(
    appliance: Appliance, client: openai.OpenAI, member: Member, standin: RunningStandin
) -> None:
    """Each generation is counted, settled and audited exactly once, however it ends."""
    admin = admin_of(appliance)

    def generations(reason: str) -> float:
        return appliance.metric("palisade_generations_total", model=MODEL, reason=reason)

    def requests() -> int:
        rows = admin.ok("GET", "/admin/v1/usage", org="acme", group_by="model")["rows"]
        return int(next((row["requests"] for row in rows if row["group"] == MODEL), 0))

    before = {reason: generations(reason) for reason in ("stop", "error", "cancelled")}
    settled = requests()
    ids = {"ok": client.chat.completions.create(model=MODEL, messages=HELLO).id}
    headers = {"Authorization": f"Bearer {member.key}"}
    body = {"model": MODEL, "messages": HELLO, "stream": True}
    try:
        standin.control(fail_after_tokens=2)
        failed = httpx.post(f"{appliance.v1}/chat/completions", json=body, headers=headers)
        events = [line[6:] for line in failed.text.splitlines() if line.startswith("data: ")]
        ids["error"] = json.loads(events[0])["id"]
        assert "error" in json.loads(events[-1])
        standin.control(fail_after_tokens=None, token_ms=200, tokens=50)
        with httpx.stream(
            "POST", f"{appliance.v1}/chat/completions", json=body, headers=headers
        ) as leaving:
            first = next(line for line in leaving.iter_lines() if line.startswith("data: "))
            ids["cancelled"] = json.loads(first[6:])["id"]
    finally:
        standin.control(fail_after_tokens=None, token_ms=0, tokens=8)
    wait_for(lambda: generations("cancelled") == before["cancelled"] + 1)
    assert generations("stop") == before["stop"] + 1
    assert generations("error") == before["error"] + 1
    wait_for(lambda: requests() == settled + 3)

    def audited() -> dict[str, list[str]]:
        export = admin.ok("GET", "/admin/v1/audit/export", org="acme")["export"]["entries"]
        rows = [json.loads(entry["entry"]) for entry in export]
        found: dict[str, list[str]] = {}
        for row in rows:
            if row.get("id") in ids.values():
                found.setdefault(row["id"], []).append(row["status"])
        return found

    wait_for(lambda: len(audited()) == 3)
    assert audited() == {record: [status] for status, record in ids.items()}
    assert requests() == settled + 3  # settled once each, no more
