"""The OpenAI fields beyond sampling at the HTTP layer: `logit_bias`, `echo`, several prompts
per completion, their admission and context checks, and the capabilities `/v1/models` lists.

The policy (parsing, bounds, budgets) runs in-process; the rest goes through one real
appliance process serving three models: a scripted engine with every capability on, one
with none, and the `openai` engine in front of the stand-in upstream (which records the
body it got, so forwarding is checked field by field).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance._private import inference
from appliance._private.engines.base import (
    Capabilities,
    Prompt,
    RequestFeatures,
    SamplingParams,
)
from appliance._private.errors import ContextLengthExceededError, UnsupportedParameterError
from federation import CompletionRequest, InvalidRequestError
from tests.standin import RunningStandin, run_standin
from tests.support import Appliance, run_appliance

RICH = "scripted-rich"  # every capability on
BARE = "scripted-bare"  # none
UPSTREAM = "upstream"  # the openai engine in front of the stand-in
LOCAL = Capabilities(tokenizes_locally=True, early_errors=False)


# --- policy, in-process ---------------------------------------------------------------------


def refused(call: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        call()
    return caught.value


def test_logit_bias_becomes_id_ordered_pairs() -> None:
    pairs = inference.logit_bias({"50": 1.5, "7": -100, "0": 100}, vocabulary=51)
    assert pairs == ((0, 100.0), (7, -100.0), (50, 1.5))
    assert inference.logit_bias(None, vocabulary=51) == ()
    # No vocabulary known (an upstream decides): any id the wire can carry.
    assert inference.logit_bias({"999999": 2}, vocabulary=None) == ((999999, 2.0),)


@pytest.mark.parametrize(
    ("bias", "param", "words"),
    [
        ({"51": 1}, "logit_bias.51", "outside this model's vocabulary of 51 tokens"),
        ({"7": 100.5}, "logit_bias.7", "a bias must be -100 to 100"),
        ({"7": -101}, "logit_bias.7", "a bias must be -100 to 100"),
        ({"7": float("inf")}, "logit_bias.7", "a bias must be -100 to 100"),
        ({"hello": 1}, "logit_bias.hello", "is not a token id"),
        ({"-3": 1}, "logit_bias.-3", "is not a token id"),
        ({"1.5": 1}, "logit_bias.1.5", "is not a token id"),
        ({"٣": 1}, "logit_bias.٣", "is not a token id"),  # a digit, but not ASCII
        ({"7": 1, "07": 2}, "logit_bias.7", "names token 7 twice"),
        ({"9" * 5000: 1}, "logit_bias." + "9" * 32, "is not a token id"),
        ({str(i): 1 for i in range(1025)}, "logit_bias", "at most 1024"),
    ],
)
def test_a_bad_logit_bias_entry_is_named(bias: dict[str, float], param: str, words: str) -> None:
    error = refused(lambda: inference.logit_bias(bias, vocabulary=51))
    assert (error.code, error.param) == ("invalid_value", param)
    assert words in error.message
    assert len(error.message) < 300  # a huge key is not repeated in full


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest(model="m", **fields)


def counted(size: int, *more: int) -> Prompt:
    """A prompt a local engine tokenized (so the context window applies here)."""
    others = tuple(Prompt(n, tokens=[1] * n) for n in more)
    return Prompt(size, tokens=[1] * size, more=others)


def test_every_prompt_is_checked_against_the_context_window() -> None:
    request = completion(prompt=["a", "b"], max_tokens=10)
    params = inference.sampling_params(
        request, requested=10, prompt=counted(50, 90), context_length=100
    )
    assert params.max_tokens == 10
    error = refused(
        lambda: inference.sampling_params(
            request, requested=20, prompt=counted(50, 90), context_length=100
        )
    )
    assert isinstance(error, ContextLengthExceededError)
    assert error.param == "prompt[1]"
    assert error.message.startswith("prompt[1]: ")
    # Without max_tokens, the budget is what the longest prompt leaves.
    unbounded = inference.sampling_params(
        completion(prompt="a"), requested=None, prompt=counted(50, 90), context_length=100
    )
    assert unbounded.max_tokens == 10


def test_admission_counts_every_prompt_and_every_choice() -> None:
    prompt = Prompt(10, text="a", more=(Prompt(5, text="b"), Prompt(1, text="c")))
    features = RequestFeatures(n=3, endpoint="completion")
    params = SamplingParams(max_tokens=7, features=features)
    assert inference.admission_tokens(prompt, params) == 16 + 7 * 3 * 3
    assert inference.admission_tokens(Prompt(4, text="a"), SamplingParams(max_tokens=2)) == 6


def test_several_prompts_need_the_capability_and_fit_in_the_choice_bound() -> None:
    two = completion(prompt=["a", [1, 2]])
    with pytest.raises(InvalidRequestError):  # mixed forms: one form per request
        inference.completion_prompts(two, LOCAL, "m")
    texts = completion(prompt=["a", "b"])
    with pytest.raises(UnsupportedParameterError) as unsupported:
        inference.completion_prompts(texts, LOCAL, "m")
    assert unsupported.value.param == "prompt"
    assert "`m` takes one prompt per request" in unsupported.value.message
    several = Capabilities(tokenizes_locally=True, early_errors=False, several_prompts=True)
    assert inference.completion_prompts(texts, several, "m") == [
        ("a", "prompt[0]"),
        ("b", "prompt[1]"),
    ]
    too_many = completion(prompt=["a"] * 65, n=2)
    error = refused(lambda: inference.completion_prompts(too_many, several, "m"))
    assert (error.code, error.param) == ("invalid_value", "prompt")
    assert "130 choices" in error.message


def test_completion_features_carry_echo_and_the_endpoint() -> None:
    assert inference.completion_features(completion(prompt="a")) is None
    features = inference.completion_features(completion(prompt="a", echo=True))
    assert features == RequestFeatures(echo=True, endpoint="completion")
    logprobs = inference.completion_features(completion(prompt="a", logprobs=2, n=2))
    assert logprobs == RequestFeatures(logprobs=True, top_logprobs=2, n=2, endpoint="completion")


# --- through a real appliance ---------------------------------------------------------------


def appliance_toml(upstream: str) -> str:
    return f"""node_id = "features-1"
region = "eu-west"

[[models]]
id = "{RICH}"
engine = "scripted"
n = true
logprobs = true
echo = true
several_prompts = true

[[models]]
id = "{BARE}"
engine = "scripted"

[[models]]
id = "{UPSTREAM}"
engine = "openai"
upstream_url = "{upstream}"
upstream_model = "standin-model"
"""


@pytest.fixture(scope="module")
def standin() -> Iterator[RunningStandin]:
    with run_standin(tokens=3) as running:
        yield running


@pytest.fixture(scope="module")
def appliance(
    standin: RunningStandin, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Appliance]:
    home: Path = tmp_path_factory.mktemp("features-home")
    with run_appliance(home, appliance_toml(standin.v1), "--no-auth") as running:
        yield running


@pytest.fixture(scope="module")
def client(appliance: Appliance) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=appliance.v1, api_key="unused", max_retries=0, timeout=30
    ) as session:
        yield session


@pytest.fixture(scope="module")
def http(appliance: Appliance) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=appliance.url, timeout=30) as session:
        yield session


def error_of(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert {"message", "type", "code", "param"} <= set(error)
    assert error["code"] == code, error
    return error


def test_model_cards_list_what_each_engine_serves(client: openai.OpenAI) -> None:
    cards = {card.id: card.model_dump() for card in client.models.list()}
    assert cards[RICH]["capabilities"] == ["logprobs", "n", "echo", "several_prompts"]
    assert cards[BARE]["capabilities"] == []
    # The openai engine passes everything on: the server behind decides.
    assert cards[UPSTREAM]["capabilities"] == [
        "embeddings",
        "logprobs",
        "n",
        "tools",
        "structured_output",
        "logit_bias",
        "echo",
        "several_prompts",
    ]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"echo": True}, "echo"),
        ({"prompt": ["one", "two"]}, "prompt"),
    ],
)
def test_a_model_without_the_capability_refuses_it_by_name(
    http: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    body = {"model": BARE, "prompt": "one two"} | extra
    error = error_of(http.post("/v1/completions", json=body), "unsupported_parameter")
    assert error["param"] == param
    assert f"`{BARE}`" in error["message"]


def test_several_prompts_give_n_choices_each_in_order(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=RICH, prompt=["red green", "blue sky above"], n=2, max_tokens=8
    )
    texts = [(choice.index, choice.text) for choice in reply.choices]
    assert texts == [
        (0, "red green"),
        (1, "red green"),
        (2, "blue sky above"),
        (3, "blue sky above"),
    ]
    assert all(choice.finish_reason == "stop" for choice in reply.choices)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 5  # every prompt, read once
    assert reply.usage.completion_tokens == 2 + 2 + 3 + 3


def test_several_prompts_stream_each_choice_to_its_end(client: openai.OpenAI) -> None:
    texts: dict[int, str] = {}
    reasons: dict[int, list[str]] = {}
    usage = None
    for chunk in client.completions.create(
        model=RICH,
        prompt=["red green", "blue sky above"],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons.setdefault(choice.index, []).append(choice.finish_reason)
    assert texts == {0: "red green", 1: "blue sky above"}
    assert reasons == {0: ["stop"], 1: ["stop"]}
    assert usage is not None
    assert usage.prompt_tokens == 5


def test_echo_starts_each_choice_with_its_prompt_and_its_logprobs(
    client: openai.OpenAI,
) -> None:
    reply = client.completions.create(
        model=RICH, prompt=["calm sea", "wide open sky"], echo=True, logprobs=1, max_tokens=8
    )
    first, second = reply.choices
    assert first.text == "calm seacalm sea"  # the prompt, then the (echoing) answer
    assert second.text == "wide open skywide open sky"
    assert first.logprobs is not None
    assert first.logprobs.tokens == ["calm", " sea", "calm", " sea"]
    token_logprobs = first.logprobs.token_logprobs or []
    assert token_logprobs[0] is None  # nothing comes before the prompt's first token
    assert all(value is not None for value in token_logprobs[1:])
    assert first.logprobs.text_offset == [0, 4, 8, 12]
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 2 + 3  # the echo is not generated


def test_a_bad_logit_bias_is_refused_before_anything_runs(
    http: httpx.Client, standin: RunningStandin
) -> None:
    before = standin.stats()["requests"].get("/v1/chat/completions", 0)
    body = {
        "model": UPSTREAM,
        "messages": [{"role": "user", "content": "hi"}],
        "logit_bias": {"50": 150},
    }
    error = error_of(http.post("/v1/chat/completions", json=body), "invalid_value")
    assert error["param"] == "logit_bias.50"
    assert standin.stats()["requests"].get("/v1/chat/completions", 0) == before


def test_the_upstream_gets_logit_bias_echo_and_every_prompt(
    client: openai.OpenAI, standin: RunningStandin
) -> None:
    reply = client.completions.create(
        model=UPSTREAM,
        prompt=["one two", "three"],
        n=2,
        echo=True,
        logprobs=2,
        logit_bias={"50": -100, "7": 5},
        max_tokens=3,
    )
    sent = standin.stats()["last_body"]
    assert sent["prompt"] == ["one two", "three"]
    assert (sent["n"], sent["echo"], sent["logprobs"]) == (2, True, 2)
    assert sent["logit_bias"] == {"7": 5.0, "50": -100.0}
    assert [choice.index for choice in reply.choices] == [0, 1, 2, 3]
    assert [choice.text.split(" ")[0] for choice in reply.choices] == [
        "one",
        "one",
        "three",
        "three",
    ]


def test_token_id_prompts_go_upstream_as_lists(
    client: openai.OpenAI, standin: RunningStandin
) -> None:
    reply = client.completions.create(model=UPSTREAM, prompt=[[1, 2], [3]], max_tokens=3)
    assert standin.stats()["last_body"]["prompt"] == [[1, 2], [3]]
    assert len(reply.choices) == 2
    chat = client.chat.completions.create(
        model=UPSTREAM,
        messages=[{"role": "user", "content": "hi"}],
        logit_bias={"3": 1},
        max_tokens=3,
    )
    assert chat.choices[0].message.content
    assert standin.stats()["last_body"]["logit_bias"] == {"3": 1.0}


def test_streamed_echo_through_the_upstream_keeps_each_prompt_first(
    http: httpx.Client,
) -> None:
    body = {
        "model": UPSTREAM,
        "prompt": ["alpha beta", "gamma"],
        "echo": True,
        "max_tokens": 2,
        "stream": True,
    }
    texts: dict[int, str] = {}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "alpha beta tok0 tok1", 1: "gamma c1tok0 c1tok1"}
