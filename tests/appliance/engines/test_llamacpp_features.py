"""The llama.cpp engine's OpenAI features, in process on the default GGUF: n choices sharing
one prefill, log probabilities, logit bias, echo, several prompts, structured output and
tools (grammar-constrained sampling), and their refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jsonschema
import pytest

from appliance._private.engines.base import (
    ChoiceDelta,
    EngineContext,
    Finish,
    Prompt,
    RequestFeatures,
    SamplingParams,
    StepStats,
)
from appliance._private.engines.llamacpp.config import LlamaCppModel
from appliance._private.engines.llamacpp.engine import LlamaCppEngine, _takes_tools
from federation import InvalidRequestError
from tests.conftest import MODEL
from tests.support import default_model_path

T = TypeVar("T")
MAX_SEQUENCES = 4
STORY = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": CITY,
    },
}


@dataclass
class Steps:
    """Every decode step's statistics, as the engine reports them."""

    seen: list[StepStats] = field(default_factory=list)

    def mark(self) -> int:
        return len(self.seen)

    def since(self, mark: int) -> list[StepStats]:
        return self.seen[mark:]


@dataclass
class Answer:
    texts: dict[int, str]
    deltas: dict[int, list[ChoiceDelta]]
    finish: Finish

    def logprobs(self, index: int, key: str) -> list[Any]:
        """One list of the choice's log-probability object, over all its pieces."""
        return [
            item
            for delta in self.deltas[index]
            if delta.logprobs is not None
            for item in (delta.logprobs[key] or [])
        ]

    def reason(self, index: int) -> str | None:
        return next((d.finish_reason for d in self.deltas[index] if d.finish_reason), None)


@pytest.fixture(scope="module")
def steps() -> Steps:
    return Steps()


@pytest.fixture(scope="module")
def engine(steps: Steps) -> Iterator[LlamaCppEngine]:
    path = default_model_path()
    config = LlamaCppModel(
        id=MODEL, path=str(path), context_length=512, max_sequences=MAX_SEQUENCES, threads=1
    )
    context = EngineContext(
        home=path.parent, path=path, on_finish=lambda *_: None, on_step=steps.seen.append
    )
    engine = LlamaCppEngine(config, context)
    engine.load()
    yield engine
    engine.close()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


async def answer(engine: LlamaCppEngine, prompt: Prompt, params: SamplingParams) -> Answer:
    generation = engine.submit(prompt, params)
    texts: dict[int, str] = {}
    deltas: dict[int, list[ChoiceDelta]] = {}
    async for piece in generation.pieces():
        for item in [piece] if isinstance(piece, str) else piece:
            delta = ChoiceDelta(0, item) if isinstance(item, str) else item
            texts[delta.index] = texts.get(delta.index, "") + delta.text
            deltas.setdefault(delta.index, []).append(delta)
    assert generation.finish is not None
    return Answer(texts, deltas, generation.finish)


def chat(
    engine: LlamaCppEngine, messages: list[dict[str, Any]], tokens: int = 24, **features: Any
) -> Answer:
    wanted = RequestFeatures(**features) if features else None
    params = SamplingParams(max_tokens=tokens, temperature=0.0, features=wanted)

    async def go() -> Answer:
        return await answer(engine, await engine.prepare_chat(messages, wanted), params)

    return run(go())


def complete(engine: LlamaCppEngine, *prompts: str, tokens: int = 8, **features: Any) -> Answer:
    wanted = RequestFeatures(endpoint="completion", **features)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, features=wanted)

    async def go() -> Answer:
        first, *rest = [await engine.prepare_text(text) for text in prompts]
        return await answer(engine, dataclasses.replace(first, more=tuple(rest)), params)

    return run(go())


def biased(engine: LlamaCppEngine, bias: tuple[tuple[int, float], ...], tokens: int) -> Answer:
    features = RequestFeatures(logprobs=True)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, logit_bias=bias, features=features)

    async def go() -> Answer:
        return await answer(engine, await engine.prepare_chat(STORY, features), params)

    return run(go())


# --- n choices -----------------------------------------------------------------------------


def test_n_choices_read_their_prompt_once_and_each_is_the_text_alone(
    engine: LlamaCppEngine, steps: Steps
) -> None:
    messages = [{"role": "user", "content": "Describe a busy market at noon."}]
    size = run(engine.prepare_chat(messages)).size
    mark = steps.mark()
    three = chat(engine, messages, n=3)
    read = steps.since(mark)
    # The prompt is read once (less what a slot already held); two choices copy it.
    assert sum(step.prefill_tokens for step in read) <= size
    assert sum(step.reused_tokens for step in read) >= 2 * size
    assert three.finish.prompt_tokens == size
    assert three.finish.completion_tokens == 3 * 24
    assert {three.reason(index) for index in range(3)} == {"length"}
    alone = chat(engine, messages).texts[0]
    assert three.texts == {0: alone, 1: alone, 2: alone}  # greedy: each is the text alone


def test_sampled_choices_differ_and_a_seed_repeats_them(engine: LlamaCppEngine) -> None:
    features = RequestFeatures(n=2)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7, features=features)

    async def go() -> Answer:
        return await answer(engine, await engine.prepare_chat(STORY, features), params)

    first, again = run(go()), run(go())
    assert first.texts == again.texts
    assert first.texts[0] != first.texts[1]


def test_more_choices_than_sequences_is_a_400_naming_n(engine: LlamaCppEngine) -> None:
    features = RequestFeatures(n=MAX_SEQUENCES + 1)
    with pytest.raises(InvalidRequestError) as refused:
        run(engine.prepare_chat(STORY, features))
    assert refused.value.param == "n"
    assert refused.value.code == "invalid_value"
    assert f"at most {MAX_SEQUENCES}" in refused.value.message


# --- log probabilities ----------------------------------------------------------------------


def test_chat_logprobs_are_sorted_and_agree_with_the_chosen_token(
    engine: LlamaCppEngine,
) -> None:
    reply = chat(engine, STORY, logprobs=True, top_logprobs=5)
    content = reply.logprobs(0, "content")
    assert len(content) == reply.finish.completion_tokens == 24
    assert "".join(entry["token"] for entry in content) == reply.texts[0]
    for entry in content:
        top = entry["top_logprobs"]
        values = [alternative["logprob"] for alternative in top]
        assert len(top) == 5
        assert values == sorted(values, reverse=True)
        assert entry["logprob"] <= 0.0
        assert sum(math.exp(value) for value in values) <= 1.0 + 1e-6
        assert bytes(entry["bytes"]).decode() == entry["token"]
        # Greedy: the chosen token is the best one, with the same log probability.
        assert top[0]["token"] == entry["token"]
        assert top[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-9)
    assert chat(engine, STORY).texts == reply.texts  # asking for them changes nothing


def test_completion_logprobs_have_the_completions_shape(engine: LlamaCppEngine) -> None:
    reply = complete(engine, "The capital of France is", logprobs=True, top_logprobs=2)
    text = reply.texts[0]
    tokens = reply.logprobs(0, "tokens")
    offsets = reply.logprobs(0, "text_offset")
    top = reply.logprobs(0, "top_logprobs")
    assert len(tokens) == len(offsets) == len(top) == len(reply.logprobs(0, "token_logprobs"))
    assert "".join(tokens) == text
    for token, offset, alternatives in zip(tokens, offsets, top, strict=True):
        assert text[offset:].startswith(token)
        assert len(alternatives) == 2


# --- logit bias -----------------------------------------------------------------------------


def test_logit_bias_of_minus_100_bans_a_token_and_plus_100_forces_it(
    engine: LlamaCppEngine,
) -> None:
    plain = biased(engine, (), 12)
    chosen = [bytes(entry["bytes"]) for entry in plain.logprobs(0, "content")]
    first = engine.tokenize_text(chosen[0].decode())
    assert len(first) == 1
    banned = biased(engine, ((first[0], -100.0),), 12)
    assert chosen[0] not in [bytes(e["bytes"]) for e in banned.logprobs(0, "content")]
    assert banned.texts[0] != plain.texts[0]
    cat = engine.tokenize_text(" cat")
    assert len(cat) == 1
    assert biased(engine, ((cat[0], 100.0),), 6).texts[0] == " cat" * 6


# --- echo and several prompts ---------------------------------------------------------------


def test_echo_starts_with_the_prompt_and_scores_every_prompt_token(
    engine: LlamaCppEngine,
) -> None:
    prompt = "The quick brown fox jumps over"
    plain = complete(engine, prompt).texts[0]
    echoed = complete(engine, prompt, echo=True, logprobs=True, top_logprobs=1)
    assert echoed.texts[0] == prompt + plain
    size = len(engine.tokenize_text(prompt))
    scores = echoed.logprobs(0, "token_logprobs")
    assert len(scores) == size + 8
    assert scores[0] is None  # nothing predicts the first token
    assert all(score is not None and score <= 0.0 for score in scores[1:])
    assert "".join(echoed.logprobs(0, "tokens")) == echoed.texts[0]
    assert echoed.logprobs(0, "text_offset")[size] == len(prompt)
    assert complete(engine, prompt, echo=True).texts[0] == prompt + plain


def test_several_prompts_give_n_choices_each_in_prompt_order(engine: LlamaCppEngine) -> None:
    first, second = "Once upon a time", "The weather today is"
    alone = [complete(engine, first).texts[0], complete(engine, second).texts[0]]
    together = complete(engine, first, second, n=2)
    assert together.texts == {0: alone[0], 1: alone[0], 2: alone[1], 3: alone[1]}
    sizes = len(engine.tokenize_text(first)) + len(engine.tokenize_text(second))
    assert together.finish.prompt_tokens == sizes
    assert together.finish.completion_tokens == 4 * 8


# --- structured output and tools ------------------------------------------------------------


def test_a_json_schema_is_enforced_and_the_choices_validate(engine: LlamaCppEngine) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    messages = [{"role": "user", "content": "Invent a person with a name and an age."}]
    reply = chat(engine, messages, 60, response_format=response_format, n=2)
    for index in (0, 1):
        jsonschema.validate(json.loads(reply.texts[index]), PERSON)
        assert reply.reason(index) == "stop"


def test_a_required_tool_is_called_with_arguments_that_validate(
    engine: LlamaCppEngine,
) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = chat(engine, messages, 60, tools=[WEATHER_TOOL], tool_choice="required")
    fragments = [f for delta in reply.deltas[0] for f in delta.tool_calls or []]
    assert fragments[0]["function"]["name"] == "get_weather"
    assert fragments[0]["id"].startswith("call_")
    arguments = "".join(f["function"].get("arguments") or "" for f in fragments)
    jsonschema.validate(json.loads(arguments), CITY)
    assert reply.reason(0) == "tool_calls"


def test_a_schema_outside_the_subset_is_a_400_before_admission(
    engine: LlamaCppEngine,
) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "string"}}, "patternProperties": {}}
    features = RequestFeatures(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    with pytest.raises(InvalidRequestError) as refused:
        run(engine.prepare_chat(STORY, features))
    assert refused.value.code == "unsupported_schema"
    assert "patternProperties" in (refused.value.param or "")
    assert engine.load_now().running == 0


# --- cancellation ---------------------------------------------------------------------------


def test_cancelling_a_request_ends_every_choice_and_frees_their_slots(
    engine: LlamaCppEngine,
) -> None:
    features = RequestFeatures(n=3)
    params = SamplingParams(max_tokens=400, temperature=0.0, features=features)

    async def go() -> Finish:
        ended: asyncio.Future[Finish] = asyncio.get_running_loop().create_future()
        prompt = await engine.prepare_chat(STORY, features)
        generation = engine.submit(prompt, params, ended.set_result)
        async for _ in generation.pieces():
            break  # leaving early cancels the generation
        return await asyncio.wait_for(ended, 30)

    finish = run(go())
    assert finish.reason == "cancelled"
    assert 0 < finish.completion_tokens < 3 * 400
    assert engine.load_now().running == 0
    assert chat(engine, STORY, n=MAX_SEQUENCES).finish.reason == "length"  # every slot free


# --- the chat template ----------------------------------------------------------------------


def test_a_template_that_renders_tools_is_detected(engine: LlamaCppEngine) -> None:
    with_tools = "{% if tools %}{{ tools | tojson }}{% endif %}{{ messages[0].content }}"
    assert _takes_tools(with_tools)
    assert not _takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not _takes_tools("{% if unclosed %}")  # not a template: the generic format
    assert not engine._template_tools  # SmolLM2's template has no tools: generic format
