"""The OpenAI API of a real appliance process, driven by the official `openai` SDK."""

from __future__ import annotations

import array
import base64
import math
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import MODEL
from tests.support import Appliance

HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Name three colours of the rainbow."}
]


def chat_text(
    client: openai.OpenAI, messages: list[ChatCompletionMessageParam] = HELLO, **kwargs: Any
) -> tuple[str, str | None]:
    response = client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
    return response.choices[0].message.content or "", response.choices[0].finish_reason


def test_chat_completion_returns_text_usage_and_receipts(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=12,
        temperature=0,
    )
    response = raw.parse()
    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    assert response.usage is not None
    assert response.usage.prompt_tokens > 5
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12
    assert raw.headers["x-palisade-region"] == "eu-west"
    assert raw.headers["x-palisade-node"] == "edge-test-1"
    assert raw.headers["x-palisade-device"] == "cpu"


def test_greedy_output_is_identical_on_repeat(client: openai.OpenAI) -> None:
    runs = {chat_text(client, max_tokens=24, temperature=0)[0] for _ in range(3)}
    assert len(runs) == 1
    assert runs.pop().strip()


def test_streaming_matches_non_streaming_and_ends_with_usage(client: openai.OpenAI) -> None:
    expected, _ = chat_text(client, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20


def test_streaming_without_include_usage_sends_no_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=4,
        stream=True,
    )
    chunks = list(stream)
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)


def test_raw_stream_ends_with_done(appliance: Appliance) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{appliance.v1}/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_max_tokens_and_max_completion_tokens_end_with_length(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_completion_tokens=7,
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 7


def test_natural_end_of_generation_is_stop(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Reply with the single word: yes"}
    ]
    text, reason = chat_text(client, messages=messages, max_tokens=200, temperature=0)
    assert reason == "stop"
    assert "<|im_end|>" not in text


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_sequence_truncates_and_finishes_with_stop(
    client: openai.OpenAI, as_list: bool
) -> None:
    full, _ = chat_text(client, max_tokens=40, temperature=0)
    words = full.split()
    assert len(words) > 4, full
    marker = words[3]
    stop: str | list[str] = [marker, "zzzz-never"] if as_list else marker
    text, reason = chat_text(client, max_tokens=40, temperature=0, stop=stop)
    assert reason == "stop"
    assert text == full[: full.index(marker)]
    assert marker not in text


def test_stop_sequence_is_held_back_while_streaming(client: openai.OpenAI) -> None:
    full, _ = chat_text(client, max_tokens=40, temperature=0)
    marker = " ".join(full.split()[2:4])
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=40,
        temperature=0,
        stop=marker,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full[: full.index(marker)]


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    first = chat_text(client, max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)[0]
    second = chat_text(client, max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)[0]
    assert first == second


def test_penalties_are_accepted_and_change_greedy_output(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Repeat the word 'cat' twenty times."}
    ]
    plain, _ = chat_text(client, messages=messages, max_tokens=30, temperature=0)
    penalised, _ = chat_text(
        client,
        messages=messages,
        max_tokens=30,
        temperature=0,
        presence_penalty=2.0,
        frequency_penalty=2.0,
    )
    assert penalised != plain


def test_system_developer_and_content_parts_are_templated(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
    ]
    text, _ = chat_text(client, messages=messages, max_tokens=8, temperature=0)
    assert text


def test_completions_text_and_stream(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert response.object == "text_completion"
    assert response.choices[0].text
    assert response.choices[0].finish_reason in ("length", "stop")
    assert response.usage is not None
    assert response.usage.completion_tokens <= 8
    stream = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == response.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_completions_accept_token_ids(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt=[504, 3575, 282], max_tokens=3)
    assert response.usage is not None
    assert response.usage.prompt_tokens == 3


def test_embeddings_float_and_base64_agree(client: openai.OpenAI) -> None:
    inputs = ["The quick brown fox.", "Sovereign inference at the edge."]
    floats = client.embeddings.create(model=MODEL, input=inputs, encoding_format="float")
    assert [item.index for item in floats.data] == [0, 1]
    vector = floats.data[0].embedding
    assert len(vector) == 576
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-3)
    assert floats.usage.prompt_tokens > 6
    assert floats.data[0].embedding != floats.data[1].embedding

    raw = client.embeddings.with_raw_response.create(
        model=MODEL, input=inputs[0], encoding_format="base64"
    )
    encoded = raw.http_response.json()["data"][0]["embedding"]
    decoded = array.array("f", base64.b64decode(encoded)).tolist()
    assert decoded == pytest.approx(vector, abs=1e-6)


def test_models_list_carries_pricing_performance_and_placement(client: openai.OpenAI) -> None:
    chat_text(client, max_tokens=4)
    models = client.models.list()
    assert [model.id for model in models.data] == [MODEL]
    card = models.data[0].model_dump()
    assert card["object"] == "model"
    assert card["pricing"] == {
        "input_per_million": 0.5,
        "output_per_million": 1.5,
        "currency": "USD",
        "per_request": 0.0,
        "cached_input_per_million": None,  # unset: cached prompt tokens cost the input price
    }
    assert card["region"] == "eu-west"
    assert card["device_class"] == "cpu"
    assert card["context_length"] == 2048
    assert (card["engine"], card["accelerator"], card["version"]) == (
        "llamacpp",
        "cpu",
        card["sha256"][:12],
    )
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
    assert card["performance"]["ttft_p50_ms"] > 0
    assert card["performance"]["tpot_p50_ms"] > 0
    assert client.models.retrieve(MODEL).id == MODEL


def test_ops_endpoints(appliance: Appliance) -> None:
    assert httpx.get(f"{appliance.url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{appliance.url}/readyz").json() == {"status": "ready", "models": [MODEL]}
    metrics = httpx.get(f"{appliance.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'palisade_model_ready{model="smollm2-135m-instruct"} 1.0' in metrics.text
    assert (
        appliance.metric("palisade_requests_total", endpoint="/v1/chat/completions", status="200")
        > 0
    )
