"""Hostile inputs at the engine boundary: a 400 naming the offending value, never a dead
node, and never harm to another tenant's stream on the same node."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from appliance._private.engines.base import EngineContext, Generation, Prompt, SamplingParams
from appliance._private.engines.llamacpp.config import LlamaCppModel
from appliance._private.engines.llamacpp.engine import LlamaCppEngine
from appliance._private.engines.upstream.engine import _sampling as upstream_sampling
from tests.conftest import MODEL
from tests.e2e.fleet import UPSTREAM_MODEL, upstream_toml
from tests.standin import run_standin
from tests.support import Appliance, default_model_path, model_toml, run_appliance

VOCABULARY = 49_152  # SmolLM2's
COUNTING: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Count from 1 to 1000, separated by commas."}
]
LONG_TOKENS = 160
RUN_ON = {"ignore_eos": True}  # the long stream always runs to max_tokens


def error_of(response: httpx.Response, code: str, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert {"message", "type", "code", "param"} <= set(error)
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param), error
    message: str = error["message"]
    return message


def assert_alive(appliance: Appliance, pid: int) -> None:
    assert appliance.process.pid == pid
    assert appliance.process.poll() is None, appliance.log_text()[-3000:]
    assert httpx.get(f"{appliance.url}/healthz", timeout=10).status_code == 200


def long_stream(client: openai.OpenAI, started: threading.Event) -> tuple[str, float]:
    """A greedy stream that runs to max_tokens; its text and when it ended."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=COUNTING,
        max_tokens=LONG_TOKENS,
        temperature=0,
        stream=True,
        extra_body=RUN_ON,
    )
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            started.set()
    return text, time.monotonic()


def solo_text(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=COUNTING,
        max_tokens=LONG_TOKENS,
        temperature=0,
        extra_body=RUN_ON,
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == LONG_TOKENS
    return reply.choices[0].message.content or ""


@dataclass(frozen=True)
class Node:
    """The shared appliance, its process id when these tests began, and the text a long
    greedy stream has when it runs alone."""

    appliance: Appliance
    http: httpx.Client
    client: openai.OpenAI
    pid: int
    solo_text: str

    def assert_alive(self) -> None:
        assert_alive(self.appliance, self.pid)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    # One thread: the two cores here are shared with other test processes, and llama.cpp's
    # threads spin-wait for each other.
    home = tmp_path_factory.mktemp("hostile")
    with (
        run_appliance(home, model_toml(threads=1), "--no-auth") as appliance,
        httpx.Client(base_url=appliance.url, timeout=120) as http,
    ):
        client = openai.OpenAI(base_url=appliance.v1, api_key="x", max_retries=0, timeout=600)
        yield Node(appliance, http, client, appliance.process.pid, solo_text(client))


@pytest.fixture(scope="module")
def http(node: Node) -> httpx.Client:
    """This module's own appliance, not the session's (see `node`)."""
    return node.http


@pytest.fixture(scope="module")
def client(node: Node) -> openai.OpenAI:
    return node.client


@contextmanager
def while_another_tenant_streams(node: Node) -> Iterator[None]:
    """Run the body while a long stream flows on the same node; afterwards the stream has
    exactly its solo text, it was still flowing when the body ended, and the node lives."""
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(long_stream, node.client, started)
        assert started.wait(60), "the long stream never started"
        yield
        body_done = time.monotonic()
        text, stream_done = streaming.result(timeout=600)
    assert stream_done > body_done, "the stream ended before the hostile requests did"
    assert text == node.solo_text
    node.assert_alive()


OUT_OF_VOCABULARY_INPUTS: list[tuple[list[Any], str, int]] = [
    ([[999999]], "input[0][0]", 999999),
    ([[17, 200, VOCABULARY]], "input[0][2]", VOCABULARY),
    ([[5, -1]], "input[0][1]", -1),
    ([[300, 301], [302, 2**40]], "input[1][1]", 2**40),
    ([400, 401, 100_000], "input[2]", 100_000),
]
OUT_OF_VOCABULARY_PROMPTS: list[tuple[list[Any], str, int]] = [
    ([999999], "prompt[0]", 999999),
    ([-5], "prompt[0]", -5),
    ([1, 2, 3, VOCABULARY], "prompt[3]", VOCABULARY),
    ([[10, 20, 999999]], "prompt[0][2]", 999999),
]


def test_embedding_ids_outside_the_vocabulary_are_refused_by_name(node: Node) -> None:
    with while_another_tenant_streams(node):
        for tokens, param, value in OUT_OF_VOCABULARY_INPUTS:
            for _ in range(2):  # once used to abort the process
                response = node.http.post("/v1/embeddings", json={"model": MODEL, "input": tokens})
                message = error_of(response, "invalid_value", param)
                node.assert_alive()
            assert f"`{param}` is {value}, outside" in message
            if value >= 0:
                assert f"vocabulary of {VOCABULARY} tokens (ids 0 to {VOCABULARY - 1})" in message


def test_completion_ids_outside_the_vocabulary_are_refused_and_others_keep_generating(
    node: Node,
) -> None:
    with while_another_tenant_streams(node):
        for prompt, param, value in OUT_OF_VOCABULARY_PROMPTS:
            for stream in (False, True):
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": stream}
                response = node.http.post("/v1/completions", json=body)
                message = error_of(response, "invalid_value", param)
                assert f"`{param}` is {value}, outside" in message
                node.assert_alive()


@pytest.mark.parametrize("prompt", [[1, 2, 3, 4], [0], [2], [1, 9038, 2]])
def test_completions_decode_control_token_ids(client: openai.OpenAI, prompt: list[int]) -> None:
    # llama.cpp decodes any id in the vocabulary, BOS/EOS and the chat markers included.
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens >= 1 or reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("tokens", "param", "words"),
    [
        ([[1, 2, 3, 4]], "input[0][0]", "the control token '<|im_start|>'"),
        ([[0]], "input[0][0]", "the control token '<|endoftext|>'"),
        ([[9038, 2]], "input[0][1]", "the control token '<|im_end|>'"),
        ([[9038], [9038, 3299]], "input[1][1]", "is 3299, a token that has no text"),
    ],
)
def test_embedding_ids_without_text_are_refused(
    node: Node, tokens: list[Any], param: str, words: str
) -> None:
    response = node.http.post("/v1/embeddings", json={"model": MODEL, "input": tokens})
    assert words in error_of(response, "invalid_value", param)
    node.assert_alive()


def test_embedding_text_token_ids_still_work(client: openai.OpenAI) -> None:
    ids = client.embeddings.create(model=MODEL, input=[[9038, 1127, 30]])
    assert len(ids.data) == 1
    assert len(ids.data[0].embedding) > 100


@pytest.mark.parametrize(
    ("path", "field", "value", "param"),
    [
        ("/v1/embeddings", "input", "", "input"),
        ("/v1/embeddings", "input", [""], "input[0]"),
        ("/v1/embeddings", "input", ["a", ""], "input[1]"),
        ("/v1/embeddings", "input", [[]], "input[0]"),
        ("/v1/embeddings", "input", [[5], []], "input[1]"),
        ("/v1/embeddings", "input", [], "input"),
        ("/v1/completions", "prompt", "", "prompt"),
        ("/v1/completions", "prompt", [], "prompt"),
        ("/v1/completions", "prompt", [[]], "prompt[0]"),
        ("/v1/completions", "prompt", [""], "prompt[0]"),
    ],
)
def test_empty_inputs_are_refused_by_name(
    node: Node, path: str, field: str, value: object, param: str
) -> None:
    body = {"model": MODEL, field: value, "max_tokens": 2}
    if path == "/v1/embeddings":
        del body["max_tokens"]
    message = error_of(node.http.post(path, json=body), "invalid_value", param)
    assert f"`{param}` is" in message
    node.assert_alive()


# --- benchmark clients: vLLM's extensions -------------------------------------------------


def completion(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0, **fields}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def chat(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], **fields}
    response = http.post("/v1/chat/completions", json={"temperature": 0, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_ignore_eos_generates_to_max_tokens(http: httpx.Client) -> None:
    ended = chat(http, max_tokens=64)
    assert ended["choices"][0]["finish_reason"] == "stop"
    assert ended["usage"]["completion_tokens"] < 64
    kept_going = chat(http, max_tokens=64, ignore_eos=True)
    assert kept_going["choices"][0]["finish_reason"] == "length"
    assert kept_going["usage"]["completion_tokens"] == 64
    text = kept_going["choices"][0]["message"]["content"]
    assert text.startswith(ended["choices"][0]["message"]["content"])
    assert "<|im_end|>" not in text  # skipped, as special tokens are by default
    shown = chat(http, max_tokens=64, ignore_eos=True, skip_special_tokens=False)
    assert "<|im_end|>" in shown["choices"][0]["message"]["content"]


def test_min_tokens_keeps_the_end_away(http: httpx.Client) -> None:
    short = chat(http, max_tokens=64)["usage"]["completion_tokens"]
    longer = chat(http, max_tokens=64, min_tokens=short + 10)
    assert longer["usage"]["completion_tokens"] >= short + 10
    refused = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
              "min_tokens": 5},
    )  # fmt: skip
    assert "more than the 4 tokens" in error_of(refused, "invalid_value", "min_tokens")


def test_top_k_min_p_and_repetition_penalty_are_applied(http: httpx.Client) -> None:
    greedy = completion(http, max_tokens=24)["choices"][0]["text"]
    # Keeping only the most likely token makes sampling at temperature 1 greedy.
    assert (
        completion(http, max_tokens=24, temperature=1.0, top_k=1, seed=7)["choices"][0]["text"]
        == greedy
    )
    assert (
        completion(http, max_tokens=24, temperature=1.0, min_p=1.0, seed=7)["choices"][0]["text"]
        == greedy
    )
    counting = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,", "max_tokens": 24}
    plain = completion(http, **counting)["choices"][0]["text"]
    penalised = completion(http, **counting, repetition_penalty=1.8)["choices"][0]["text"]
    assert penalised != plain
    assert completion(http, **counting, repetition_penalty=1.0)["choices"][0]["text"] == plain


def test_include_stop_str_in_output(http: httpx.Client) -> None:
    prompt = {"prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 24}
    cut = completion(http, **prompt, stop=[" 10"])["choices"][0]
    kept = completion(http, **prompt, stop=[" 10"], include_stop_str_in_output=True)["choices"][0]
    assert cut["finish_reason"] == kept["finish_reason"] == "stop"
    assert kept["text"] == cut["text"] + " 10"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_put_usage_in_every_chunk(http: httpx.Client, path: str) -> None:
    # What guidellm and vLLM's benchmark_serving send.
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 20,
        "temperature": 0.0,
        "repetition_penalty": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if path == "/v1/completions":
        body["prompt"] = "Once upon a time"
    else:
        body["messages"] = [{"role": "user", "content": "Say hi."}]
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [httpx.Response(200, content=event).json() for event in events[:-1]]
    usages = [chunk["usage"] for chunk in chunks]
    assert all(usage is not None for usage in usages)
    completion_counts = [usage["completion_tokens"] for usage in usages]
    assert completion_counts == sorted(completion_counts)
    assert completion_counts[-1] == 20
    assert len(set(completion_counts)) > 5  # it grew as the text came
    assert {usage["prompt_tokens"] for usage in usages} == {usages[-1]["prompt_tokens"]}
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)


def test_spaces_between_special_tokens_is_accepted(http: httpx.Client) -> None:
    plain = completion(http, max_tokens=8)["choices"][0]["text"]
    assert (
        completion(http, max_tokens=8, spaces_between_special_tokens=False)["choices"][0]["text"]
        == plain
    )


# --- a decode that llama.cpp refuses ends only its own sequence ---------------------------

SUBJECTS = ["cat", "dog", "robot", "ship"]


def _messages(subject: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me a short story about a {subject}."}]


async def _run_with_one_poisoned(
    engine: LlamaCppEngine, culprit: list[Prompt]
) -> tuple[dict[str, str], dict[str, str], dict[str, Generation]]:
    """Each subject's text alone, then all four at once with the dog's decodes poisoned."""
    params = SamplingParams(max_tokens=48, temperature=0.0)
    alone = {}
    for subject in SUBJECTS:
        prompt = await engine.prepare_chat(_messages(subject))
        alone[subject] = await engine.submit(prompt, params).text()
    prompts = {subject: await engine.prepare_chat(_messages(subject)) for subject in SUBJECTS}
    culprit.append(prompts["dog"])
    together = {subject: engine.submit(prompt, params) for subject, prompt in prompts.items()}
    texts = await asyncio.gather(*(generation.text() for generation in together.values()))
    return alone, dict(zip(SUBJECTS, texts, strict=True)), together


@pytest.mark.parametrize("when", ["reading its prompt", "generating"])
def test_a_failed_decode_ends_only_the_sequence_it_belongs_to(
    caplog: pytest.LogCaptureFixture, when: str
) -> None:
    culprit: list[Prompt] = []

    def poison(generation: Generation) -> bool:
        if not culprit or generation.prompt is not culprit[0]:
            return False
        return when == "reading its prompt" or generation.first_token_at is not None

    path = default_model_path()
    config = LlamaCppModel(id=MODEL, path=str(path), context_length=512, max_sequences=4, threads=1)
    context = EngineContext(home=path.parent, path=path, on_finish=lambda _, __: None)
    engine = LlamaCppEngine(config, context, poison=poison)
    engine.load()
    caplog.set_level(logging.WARNING, logger="palisade.appliance.batching")
    try:
        alone, together, generations = asyncio.run(_run_with_one_poisoned(engine, culprit))
    finally:
        engine.close()
    failed = generations.pop("dog").finish
    assert failed is not None
    assert failed.reason == "error"
    assert failed.failure is not None
    assert "llama_decode returned -1" in failed.failure.message
    assert failed.failure.code == "engine_error"
    assert alone["dog"].startswith(together["dog"])
    assert (together["dog"] != "") == (when == "generating")
    for subject, generation in generations.items():
        assert generation.finish is not None
        assert generation.finish.reason in ("stop", "length")
        assert together[subject] == alone[subject], subject
    shared = [
        int(found[1])
        for record in caplog.records
        if (found := re.search(r"for a step of (\d+) sequences", record.getMessage()))
    ]
    assert max(shared, default=0) >= 2, "the culprit never failed inside a shared step"


# --- the upstream engine: the same classes of input are 400s ------------------------------


def test_an_upstream_engine_refuses_empty_inputs_and_negative_ids(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = tmp_path_factory.mktemp("upstream-hostile")
    with (
        run_standin() as standin,
        run_appliance(home, upstream_toml(standin, "gpu"), "--no-auth") as appliance,
    ):
        pid = appliance.process.pid
        url = appliance.v1
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("/embeddings", {"input": ""}, "input"),
            ("/embeddings", {"input": ["x", ""]}, "input[1]"),
            ("/embeddings", {"input": [[]]}, "input[0]"),
            ("/completions", {"prompt": ""}, "prompt"),
            ("/completions", {"prompt": [[]]}, "prompt[0]"),
            ("/completions", {"prompt": [7, -5]}, "prompt[1]"),
        ]
        for path, fields, param in cases:
            body = {"model": UPSTREAM_MODEL, **fields}
            error_of(httpx.post(f"{url}{path}", json=body, timeout=30), "invalid_value", param)
        refused = httpx.post(
            f"{url}/embeddings", json={"model": UPSTREAM_MODEL, "input": [[5]]}, timeout=30
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "unsupported_parameter"
        assert_alive(appliance, pid)


def test_an_upstream_engine_forwards_only_the_extensions_asked_for() -> None:
    plain = upstream_sampling(SamplingParams(max_tokens=8, temperature=0.0))
    assert set(plain) == {"temperature", "top_p", "max_tokens"}
    asked = SamplingParams(
        max_tokens=8, ignore_eos=True, top_k=5, repetition_penalty=1.1, skip_special_tokens=False
    )
    forwarded = upstream_sampling(asked)
    assert forwarded["ignore_eos"] is True
    assert forwarded["top_k"] == 5
    assert forwarded["repetition_penalty"] == 1.1
    assert forwarded["skip_special_tokens"] is False
    assert "min_p" not in forwarded
    assert "min_tokens" not in forwarded
