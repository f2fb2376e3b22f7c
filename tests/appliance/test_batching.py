"""Continuous batching through a real appliance: exactness, isolation, limits, reuse, metrics."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from appliance._private.engines.base import (
    EngineContext,
    RequestFeatures,
    SamplingParams,
    StepStats,
)
from appliance._private.engines.llamacpp.config import LlamaCppModel
from appliance._private.engines.llamacpp.engine import LlamaCppEngine
from tests.conftest import MODEL
from tests.support import (
    Appliance,
    default_model_path,
    model_toml,
    run_appliance,
    run_palisade,
    wait_for,
)

SUBJECTS = [
    "cat", "dog", "robot", "ship", "king", "tree", "river", "star",
    "bird", "city", "child", "horse", "train", "garden", "dragon", "clock",
]  # fmt: skip
SYSTEM = "You are a careful assistant for a public library. " * 12


def ask(subject: str, system: str | None = None) -> list[ChatCompletionMessageParam]:
    messages: list[ChatCompletionMessageParam] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": f"Tell me a short story about a {subject}."})
    return messages


def complete(
    client: openai.OpenAI, messages: list[ChatCompletionMessageParam], tokens: int = 40
) -> str:
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=tokens, temperature=0
    )
    return reply.choices[0].message.content or ""


def test_sixteen_concurrent_requests_each_produce_exactly_their_text_alone(
    client: openai.OpenAI, appliance: Appliance
) -> None:
    alone = {subject: complete(client, ask(subject)) for subject in SUBJECTS}
    batches_before = appliance.metric("palisade_batch_sequences_count", model=MODEL)
    with ThreadPoolExecutor(len(SUBJECTS)) as pool:
        together = dict(
            zip(SUBJECTS, pool.map(lambda s: complete(client, ask(s)), SUBJECTS), strict=True)
        )
    assert together == alone
    assert len(set(alone.values())) == len(SUBJECTS)  # 16 genuinely different answers
    # They really were decoded together: some step carried more than 8 sequences.
    assert appliance.metric("palisade_batch_sequences_count", model=MODEL) > batches_before
    over_eight = appliance.metric("palisade_batch_sequences_bucket", model=MODEL, le="8.0")
    total = appliance.metric("palisade_batch_sequences_count", model=MODEL)
    assert total > over_eight


def test_cancelling_one_stream_leaves_the_others_unchanged(
    client: openai.OpenAI, appliance: Appliance
) -> None:
    subjects = SUBJECTS[:4]
    alone = {subject: complete(client, ask(subject), 60) for subject in subjects}
    cancelled_before = appliance.metric(
        "palisade_generations_total", model=MODEL, reason="cancelled"
    )
    started = threading.Barrier(len(subjects))

    def run(subject: str) -> str:
        stream = client.chat.completions.create(
            model=MODEL, messages=ask(subject), max_tokens=60, temperature=0, stream=True
        )
        started.wait()
        text = ""
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if subject == subjects[0] and len(text) > 10:
                stream.close()  # hang up mid-stream
                break
        return text

    with ThreadPoolExecutor(len(subjects)) as pool:
        results = dict(zip(subjects, pool.map(run, subjects), strict=True))
    for subject in subjects[1:]:
        assert results[subject] == alone[subject]
    assert alone[subjects[0]].startswith(results[subjects[0]])
    assert len(results[subjects[0]]) < len(alone[subjects[0]])
    wait_for(
        lambda: (
            appliance.metric("palisade_generations_total", model=MODEL, reason="cancelled")
            > cancelled_before
        ),
        timeout=30,
    )


def test_a_shared_system_prompt_is_reused_without_changing_the_answer(
    client: openai.OpenAI, appliance: Appliance
) -> None:
    first = complete(client, ask("lighthouse", SYSTEM))
    reused_before = appliance.metric("palisade_prefix_reused_tokens_total", model=MODEL)
    complete(client, ask("volcano", SYSTEM))
    again = complete(client, ask("lighthouse", SYSTEM))
    assert appliance.metric("palisade_prefix_reused_tokens_total", model=MODEL) >= (
        reused_before + 2 * 64  # most of the system prompt, twice
    )
    assert again == first


def test_a_long_prompt_is_read_in_chunks_while_another_stream_keeps_its_text(
    client: openai.OpenAI, appliance: Appliance
) -> None:
    long_text = "The library opens at nine and closes at five on weekdays. " * 90
    alone = complete(client, ask("comet"), 60)
    prefill_before = appliance.metric("palisade_batch_sequences_count", model=MODEL)
    with ThreadPoolExecutor(2) as pool:
        flowing = pool.submit(complete, client, ask("comet"), 60)
        long = pool.submit(
            complete, client, [{"role": "user", "content": long_text + "Summarize."}], 8
        )
        assert flowing.result() == alone
        assert long.result()
    # ~1,100 prompt tokens in chunks of 32: many steps, not one.
    assert appliance.metric("palisade_batch_sequences_count", model=MODEL) - prefill_before > 17


def test_a_long_context_decodes_the_same_alone_and_in_a_batch(client: openai.OpenAI) -> None:
    # Past 256 cells llama.cpp has a faster kernel for a lone sequence over an f16 cache;
    # with the default 8-bit keys a sequence decodes alike alone and among others.
    notes = "Minutes of the reading club: members discussed novels, poems and plays. " * 45
    question = ask("comet", notes)
    alone = complete(client, question, 48)
    with ThreadPoolExecutor(4) as pool:
        together = pool.submit(complete, client, question, 48)
        others = [pool.submit(complete, client, ask(s), 48) for s in SUBJECTS[:3]]
        assert together.result() == alone
        assert all(other.result() for other in others)


def test_metrics_report_batches_kv_cells_and_throughput(
    http: httpx.Client, client: openai.OpenAI
) -> None:
    complete(client, ask("owl"))
    text = http.get("/metrics").text
    for name in (
        "palisade_batch_sequences_bucket",
        'palisade_step_tokens_total{model="smollm2-135m-instruct",phase="prefill"}',
        'palisade_step_tokens_total{model="smollm2-135m-instruct",phase="decode"}',
        'palisade_kv_cells{model="smollm2-135m-instruct",state="in_use"}',
        'palisade_kv_cells{model="smollm2-135m-instruct",state="cached"}',
        'palisade_tokens_per_second{model="smollm2-135m-instruct",phase="decode"}',
        'palisade_queue_depth{model="smollm2-135m-instruct"}',
    ):
        assert name in text, name


def test_admission_beyond_sequences_and_queue_waits_then_is_refused(tmp_path: Path) -> None:
    config = model_toml(max_sequences=2, max_queue=1, context_length=512)
    with run_appliance(tmp_path, config, "--no-auth") as small:
        client = openai.OpenAI(base_url=small.v1, api_key="x", max_retries=0, timeout=120)
        gate = threading.Barrier(4)

        def run(subject: str) -> str:
            gate.wait()
            try:
                return complete(client, ask(subject), 120)
            except openai.APIStatusError as exc:
                retry = "retry-after" in exc.response.headers
                return f"refused:{exc.status_code}:{exc.code}:{retry}"

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, SUBJECTS[:4]))
        refused = [r for r in results if r.startswith("refused:")]
        assert refused == ["refused:503:queue_full:True"]  # two decode, one waits, one refused
        assert all(r for r in results)
        assert small.metric("palisade_batch_sequences_bucket", model=MODEL, le="2.0") > 0


def test_kv_cache_too_small_for_the_context_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(model_toml(max_sequences=4, kv_cache_tokens=4096, context_length=2048))
    result = run_palisade("appliance", "serve", "--config", str(config), "--port", "0",
                          env={"PALISADE_HOME": str(tmp_path)})  # fmt: skip
    assert result.returncode == 1
    assert "gives each of its 4 sequences 1024 KV cells" in result.stderr
    assert "raise kv_cache_tokens" in result.stderr


def test_an_f16_cache_with_chunks_of_64_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(model_toml(cache_type_k="f16", cache_type_v="f16", prefill_chunk=64))
    result = run_palisade("appliance", "serve", "--config", str(config), "--port", "0",
                          env={"PALISADE_HOME": str(tmp_path)})  # fmt: skip
    assert result.returncode == 1
    assert "`models[0].prefill_chunk` = 64 is too large" in result.stderr
    assert "at most 63" in result.stderr


@pytest.mark.parametrize("temperature", [0.7])
def test_sampling_with_a_seed_is_reproducible_in_a_batch(
    client: openai.OpenAI, temperature: float
) -> None:
    def sampled(subject: str) -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=ask(subject), max_tokens=30, temperature=temperature,
            top_p=0.9, seed=1234,
        )  # fmt: skip
        return reply.choices[0].message.content or ""

    alone = sampled("fox")
    with ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(sampled, ["fox", "bear", "fox", "wolf"]))
    assert batched[0] == batched[2] == alone


def test_a_request_sharing_a_running_sequences_prompt_copies_its_stream(tmp_path: Path) -> None:
    with run_appliance(tmp_path, model_toml(max_sequences=4), "--no-auth") as fresh:
        client = openai.OpenAI(base_url=fresh.v1, api_key="x", max_retries=0, timeout=120)
        stream = client.chat.completions.create(
            model=MODEL, messages=ask("whale", SYSTEM), max_tokens=200, temperature=0,
            stream=True,
        )  # fmt: skip
        for chunk in stream:  # until the first sequence has read its prompt and generates
            if chunk.choices and chunk.choices[0].delta.content:
                break
        reused_before = fresh.metric("palisade_prefix_reused_tokens_total", model=MODEL)
        copied = complete(client, ask("penguin", SYSTEM))
        # No free slot held the system prompt: the new request copied the running stream.
        reused = fresh.metric("palisade_prefix_reused_tokens_total", model=MODEL)
        assert reused - reused_before >= 100
        stream.close()
        assert complete(client, ask("penguin", SYSTEM)) == copied  # the same text from a slot


# --- grammar-constrained sequences share the batch --------------------------------------

FABLE = {
    "type": "object",
    "properties": {
        "hero": {"type": "string", "maxLength": 12},
        "moral": {"type": "string", "maxLength": 30},
    },
    "required": ["hero", "moral"],
    "additionalProperties": False,
}


def _fable_request(subject: str, constrained: bool) -> tuple[list[dict[str, Any]], SamplingParams]:
    if not constrained:
        return [dict(message) for message in ask(subject)], SamplingParams(40, temperature=0.0)
    schema = {"name": "fable", "schema": FABLE, "strict": True}
    features = RequestFeatures(response_format={"type": "json_schema", "json_schema": schema})
    messages = [{"role": "user", "content": f"Write a fable about a {subject} as JSON."}]
    return messages, SamplingParams(60, temperature=0.0, features=features)


async def _texts(engine: LlamaCppEngine, *, together: bool) -> list[str]:
    requests = [_fable_request(subject, index % 2 == 1) for index, subject in enumerate(SUBJECTS)]

    async def one(messages: list[dict[str, Any]], params: SamplingParams) -> str:
        prompt = await engine.prepare_chat(messages, params.features)
        return await engine.submit(prompt, params).text()

    if together:
        return list(await asyncio.gather(*(one(*request) for request in requests)))
    return [await one(*request) for request in requests]


def test_sixteen_requests_half_with_grammars_each_produce_exactly_their_text_alone() -> None:
    path = default_model_path()
    config = LlamaCppModel(id=MODEL, path=str(path), context_length=256, max_sequences=16,
                           threads=1)  # fmt: skip
    steps: list[StepStats] = []
    context = EngineContext(path.parent, path, on_finish=lambda *_: None, on_step=steps.append)
    engine = LlamaCppEngine(config, context)
    engine.load()
    try:
        alone = asyncio.run(_texts(engine, together=False))
        before = len(steps)
        together = asyncio.run(_texts(engine, together=True))
    finally:
        engine.close()
    assert together == alone
    for text in alone[1::2]:  # the constrained half: JSON that validates
        jsonschema.validate(json.loads(text), FABLE)
    assert len(set(alone)) == len(SUBJECTS)
    assert max(step.sequences for step in steps[before:]) > 8  # decoded together
