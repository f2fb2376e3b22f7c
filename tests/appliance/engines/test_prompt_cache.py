"""The llama.cpp engine's prompt cache on the default GGUF, in process: a hit (a slot's own
KV, another stream's, or blocks restored from the host pool, ending mid-block too) gives
exactly the greedy text of a cold read; a conversation's next turn reuses its previous
prompt and answer; orgs do not share cached prompts unless the appliance says so; a tiny
pool evicts and stays correct; `cached_tokens` is what was not read."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from appliance._private.engines.base import (
    ChoiceDelta,
    EngineContext,
    Finish,
    RequestFeatures,
    SamplingParams,
    StepStats,
)
from appliance._private.engines.llamacpp.batching import common_prefix
from appliance._private.engines.llamacpp.config import LlamaCppModel
from appliance._private.engines.llamacpp.engine import LlamaCppEngine
from tests.conftest import MODEL
from tests.federation.tenants import Member, admin_of, secured_appliance
from tests.support import Appliance, default_model_path

BLOCK = 16  # tokens per host-pool block: small, so that prompts span many blocks
SLOTS = 2  # fewer slots than conversations: the host pool must keep their history
SYSTEM = "You answer questions about the city library: its hours, rooms and books. " * 2
QUESTIONS = [
    "When does the reading room open?",
    "Can I borrow a book about ships for a week?",
    "Where are the maps of old rivers?",
]
TOKENS = 8  # generated per answer
_cold = itertools.count()


class Recorder:
    """An engine with every decode step's statistics."""

    def __init__(self, **config: Any) -> None:
        path = default_model_path()
        model = LlamaCppModel(
            id=MODEL,
            path=str(path),
            context_length=512,
            max_sequences=SLOTS,
            threads=1,
            embeddings=False,
            prefix_cache_block=BLOCK,
            **config,
        )
        self.steps: list[StepStats] = []
        context = EngineContext(path.parent, path, lambda *_: None, on_step=self.steps.append)
        self.engine = LlamaCppEngine(model, context)
        self.engine.load()

    def tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        prompt = asyncio.run(self.engine.prepare_chat(messages))
        assert prompt.tokens is not None
        return prompt.tokens

    def run(self, tokens: list[int], scope: str) -> tuple[str, Finish, list[StepStats]]:
        """Greedy text of a prompt (token ids) in cache scope `scope`, alone, and the steps
        that served it."""
        mark = len(self.steps)

        async def go() -> tuple[str, Finish]:
            params = SamplingParams(TOKENS, temperature=0.0, cache_scope=scope)
            generation = self.engine.submit(await self.engine.prepare_text(tokens), params)
            text = await generation.text()
            assert generation.finish is not None
            return text, generation.finish

        text, finish = asyncio.run(go())
        assert finish.reason in {"stop", "length"}
        return text, finish, self.steps[mark:]

    def together(self, prompts: list[list[int]], scope: str) -> list[str]:
        """Greedy texts of several prompts in one completion request: placed in one go."""
        features = RequestFeatures(endpoint="completion")
        params = SamplingParams(TOKENS, temperature=0.0, cache_scope=scope, features=features)

        async def go() -> list[str]:
            first, *rest = [await self.engine.prepare_text(tokens) for tokens in prompts]
            prompt = dataclasses.replace(first, more=tuple(rest))
            texts = [""] * len(prompts)
            async for piece in self.engine.submit(prompt, params).pieces():
                for delta in [piece] if isinstance(piece, str) else piece:
                    if isinstance(delta, ChoiceDelta):
                        texts[delta.index] += delta.text
            return texts

        return asyncio.run(go())

    def cold(self, tokens: list[int]) -> str:
        """The text read from scratch: a scope of its own has nothing cached."""
        text, finish, _ = self.run(tokens, f"cold-{next(_cold)}")
        assert finish.cached_tokens == 0
        return text


@pytest.fixture(scope="module")
def cache() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.engine.close()


@pytest.fixture(scope="module")
def tiny() -> Iterator[Recorder]:
    """One MiB of host pool (three blocks), shared by every org."""
    recorder = Recorder(prefix_cache_mib=1, prefix_cache_sharing="appliance")
    yield recorder
    recorder.engine.close()


def conversation(question: str, *turns: tuple[str, str]) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for asked, answered in turns:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return [*messages, {"role": "user", "content": question}]


def read(steps: list[StepStats]) -> int:
    return sum(step.prefill_tokens for step in steps)


def test_hits_from_a_slot_and_from_the_host_pool_give_the_cold_text(cache: Recorder) -> None:
    prompts = [cache.tokens(conversation(question)) for question in QUESTIONS]
    colds = [cache.cold(tokens) for tokens in prompts]
    # What each shares with the one before: the system prompt and the user header.
    shared = [0] + [common_prefix(*pair) for pair in itertools.pairwise(prompts)]
    assert min(shared[1:]) > BLOCK
    firsts = []
    for tokens, cold in zip(prompts, colds, strict=True):
        text, finish, steps = cache.run(tokens, "org-a")
        assert text == cold
        assert finish.prompt_tokens == len(tokens)
        assert read(steps) == len(tokens) - finish.cached_tokens  # cached: not read
        firsts.append(finish)
    # The first found nothing in org-a, the others what they share with the one before
    # (the slot's own KV).
    assert [finish.cached_tokens for finish in firsts] == shared
    again = [cache.run(tokens, "org-a") for tokens in prompts]
    assert [text for text, _, _ in again] == colds
    for tokens, first, (_, finish, steps) in zip(prompts, firsts, again, strict=True):
        # From the host pool (the one slot in use held the previous prompt): the whole
        # blocks of what the first run decoded, but never the last prompt token (decoded
        # for its logits).
        whole = decoded(first) // BLOCK * BLOCK
        assert finish.cached_tokens == min(whole, len(tokens) - 1) > max(shared)
        assert read(steps) == len(tokens) - finish.cached_tokens
    _, resident, steps = cache.run(prompts[-1], "org-a")  # the slot holds it: all of it
    assert resident.cached_tokens == len(prompts[-1]) - 1
    assert read(steps) == 1


def decoded(finish: Finish) -> int:
    """The tokens a generation's stream held at its end: the prompt and the answer, but
    the answer's last token when it was cut at max_tokens (sampled, never decoded)."""
    return finish.prompt_tokens + finish.completion_tokens - (finish.reason == "length")


def test_a_hit_ending_mid_block_restores_part_of_a_block(cache: Recorder) -> None:
    first = cache.tokens(conversation(QUESTIONS[0]))
    cache.run(first, "org-mid")
    cache.run(cache.tokens(conversation(QUESTIONS[1])), "org-elsewhere")  # takes the slot
    cut = len(first) // BLOCK * BLOCK - BLOCK // 2 - 1  # inside the prompt's last whole block
    assert cut % BLOCK
    tail = cache.tokens([{"role": "user", "content": "Thank you, and goodbye."}])
    branch = first[:cut] + tail
    cold = cache.cold(branch)
    cache.run(cache.tokens(conversation(QUESTIONS[2])), "org-elsewhere")
    text, finish, steps = cache.run(branch, "org-mid")
    assert text == cold
    assert finish.cached_tokens == cut  # only the host pool held it: its blocks, the last partly
    assert read(steps) == len(branch) - cut


def test_the_next_turn_reuses_the_previous_prompt_and_answer(cache: Recorder) -> None:
    """Three conversations take turns on two slots: each second turn still finds its
    first turn, prompt and answer, in the cache."""
    firsts = [cache.tokens(conversation(question)) for question in QUESTIONS]
    answers = []
    for tokens in firsts:
        text, finish, _ = cache.run(tokens, "org-talk")
        assert len(tokens) == finish.prompt_tokens
        answers.append((text, finish))
    for question, (text, finish) in zip(QUESTIONS, answers, strict=True):
        second = cache.tokens(conversation("Thanks. And on Sundays?", (question, text)))
        reply, again, steps = cache.run(second, "org-talk")
        assert reply == cache.cold(second)
        # The previous prompt and the answer's tokens but the last (never decoded), less
        # the stream's last partial block when it comes from the host pool, and any
        # token the answer's text tokenizes to differently.
        held = decoded(finish)
        assert held - BLOCK <= again.cached_tokens <= held
        assert read(steps) == len(second) - again.cached_tokens


def test_one_orgs_prompt_is_not_reused_by_another(cache: Recorder) -> None:
    tokens = cache.tokens(conversation("Is there a quiet room for studying?"))
    _, first, _ = cache.run(tokens, "org-x")
    text, other, steps = cache.run(tokens, "org-y")
    assert first.cached_tokens == 0
    assert other.cached_tokens == 0
    assert read(steps) == len(tokens)
    _, same, _ = cache.run(tokens, "org-x")  # from the host pool: org-y took the slot
    assert same.cached_tokens == min(decoded(first) // BLOCK * BLOCK, len(tokens) - 1) > 0
    assert text == cache.cold(tokens)


def test_an_appliance_wide_cache_is_shared_by_orgs(tiny: Recorder) -> None:
    tokens = tiny.tokens(conversation("Do you lend films as well as books?"))
    _, first, _ = tiny.run(tokens, "org-x")
    _, other, _ = tiny.run(tokens, "org-y")
    assert other.cached_tokens == len(tokens) - 1 > first.cached_tokens


def test_a_tiny_pool_evicts_and_every_answer_stays_the_cold_one(
    tiny: Recorder, cache: Recorder
) -> None:
    prompts = [
        tiny.tokens(conversation(f"{question} Please answer for a visitor number {number}."))
        for number in range(2)
        for question in QUESTIONS[:2]
    ]
    colds = [cache.cold(tokens) for tokens in prompts]  # the other engine: its own pool
    mark = len(tiny.steps)
    for _ in range(2):
        assert [tiny.run(tokens, "org-x")[0] for tokens in prompts] == colds
    steps = tiny.steps[mark:]
    assert sum(step.cache_evicted_blocks for step in steps) > 0
    capacity = 1 << 20
    assert all(0 < step.cache_bytes <= capacity == step.cache_capacity_bytes for step in steps)
    assert sum(step.cache_hit_tokens for step in steps) > 0


def test_cache_lookups_and_tokens_are_counted(cache: Recorder) -> None:
    tokens = cache.tokens(conversation("Who runs the library?"))
    for scope in ("org-count", "org-count"):
        _, finish, steps = cache.run(tokens, scope)
        assert sum(step.cache_lookups for step in steps) == 1
        assert sum(step.cache_query_tokens for step in steps) == len(tokens)
        assert sum(step.cache_hit_tokens for step in steps) == finish.cached_tokens


def test_a_stream_waiting_to_be_copied_is_not_overwritten_by_a_restore(cache: Recorder) -> None:
    """llama.cpp copies a stream's tensors only at the next decode. Two prompts placed at
    once: the first copies the free slot 1's stream into slot 0; the second takes slot 1
    and finds its own prompt in the host pool. Restoring it there before the decode would
    give the first prompt the second's KV."""
    copied, restored, other = (
        cache.tokens(conversation(f"{question} I am visitor number {number}."))
        for number, question in enumerate(QUESTIONS)
    )
    cache.run(restored, "org-race")  # into the host pool

    async def slots_hold_other_and_copied() -> None:  # slot 0 `other`, slot 1 `copied`
        params = SamplingParams(TOKENS, temperature=0.0, cache_scope="org-race")
        first = cache.engine.submit(await cache.engine.prepare_text(other), params)
        second = cache.engine.submit(await cache.engine.prepare_text(copied), params)
        await asyncio.gather(first.text(), second.text())

    asyncio.run(slots_hold_other_and_copied())
    texts = cache.together([copied, restored], "org-race")
    assert texts == [cache.cold(copied), cache.cold(restored)]


# --- through a real appliance: the caller's org is the scope -----------------------------------


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Appliance, Member, Member]]:
    home = tmp_path_factory.mktemp("cache-orgs")
    small = {"context_length": 512, "max_sequences": SLOTS, "threads": 1, "embeddings": False}
    with secured_appliance(home, "eu-west", prefix_cache_block=BLOCK, **small) as appliance:
        admin = admin_of(appliance)
        for org in ("acme", "globex"):
            admin.create_org(org, ["eu-west"])
        yield (
            appliance,
            admin.member("acme", "org_user", "ada@acme.eu"),
            admin.member("globex", "org_user", "gail@globex.eu"),
        )


def cached_of(appliance: Appliance, member: Member, *, stream: bool) -> int:
    client = openai.OpenAI(base_url=appliance.v1, api_key=member.key, max_retries=0)
    messages: Any = conversation("Which floor has the newspapers?")
    if not stream:
        usage = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=4, temperature=0
        ).usage
    else:
        chunks = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [chunk for chunk in chunks if chunk.usage is not None][-1].usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    return cached


def test_the_callers_org_scopes_the_cache_and_usage_reports_it(
    tenants: tuple[Appliance, Member, Member],
) -> None:
    appliance, acme, globex = tenants
    assert cached_of(appliance, acme, stream=False) == 0
    assert cached_of(appliance, globex, stream=True) == 0  # acme's prompt is not globex's
    hits = appliance.metric("palisade_prefix_cache_hit_tokens_total", model=MODEL)
    again = cached_of(appliance, acme, stream=True)
    assert again > BLOCK
    assert appliance.metric("palisade_prefix_cache_hit_tokens_total", model=MODEL) == hits + again
    assert appliance.metric("palisade_prefix_cache_lookups_total", model=MODEL) == 3
    assert appliance.metric("palisade_prefix_cache_capacity_bytes", model=MODEL) == 2048 << 20
    assert appliance.metric("palisade_prefix_cache_bytes", model=MODEL) > 0


def test_a_request_waits_for_another_reading_the_same_prefix_then_copies_it(
    cache: Recorder,
) -> None:
    """Two new requests with one system prompt: the second does not read it as well, but
    copies the first's stream once it has, then reads only its own question."""
    first, second = (cache.tokens(conversation(question)) for question in QUESTIONS[:2])
    shared = common_prefix(first, second)
    assert shared >= 32  # prefill_chunk: worth waiting for
    colds = [cache.cold(first), cache.cold(second)]
    mark = len(cache.steps)

    async def both() -> list[tuple[str, Finish]]:
        params = SamplingParams(TOKENS, temperature=0.0, cache_scope="org-wave")
        generations = [
            cache.engine.submit(await cache.engine.prepare_text(tokens), params)
            for tokens in (first, second)
        ]
        texts = await asyncio.gather(*(generation.text() for generation in generations))
        return [(text, g.finish) for text, g in zip(texts, generations, strict=True) if g.finish]

    (text1, finish1), (text2, finish2) = asyncio.run(both())
    assert [text1, text2] == colds
    assert (finish1.cached_tokens, finish2.cached_tokens) == (0, shared)
    assert read(cache.steps[mark:]) == len(first) + len(second) - shared


def test_a_next_turns_rest_is_read_in_a_step_of_its_own_while_another_generates(
    cache: Recorder,
) -> None:
    """A mostly cached prompt arriving while another request generates is read in a step
    without the other's decode (its first token does not wait for it), the other decodes in
    the next step, and both answers are the cold ones."""
    talk, busy = (cache.tokens(conversation(question)) for question in QUESTIONS[1:])
    colds = [cache.cold(busy), cache.cold(talk)]
    cache.run(talk, "org-rest")  # its next run reads only a rest
    mark = len(cache.steps)

    async def both() -> list[tuple[str, Finish]]:
        generating = cache.engine.submit(
            await cache.engine.prepare_text(busy),
            SamplingParams(TOKENS, temperature=0.0, cache_scope="org-busy"),
        )
        pieces = generating.stream()
        first = await anext(pieces)  # it generates now
        arriving = cache.engine.submit(
            await cache.engine.prepare_text(talk),
            SamplingParams(TOKENS, temperature=0.0, cache_scope="org-rest"),
        )
        texts = [first + "".join([piece async for piece in pieces]), await arriving.text()]
        pairs = zip(texts, (generating, arriving), strict=True)
        return [(text, g.finish) for text, g in pairs if g.finish is not None]

    (busy_text, busy_finish), (talk_text, talk_finish) = asyncio.run(both())
    assert [busy_text, talk_text] == colds
    assert busy_finish.completion_tokens == TOKENS
    rest = len(talk) - talk_finish.cached_tokens
    assert 0 < rest < BLOCK  # from the host pool: the slots went to other scopes
    steps = cache.steps[mark:]
    read_at = next(i for i, step in enumerate(steps) if step.prefill_tokens == rest)
    assert steps[read_at].decode_tokens == 0
    assert steps[read_at + 1].decode_tokens == 2
