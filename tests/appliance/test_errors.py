"""Bad input gets an OpenAI-shaped error with a stable code: never a 500, never a traceback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MODEL
from tests.support import Appliance, model_toml, run_appliance, wait_for

HELLO = [{"role": "user", "content": "hi"}]
# Greedy decoding of this prompt runs to max_tokens (checked: 1500 tokens without an end).
COUNTING = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert (
        {"message", "type", "code", "param"}
        <= set(error)
        <= {
            "message",
            "type",
            "code",
            "param",
            "retry_after",
        }
    )
    assert error["code"] == code
    assert "Traceback" not in error["message"]
    return dict(error)


def test_malformed_json_is_invalid_json(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    error = error_of(response, 400, "invalid_json")
    assert "not valid JSON" in str(error["message"])


@pytest.mark.parametrize(
    ("body", "code", "param", "words"),
    [
        (
            {"model": MODEL, "messages": HELLO, "max_tokens": "ten"},
            "invalid_value",
            "max_tokens",
            "Expected `int | null`",
        ),
        (
            {"model": MODEL, "messages": HELLO, "temperature": 3},
            "invalid_value",
            "temperature",
            "<= 2.0",
        ),
        (
            {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            "invalid_value",
            "messages[0].role",
            "Invalid enum value 'wizard'",
        ),
        (
            {"model": MODEL},
            "missing_required_parameter",
            "messages",
            "Missing required parameter `messages`",
        ),
        (
            {"model": MODEL, "messages": HELLO, "temprature": 1},
            "unknown_parameter",
            "temprature",
            "Unrecognized request parameter `temprature`",
        ),
        ({"model": MODEL, "messages": []}, "invalid_value", "messages", "length >= 1"),
    ],
)
def test_schema_violations_name_the_field(
    http: httpx.Client, body: dict[str, object], code: str, param: str, words: str
) -> None:
    error = error_of(http.post("/v1/chat/completions", json=body), 400, code)
    assert error["param"] == param
    assert words in str(error["message"])


# What llama.cpp serves (n, tools, logprobs, logit_bias, response_format, echo, several
# prompts) is refused by a model without it: tests/appliance/test_openai_features.py and
# the conformance suite's scripted-bare case check those.
@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages[0].content[0]",
        ),
        ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix"),
        ("/v1/completions", {"prompt": "a", "best_of": 2}, "best_of"),
        ("/v1/embeddings", {"input": "a", "dimensions": 8}, "dimensions"),
    ],
)
def test_unsupported_parameters_are_named(
    http: httpx.Client, path: str, extra: dict[str, object], param: str
) -> None:
    body: dict[str, object] = {"model": MODEL}
    if path == "/v1/chat/completions":
        body["messages"] = HELLO
    body.update(extra)
    error = error_of(http.post(path, json=body), 400, "unsupported_parameter")
    assert error["param"] == param
    assert f"Unsupported parameter `{param}`" in str(error["message"])


def test_unknown_model_is_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    assert "`gpt-17` does not exist" in caught.value.message
    assert MODEL in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_prompt_plus_max_tokens_over_context(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4000)  # type: ignore[arg-type]
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in caught.value.message
    assert "Lower max_tokens" in caught.value.message


def test_prompt_alone_over_context(client: openai.OpenAI) -> None:
    long_prompt = "word " * 3000
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as embedding:
        client.embeddings.create(model=MODEL, input=long_prompt)
    assert embedding.value.code == "context_length_exceeded"


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 1)}]}
    error = error_of(http.post("/v1/chat/completions", json=big), 413, "request_too_large")
    assert "1048576 bytes" in str(error["message"])


def test_unknown_route_and_method(http: httpx.Client) -> None:
    error_of(http.get("/v1/nothing-here"), 404, "not_found")
    error_of(http.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_stream_options_without_stream(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": HELLO, "stream_options": {"include_usage": True}}
    error = error_of(http.post("/v1/chat/completions", json=body), 400, "invalid_value")
    assert error["param"] == "stream_options"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
    payload=json_values
    | st.fixed_dictionaries(
        {"model": st.just(MODEL)},
        optional={
            "messages": json_values,
            "prompt": json_values,
            "input": json_values,
            "max_tokens": json_values,
            "stop": json_values,
        },
    ),
    garbage=st.binary(max_size=64),
    as_json=st.booleans(),
)
def test_arbitrary_bodies_never_cause_a_server_error(
    http: httpx.Client, path: str, payload: object, garbage: bytes, as_json: bool
) -> None:
    content = json.dumps(payload).encode() if as_json else garbage
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert {"message", "type", "code", "param"} <= set(response.json()["error"])


# --- queue and cancellation: an appliance of their own with a one-place queue -------------


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    home: Path = tmp_path_factory.mktemp("tight")
    config = "max_body_bytes = 4096\n" + model_toml(max_queue=1, max_sequences=1)
    with run_appliance(home, config, "--no-auth") as running:
        yield running


def _long_stream(appliance: Appliance, started: threading.Event, stop: threading.Event) -> None:
    body = {
        "model": MODEL,
        "messages": COUNTING,
        "max_tokens": 1500,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{appliance.v1}/chat/completions", json=body, timeout=120) as r:
        for _ in r.iter_lines():
            started.set()
            if stop.is_set():
                return


def test_full_queue_is_503_with_retry_after(tight: Appliance) -> None:
    stop = threading.Event()
    first, second = threading.Event(), threading.Event()
    workers = [
        threading.Thread(target=_long_stream, args=(tight, first, stop)),
        threading.Thread(target=_long_stream, args=(tight, second, stop)),
    ]
    workers[0].start()
    wait_for(lambda: tight.metric("palisade_running_generations", model=MODEL) == 1)
    workers[1].start()
    wait_for(lambda: tight.metric("palisade_queue_depth", model=MODEL) == 1)
    try:
        response = httpx.post(
            f"{tight.v1}/chat/completions", json={"model": MODEL, "messages": HELLO}, timeout=30
        )
        error = error_of(response, 503, "queue_full")
        assert int(response.headers["retry-after"]) >= 1
        assert "queue" in str(error["message"])
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    # Both streams were cancelled by their clients: the engine is idle again.
    wait_for(lambda: tight.metric("palisade_running_generations", model=MODEL) == 0)
    wait_for(lambda: tight.metric("palisade_queue_depth", model=MODEL) == 0)


def test_disconnect_mid_stream_stops_generation(tight: Appliance) -> None:
    cancelled = tight.metric("palisade_generations_total", model=MODEL, reason="cancelled")
    tokens_before = tight.metric("palisade_completion_tokens_total", model=MODEL)
    body = {"model": MODEL, "messages": COUNTING, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{tight.v1}/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert len(received) == 6
    wait_for(
        lambda: (
            tight.metric("palisade_generations_total", model=MODEL, reason="cancelled")
            == cancelled + 1
        )
    )
    produced = tight.metric("palisade_completion_tokens_total", model=MODEL) - tokens_before
    assert 0 < produced < 100  # stopped long before max_tokens=1500
    assert tight.metric("palisade_running_generations", model=MODEL) == 0


def test_cancelled_waiting_request_frees_its_place(tight: Appliance) -> None:
    stop = threading.Event()
    running = threading.Event()
    holder = threading.Thread(target=_long_stream, args=(tight, running, stop))
    holder.start()
    try:
        wait_for(lambda: tight.metric("palisade_running_generations", model=MODEL) == 1)
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 5}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{tight.v1}/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5)
            )
        # The waiting request's client gave up; its place is free again.
        wait_for(lambda: tight.metric("palisade_queue_depth", model=MODEL) == 0)
    finally:
        stop.set()
        holder.join(timeout=60)


def test_configured_body_limit(tight: Appliance) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "y" * 5000}]}
    error = error_of(
        httpx.post(f"{tight.v1}/chat/completions", json=body), 413, "request_too_large"
    )
    assert "4096 bytes" in str(error["message"])
