"""The scripted engine in-process (no sockets, no model): its script, failures, admission and
cancellation. The conformance suite drives it through a real appliance."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from appliance._private.engines.base import (
    ChoiceDelta,
    EngineContext,
    Finish,
    Generation,
    RequestFeatures,
    SamplingParams,
)
from appliance._private.engines.registry import create_engine
from appliance._private.engines.scripted import script
from appliance._private.engines.scripted.config import ScriptedModel
from appliance._private.engines.scripted.engine import ScriptedEngine
from appliance._private.errors import QueueFullError

USER = [{"role": "user", "content": "tell me about the sea"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def scripted(finished: list[Finish] | None = None, **keys: Any) -> ScriptedEngine:
    config = msgspec.convert({"id": "s", "engine": "scripted", **keys}, ScriptedModel)
    on_finish = (lambda _, finish: finished.append(finish)) if finished is not None else None
    context = EngineContext(Path("."), None, on_finish or (lambda *_: None))
    engine = create_engine(config, context)
    assert isinstance(engine, ScriptedEngine)
    engine.load()
    return engine


async def run(
    engine: ScriptedEngine, params: SamplingParams, messages: list[dict[str, Any]] = USER
) -> tuple[list[str | ChoiceDelta], Finish]:
    generation = engine.submit(await engine.prepare_chat(messages), params)
    return await collect(generation)


async def collect(generation: Generation) -> tuple[list[str | ChoiceDelta], Finish]:
    pieces: list[str | ChoiceDelta] = []
    async for piece in generation.pieces():
        pieces += [piece] if isinstance(piece, str) else piece
    assert generation.finish is not None
    return pieces, generation.finish


def test_replies_cycle_and_an_empty_script_echoes_the_user() -> None:
    async def scenario() -> list[str]:
        replying = scripted(replies=["one two", "three"])
        echoing = scripted()
        params = SamplingParams(max_tokens=10)
        texts = []
        for engine in (replying, replying, replying, echoing):
            pieces, _ = await run(engine, params)
            texts.append("".join(str(piece) for piece in pieces))
        return texts

    assert asyncio.run(scenario()) == ["one two", "three", "one two", "tell me about the sea"]


def test_stop_max_tokens_and_ignore_eos_shape_the_text() -> None:
    params = SamplingParams(max_tokens=3)
    assert script.text_choice("a b c d e", params) == script.ChoiceScript(
        ["a", " b", " c"], "length"
    )
    stopped = script.text_choice("a b c d", SamplingParams(max_tokens=9, stop=(" d", " c")))
    assert stopped == script.ChoiceScript(["a", " b"], "stop")
    repeated = script.text_choice("a b", SamplingParams(max_tokens=5, ignore_eos=True))
    assert repeated == script.ChoiceScript(["a", " b", " a", " b", " a"], "length")


def test_failure_after_tokens_ends_the_generation_with_the_configured_code() -> None:
    finished: list[Finish] = []
    engine = scripted(finished, replies=["a b c d"], fail_after_tokens=2, fail_code="boom")
    pieces, finish = asyncio.run(run(engine, SamplingParams(max_tokens=10)))
    assert "".join(map(str, pieces)) == "a b"
    assert finish.reason == "error"
    assert finish.completion_tokens == 2
    assert finish.failure is not None
    assert (finish.failure.status_code, finish.failure.code) == (500, "boom")
    assert finished == [finish]


def test_failure_before_any_text_is_seen_before_the_first_token() -> None:
    engine = scripted(replies=["a b"], fail_after_tokens=0)

    async def scenario() -> Finish | None:
        generation = engine.submit(await engine.prepare_chat(USER), SamplingParams(max_tokens=4))
        return await generation.wait_started()

    early = asyncio.run(scenario())
    assert early is not None
    assert early.reason == "error"  # an HTTP error status, not a broken stream


def test_a_full_engine_refuses_and_a_cancelled_generation_frees_its_slot() -> None:
    finished: list[Finish] = []
    engine = scripted(finished, replies=["a b c d e f"], slots=1, max_queue=0, token_ms=60_000)

    async def scenario() -> None:
        prompt = await engine.prepare_chat(USER)
        done = asyncio.Event()
        running = engine.submit(prompt, SamplingParams(max_tokens=6), lambda _: done.set())
        with pytest.raises(QueueFullError) as refused:
            engine.submit(prompt, SamplingParams(max_tokens=6))
        assert refused.value.retry_after == 1
        async for _ in running.stream():
            break  # the client leaves after the first token
        await done.wait()

    asyncio.run(scenario())
    assert [finish.reason for finish in finished] == ["cancelled"]
    assert engine.load_now().running == engine.load_now().waiting == 0


def test_n_choices_with_log_probabilities_come_as_choice_deltas() -> None:
    engine = scripted(replies=["a b", "c d"], n=True, logprobs=True)
    features = RequestFeatures(n=2, logprobs=True, top_logprobs=2)
    pieces, finish = asyncio.run(run(engine, SamplingParams(max_tokens=5, features=features)))
    deltas = [piece for piece in pieces if isinstance(piece, ChoiceDelta)]
    assert len(deltas) == len(pieces)
    texts = {index: "".join(d.text for d in deltas if d.index == index) for index in (0, 1)}
    assert texts == {0: "a b", 1: "c d"}
    assert finish.completion_tokens == 4
    first = deltas[0].logprobs
    assert first is not None
    assert [alt["token"] for alt in first["content"][0]["top_logprobs"]] == ["a", " alt1"]
    ends = [(d.index, d.finish_reason) for d in deltas if d.finish_reason]
    assert ends == [(1, "stop")]  # choice 0's end is the generation's own Finish


def test_tools_are_called_with_schema_arguments_until_a_tool_answers() -> None:
    engine = scripted(replies=["sunny"], tools=True)
    features = RequestFeatures(tools=[WEATHER], tool_choice="auto")
    params = SamplingParams(max_tokens=50, features=features)
    pieces, _ = asyncio.run(run(engine, params))
    deltas = [piece for piece in pieces if isinstance(piece, ChoiceDelta)]
    calls = [call for delta in deltas for call in delta.tool_calls or ()]
    assert calls[0]["function"]["name"] == "get_weather"
    arguments = "".join(call["function"]["arguments"] for call in calls)
    assert json.loads(arguments) == {"city": "scripted", "days": 1}
    assert deltas[-1].finish_reason == "tool_calls"
    answered = [*USER, {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    pieces, _ = asyncio.run(run(engine, params, answered))
    assert pieces == ["sunny"]
    none = SamplingParams(
        max_tokens=50, features=RequestFeatures(tools=[WEATHER], tool_choice="none")
    )
    assert asyncio.run(run(engine, none))[0] == ["sunny"]


def test_json_answers_match_their_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 3},
            "kind": {"enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "score": {"type": ["number", "null"], "minimum": 2},
            "ok": {"type": "boolean"},
            "fixed": {"const": 7},
        },
    }
    assert script.example(schema) == {
        "name": "scr",
        "kind": "a",
        "tags": ["scripted", "scripted"],
        "score": 2.0,
        "ok": True,
        "fixed": 7,
    }
    assert script.json_reply({"type": "json_object"}, "hi") == '{"reply": "hi"}'
    assert script.json_reply({"type": "text"}, "hi") is None


def test_completion_log_probabilities_use_the_legacy_shape() -> None:
    legacy = script.logprobs_of(" b", 1, 1, 2, chat=False)
    assert legacy == {
        "tokens": [" b"],
        "token_logprobs": [-0.25],
        "top_logprobs": [{" b": -0.25, " alt1": -1.25}],
        "text_offset": [1],
    }


def test_embeddings_are_unit_vectors_of_the_text() -> None:
    engine = scripted(embeddings=True)
    vectors, tokens = asyncio.run(engine.embed(["the sea", "the sea", "a ship"]))
    assert vectors[0] == vectors[1] != vectors[2]
    assert abs(sum(value * value for value in vectors[2]) - 1.0) < 1e-9
    assert tokens == 6


def test_a_script_it_cannot_follow_ends_the_generation_with_an_error() -> None:
    engine = scripted(tools=True)
    parameters = {"type": "array", "minItems": "many"}  # not a number
    broken = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    features = RequestFeatures(tools=[broken])
    pieces, finish = asyncio.run(run(engine, SamplingParams(max_tokens=5, features=features)))
    assert pieces == []
    assert finish.reason == "error"
    assert finish.failure is not None
    assert finish.failure.code == "engine_error"
    assert engine.load_now().running == 0
