"""The `openai` engine: an appliance fronting an OpenAI-compatible upstream (RDU or GPU).

The upstream is the stand-in (tests/standin.py), a real HTTP server on an ephemeral port;
the appliance is a real `palisade appliance serve` process; the client is the openai SDK.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from appliance import load_appliance_config
from federation import ConfigError
from tests.federation.tenants import admin_of
from tests.standin import RunningStandin, run_standin
from tests.support import Appliance, run_appliance, run_palisade, wait_for

MODEL = "rdu-llama"
UPSTREAM_MODEL = "standin-model"
KEY = f"sk-upstream-{secrets.token_hex(16)}"
THREE_WORDS: list[ChatCompletionMessageParam] = [{"role": "user", "content": "three little words"}]
EIGHT = "".join(f" tok{index}" for index in range(8))
DEFAULTS: dict[str, object] = {
    "ttft_ms": 0,
    "token_ms": 0,
    "tokens": 8,
    "fail_status": None,
    "fail_code": None,
    "fail_after_tokens": None,
    "api_key": KEY,
    "omit_usage": False,
}


def upstream_toml(url: str, **extra: object) -> str:
    fields: dict[str, object] = {
        "id": MODEL,
        "engine": "openai",
        "upstream_url": url,
        "upstream_model": UPSTREAM_MODEL,
        "device_class": "rdu",
        "upstream_key_env": "STANDIN_KEY",
    }
    fields.update(extra)
    lines = [f"{key} = {json.dumps(value)}" for key, value in fields.items() if value is not None]
    return 'node_id = "edge-rdu-1"\nregion = "eu-west"\n\n[[models]]\n' + "\n".join(lines) + "\n"


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert KEY not in response.text
    return error


@pytest.fixture(scope="module")
def standin() -> Iterator[RunningStandin]:
    with run_standin(api_key=KEY) as running:
        yield running


@pytest.fixture
def upstream(standin: RunningStandin) -> Iterator[RunningStandin]:
    """The shared stand-in, put back to its defaults after the test changes it."""
    yield standin
    standin.control(**DEFAULTS)


@pytest.fixture(scope="module")
def appliance(
    standin: RunningStandin, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Appliance]:
    home = tmp_path_factory.mktemp("upstream-home")
    config = upstream_toml(standin.v1)
    with run_appliance(home, config, "--no-auth", env={"STANDIN_KEY": KEY}) as running:
        yield running


@pytest.fixture(scope="module")
def client(appliance: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=appliance.v1, api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(appliance: Appliance) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=appliance.url, timeout=30) as session:
        yield session


def sse_events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


# --- the OpenAI API through the upstream ---------------------------------------------------


def test_chat_returns_upstream_text_usage_and_rdu_receipt(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=THREE_WORDS)
    response = raw.parse()
    assert response.model == MODEL
    assert response.choices[0].message.content == EIGHT
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (3, 8)
    assert response.usage.total_tokens == 11
    assert raw.headers["x-palisade-device"] == "rdu"
    assert raw.headers["x-palisade-region"] == "eu-west"
    assert raw.headers["x-palisade-node"] == "edge-rdu-1"


def test_max_tokens_caps_the_upstream(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=THREE_WORDS, max_tokens=3)
    assert response.choices[0].message.content == " tok0 tok1 tok2"
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 3


def test_chat_stream_carries_upstream_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=THREE_WORDS, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == EIGHT
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [reason for reason in reasons if reason] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 8)


def test_chat_stream_is_sse_ending_in_done(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": THREE_WORDS, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-palisade-device"] == "rdu"
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == EIGHT
    assert all("usage" not in chunk or chunk["usage"] is None for chunk in chunks)


def test_completions_plain_and_streaming(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=4)
    assert response.choices[0].text == " tok0 tok1 tok2 tok3"
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, 4)
    stream = client.completions.create(
        model=MODEL, prompt="hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == EIGHT
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8


def test_completion_token_ids_pass_through(client: openai.OpenAI, upstream: RunningStandin) -> None:
    response = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2)
    assert response.choices[0].text == " tok0 tok1"
    assert upstream.stats()["last_body"]["prompt"] == [5, 6, 7]


def test_embeddings_are_the_upstreams(client: openai.OpenAI, upstream: RunningStandin) -> None:
    response = client.embeddings.create(model=MODEL, input=["a b", "c"])
    direct = httpx.post(
        f"{upstream.v1}/embeddings",
        json={"model": UPSTREAM_MODEL, "input": ["a b", "c"]},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    for got, want in zip(response.data, direct["data"], strict=True):
        assert got.embedding == pytest.approx(want["embedding"], rel=1e-6)  # float32 on the wire
    assert len(response.data[0].embedding) == 8
    assert response.usage.prompt_tokens == 3
    assert upstream.stats()["last_body"]["model"] == UPSTREAM_MODEL


def test_embedding_token_ids_are_refused_clearly(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"model": MODEL, "input": [1, 2, 3]})
    error = error_of(response, 400, "unsupported_parameter")
    assert error["param"] == "input"
    assert "send the text instead" in error["message"]


def test_models_list_declares_the_rdu(client: openai.OpenAI) -> None:
    card = client.models.retrieve(MODEL)
    assert card.model_extra is not None
    assert card.model_extra["device_class"] == "rdu"


def test_sampling_params_are_forwarded(client: openai.OpenAI, upstream: RunningStandin) -> None:
    client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": "hello"},
        ],
        max_tokens=5,
        temperature=0.3,
        top_p=0.9,
        seed=7,
        stop=["END", "STOP"],
        presence_penalty=0.5,
        frequency_penalty=0.25,
    )
    body = upstream.stats()["last_body"]
    assert body["model"] == UPSTREAM_MODEL
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (
        5,
        0.3,
        0.9,
        7,
    )
    assert body["stop"] == ["END", "STOP"]
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, 0.25)
    assert "stream" not in body  # a whole answer is asked for whole


def test_a_stream_is_asked_of_the_upstream_with_usage(
    client: openai.OpenAI, upstream: RunningStandin
) -> None:
    list(client.chat.completions.create(model=MODEL, messages=THREE_WORDS, stream=True))
    body = upstream.stats()["last_body"]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_max_tokens_is_forwarded_only_when_given(
    client: openai.OpenAI, upstream: RunningStandin
) -> None:
    client.chat.completions.create(model=MODEL, messages=THREE_WORDS)
    assert "max_tokens" not in upstream.stats()["last_body"]
    client.completions.create(model=MODEL, prompt="hi")
    assert "max_tokens" not in upstream.stats()["last_body"]


# --- errors: a proper HTTP status before any text, an error frame after --------------------


def test_upstream_400_passes_through_with_its_code(
    client: openai.OpenAI, upstream: RunningStandin
) -> None:
    upstream.control(fail_status=400, fail_code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=THREE_WORDS)
    assert caught.value.code == "context_length_exceeded"
    assert "The upstream engine rejected the request (HTTP 400)" in caught.value.message
    with pytest.raises(openai.BadRequestError) as streamed:
        client.chat.completions.create(model=MODEL, messages=THREE_WORDS, stream=True)
    assert streamed.value.code == "context_length_exceeded"


def test_upstream_500_is_502_upstream_error(http: httpx.Client, upstream: RunningStandin) -> None:
    upstream.control(fail_status=500, fail_code="rdu_fault")
    for stream in (False, True):
        body = {"model": MODEL, "messages": THREE_WORDS, "stream": stream}
        error = error_of(http.post("/v1/chat/completions", json=body), 502, "upstream_error")
        assert "The upstream engine failed (HTTP 500" in error["message"]
        assert "retry on another node" in error["message"]
    response = http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert (
        "The upstream engine failed (HTTP 500"
        in error_of(response, 502, "upstream_error")["message"]
    )


def test_upstream_refusing_the_key_is_502_without_the_key(
    http: httpx.Client, upstream: RunningStandin
) -> None:
    upstream.control(api_key="sk-some-other-key")
    body = {"model": MODEL, "messages": THREE_WORDS}
    error = error_of(http.post("/v1/chat/completions", json=body), 502, "upstream_error")
    assert "refused this appliance's credentials (HTTP 401)" in error["message"]


def test_failure_after_text_ends_the_stream_with_an_error_frame(
    http: httpx.Client, upstream: RunningStandin
) -> None:
    upstream.control(fail_after_tokens=2)
    body = {"model": MODEL, "messages": THREE_WORDS, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [json.loads(event) for event in sse_events(response)]
    text = "".join(
        event["choices"][0]["delta"].get("content") or "" for event in events if "choices" in event
    )
    assert text == " tok0 tok1"
    assert events[-1]["error"]["code"] == "upstream_error"
    assert "failed while generating" in events[-1]["error"]["message"]


def test_client_disconnect_cancels_the_upstream_stream(
    http: httpx.Client, appliance: Appliance, upstream: RunningStandin
) -> None:
    upstream.control(tokens=1000, token_ms=20)
    before = upstream.stats()["streams_cancelled"]
    cancelled = appliance.metric("palisade_generations_total", model=MODEL, reason="cancelled")
    body = {"model": MODEL, "messages": THREE_WORDS, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content":" tok' in line:
                break
    wait_for(lambda: upstream.stats()["streams_cancelled"] > before, timeout=10)
    wait_for(
        lambda: (
            appliance.metric("palisade_generations_total", model=MODEL, reason="cancelled")
            > cancelled
        ),
        timeout=10,
    )
    assert upstream.stats()["in_flight"] == 0


def test_client_timeout_cancels_a_non_streaming_request(
    appliance: Appliance, upstream: RunningStandin
) -> None:
    upstream.control(ttft_ms=30_000)
    before = upstream.stats()["answers_cancelled"]
    body = {"model": MODEL, "messages": THREE_WORDS}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{appliance.v1}/chat/completions", json=body, timeout=0.5)
    wait_for(lambda: upstream.stats()["answers_cancelled"] > before, timeout=10)


TTFT = "palisade_time_to_first_token_seconds_count"


def test_a_whole_answer_is_asked_of_the_upstream_whole(
    client: openai.OpenAI, appliance: Appliance, upstream: RunningStandin
) -> None:
    streams, ttft = upstream.stats()["streams_started"], appliance.metric(TTFT, model=MODEL)
    response = client.chat.completions.create(model=MODEL, messages=THREE_WORDS)
    assert response.choices[0].message.content == EIGHT
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (3, 8)
    stats = upstream.stats()
    assert "stream" not in stats["last_body"]
    assert "stream_options" not in stats["last_body"]
    assert stats["streams_started"] == streams
    # It arrived all at once: its first token came with the whole answer, and is observed
    # (the router's latency-aware choice reads it), as a stream's is.
    assert appliance.metric(TTFT, model=MODEL) == ttft + 1
    list(client.chat.completions.create(model=MODEL, messages=THREE_WORDS, stream=True))
    assert upstream.stats()["streams_started"] == streams + 1
    assert appliance.metric(TTFT, model=MODEL) == ttft + 2


def test_an_upstream_without_usage_in_whole_answers_is_streamed_from_then_on(
    standin: RunningStandin, tmp_path: Path
) -> None:
    standin.control(omit_usage=True)
    try:
        config = upstream_toml(standin.v1)
        with run_appliance(tmp_path, config, "--no-auth", env={"STANDIN_KEY": KEY}) as appliance:
            sdk = openai.OpenAI(base_url=appliance.v1, api_key="unused", max_retries=0)
            streams = standin.stats()["streams_started"]
            first = sdk.chat.completions.create(model=MODEL, messages=THREE_WORDS)
            # Billed an upper bound: the answer's UTF-8 bytes, as prompts are bounded.
            assert first.choices[0].message.content == EIGHT
            assert first.usage is not None
            assert first.usage.completion_tokens == len(EIGHT.encode())
            assert standin.stats()["streams_started"] == streams
            second = sdk.chat.completions.create(model=MODEL, messages=THREE_WORDS)
            assert second.choices[0].message.content == EIGHT
            assert second.usage is not None
            assert second.usage.completion_tokens == 8  # one per streamed chunk
            assert standin.stats()["streams_started"] == streams + 1
            assert "reports no usage in whole answers" in appliance.log_text()
    finally:
        standin.control(**DEFAULTS)


def test_the_upstream_key_never_leaves_the_upstream_request(
    appliance: Appliance, http: httpx.Client, upstream: RunningStandin
) -> None:
    # The stand-in demands the key, so every success above proves it was sent upstream ...
    assert httpx.get(f"{upstream.v1}/models").status_code == 401
    assert upstream.stats()["requests"]["/v1/chat/completions"] > 5
    # ... and it appears nowhere the appliance writes: output, metrics, files, answers.
    assert KEY not in appliance.log_text()
    assert KEY not in http.get("/metrics").text
    assert KEY not in http.get("/v1/models").text
    files = [path for path in appliance.home.rglob("*") if path.is_file()]
    assert files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


# --- separate appliances: keys on, upstream down, queue full, config errors ---------------


def test_with_keys_usage_is_the_upstreams_and_no_file_holds_the_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with (
        run_standin(api_key=KEY) as standin,
        run_appliance(home, upstream_toml(standin.v1), env={"STANDIN_KEY": KEY}) as appliance,
    ):
        admin = admin_of(appliance)
        admin.create_org("acme", ["eu-west"])
        member = admin.member("acme", "org_user", "ada@acme.example")
        client = openai.OpenAI(base_url=appliance.v1, api_key=member.key, max_retries=0)
        client.chat.completions.create(model=MODEL, messages=THREE_WORDS)
        list(client.chat.completions.create(model=MODEL, messages=THREE_WORDS, stream=True))
        standin.control(fail_status=400, fail_code="context_length_exceeded")
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=THREE_WORDS)
        usage = admin.ok("GET", "/admin/v1/usage", group_by="model")["total"]
        assert (usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (3, 6, 16)
    assert KEY not in appliance.log_text()  # including its shutdown
    assert {"audit.db", "policy.db", "content.db"} <= {path.name for path in home.iterdir()}
    for path in home.rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path


def test_upstream_down_is_503_upstream_unavailable(tmp_path: Path) -> None:
    """A refused connection never reached the upstream: 503, so a router may try elsewhere."""
    with run_standin() as down:
        config = upstream_toml(down.v1, upstream_key_env=None)
        with run_appliance(tmp_path / "home", config, "--no-auth") as appliance:
            down.stop()
            for stream in (False, True):
                body = {"model": MODEL, "messages": THREE_WORDS, "stream": stream}
                response = httpx.post(f"{appliance.v1}/chat/completions", json=body, timeout=30)
                error = error_of(response, 503, "upstream_unavailable")
                assert "The upstream engine is unreachable" in error["message"]
                assert response.headers["Retry-After"] == "1"
            assert f"upstream {down.v1}/chat/completions" in appliance.log_text()


def test_queue_full_beyond_max_concurrency_and_max_queue(tmp_path: Path) -> None:
    with run_standin(ttft_ms=2000, api_key=KEY) as slow:
        config = upstream_toml(slow.v1, max_concurrency=1, max_queue=1)
        env = {"STANDIN_KEY": KEY}
        with run_appliance(tmp_path / "home", config, "--no-auth", env=env) as appliance:
            client = openai.OpenAI(
                base_url=appliance.v1, api_key="unused", max_retries=0, timeout=60
            )
            answers: list[str] = []

            def ask() -> None:
                response = client.chat.completions.create(model=MODEL, messages=THREE_WORDS)
                answers.append(response.choices[0].message.content or "")

            threads = [threading.Thread(target=ask) for _ in range(2)]
            for thread in threads:
                thread.start()
            wait_for(
                lambda: (
                    appliance.metric("palisade_running_generations", model=MODEL) == 1
                    and appliance.metric("palisade_queue_depth", model=MODEL) == 1
                ),
                timeout=10,
            )
            assert slow.stats()["in_flight"] == 1
            body = {"model": MODEL, "messages": THREE_WORDS}
            response = httpx.post(f"{appliance.v1}/chat/completions", json=body, timeout=30)
            error = error_of(response, 503, "queue_full")
            assert int(response.headers["retry-after"]) >= 1
            assert "1 in flight to the upstream, 1 waiting" in error["message"]
            for thread in threads:
                thread.join(timeout=30)
            assert answers == [EIGHT, EIGHT]


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            'id = "m"\nengine = "openai"\n',
            '`models[0].upstream_url` is required when engine = "openai"',
        ),
        (
            'id = "m"\npath = "m.gguf"\nupstream_url = "http://gpu:8000/v1"\n',
            '`models[0].upstream_url` is set but engine = "llamacpp"',
        ),
        ('id = "m"\n', "missing required key `models[0].path`"),
        (
            'id = "m"\nengine = "openai"\nupstream_url = "gpu:8000"\n',
            "bad value for key `models[0].upstream_url`",
        ),
        (
            'id = "m"\nengine = "openai"\nupstream_url = "http://g/v1"\nmax_concurrency = 0\n',
            "bad value for key `models[0].max_concurrency`",
        ),
    ],
)
def test_bad_upstream_config_names_the_key(tmp_path: Path, model: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_appliance_config(write_config(tmp_path, "[[models]]\n" + model))
    assert message in str(caught.value)


def test_a_key_pasted_into_upstream_key_env_is_refused_without_echoing_it(
    tmp_path: Path,
) -> None:
    text = '[[models]]\nid = "m"\nengine = "openai"\nupstream_url = "http://g/v1"\n'
    text += f'upstream_key_env = "{KEY}"\n'
    with pytest.raises(ConfigError) as caught:
        load_appliance_config(write_config(tmp_path, text))
    assert "bad value for key `models[0].upstream_key_env`" in str(caught.value)
    assert KEY not in str(caught.value)


def test_serve_without_upstream_url_exits_1_naming_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[[models]]\nid = "m"\nengine = "openai"\n')
    result = run_palisade("appliance", "serve", "--config", str(path), "--port", "0")
    assert result.returncode == 1
    assert '`models[0].upstream_url` is required when engine = "openai"' in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_serve_without_the_key_variable_exits_1_naming_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, upstream_toml("http://127.0.0.1:9/v1"))
    result = run_palisade(
        "appliance", "serve", "--config", str(path), "--port", "0", unset=("STANDIN_KEY",)
    )
    assert result.returncode == 1
    assert "environment variable STANDIN_KEY (upstream_key_env), but it is not set" in (
        result.stderr
    )


def test_serve_with_unreachable_upstream_exits_1_naming_the_url(tmp_path: Path) -> None:
    with run_standin() as gone:
        url = gone.v1
    path = write_config(tmp_path, upstream_toml(url))
    result = run_palisade(
        "appliance",
        "serve",
        "--config",
        str(path),
        "--port",
        "0",
        "--no-auth",
        env={"STANDIN_KEY": KEY},
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"Cannot reach the upstream for `{MODEL}` at {url}/models" in output
    assert "fix `upstream_url`" in output
    assert KEY not in output
    assert "Traceback" not in output
