"""The engine conformance suite: every engine gets the same checks, through a real appliance
process and the official `openai` SDK.

An `EngineCase` is a name, the `[[models]]` TOML of one model called `MODEL` (with
`$placeholders` filled from what the case's `backing` context manager yields: a stand-in
upstream's URL, a graph file), the `engine` tag and capability flags the model must report,
and what makes the case unavailable on this machine (its skip reason). Every case's model
runs one request at a time with no queue (`max_sequences`/`max_concurrency`/`slots` = 1,
`max_queue` = 0; llama.cpp two sequences, for n = 2 and two prompts), so as many open
streams as it has slots fill it for the queue-full check; every other check sends one
request at a time and caps `max_tokens`, so slow tokens cost little.

Adding an engine adds one `EngineCase` to `CASES`. The checks (`CHECKS`) are plain functions
of a `Served` case; `serve(case, home)` starts its appliance, so another lane (the real vLLM
lane) runs the same checks over its own cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import string
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from appliance._private.served import CAPABILITY_NAMES
from tests.standin import run_standin
from tests.support import REPO, Appliance, default_model_path, run_appliance, wait_for

MODEL = "conformance"
HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write one sentence about the sea."}
]
LONG_TOKENS = 1000  # a stream that outlives the check that holds it open
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ANSWER_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string"}},
            "required": ["answer"],
        },
    },
}


@dataclass(frozen=True)
class Backing:
    """What a case needs running beside the appliance: `$placeholders` for its TOML and
    environment variables for the appliance."""

    values: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def nothing(home: Path) -> Iterator[Backing]:
    del home
    yield Backing()


def available() -> str | None:
    return None


@dataclass(frozen=True)
class EngineCase:
    name: str
    engine: str  # the `engine` tag the model card reports
    models: str  # `[[models]]` TOML for MODEL; `$name` placeholders come from `backing`
    capabilities: frozenset[str]  # the true flags among CAPABILITY_NAMES
    backing: Callable[[Path], AbstractContextManager[Backing]] = nothing
    unavailable: Callable[[], str | None] = available  # why it cannot run here, or None
    generates: bool = True  # chat completions and completions
    ready_timeout: float = 60.0
    slots: int = 1  # requests it runs at once (its queue holds none)
    tokenizes: bool = False  # the appliance tokenizes (so it knows the vocabulary)

    def __post_init__(self) -> None:
        unknown = self.capabilities - set(CAPABILITY_NAMES)
        assert not unknown, f"{self.name}: no such capabilities {sorted(unknown)}"

    def param(self) -> Any:
        """This case as a pytest parameter, skipped with the reason when unavailable."""
        reason = self.unavailable()
        marks = [pytest.mark.skip(reason=f"{self.name}: {reason}")] if reason else []
        return pytest.param(self, id=self.name, marks=marks)


@dataclass
class Served:
    case: EngineCase
    appliance: Appliance
    client: openai.OpenAI

    def metric(self, name: str, **labels: str) -> float:
        return self.appliance.metric(name, model=MODEL, **labels)


@contextlib.contextmanager
def serve(case: EngineCase, home: Path) -> Iterator[Served]:
    """The case's backing, then an appliance serving its model (`--no-auth`), stopped after."""
    with case.backing(home / "backing") as backing:
        models = string.Template(case.models).substitute(backing.values)
        config = f'node_id = "conformance-{case.name}"\nregion = "eu-west"\n{models}'
        with run_appliance(
            home / "appliance",
            config,
            "--no-auth",
            env=backing.env,
            ready_timeout=case.ready_timeout,
        ) as appliance:
            client = openai.OpenAI(
                base_url=appliance.v1, api_key="unused", max_retries=0, timeout=60
            )
            with client:  # its connections closed before the appliance stops
                yield Served(case, appliance, client)


# --- the cases ------------------------------------------------------------------------------

# Every generation capability: what llama.cpp enforces itself and what an engine
# forwarding to an OpenAI-compatible server passes on (the server decides).
ALL_GENERATION = frozenset(
    {"logprobs", "n", "tools", "structured_output", "logit_bias", "echo", "several_prompts"}
)

SCRIPTED = EngineCase(
    "scripted",
    "scripted",
    """[[models]]
id = "conformance"
engine = "scripted"
replies = ["The sea is wide and the waves roll in under a grey morning sky today."]
token_ms = 20
slots = 1
max_queue = 0
embeddings = true
logprobs = true
n = true
tools = true
structured_output = true
echo = true
several_prompts = true
""",
    frozenset(
        {"embeddings", "logprobs", "n", "tools", "structured_output", "echo", "several_prompts"}
    ),
)

SCRIPTED_BARE = EngineCase(
    "scripted-bare",
    "scripted",
    """[[models]]
id = "conformance"
engine = "scripted"
token_ms = 20
slots = 1
max_queue = 0
""",
    frozenset(),
)

LLAMACPP = EngineCase(
    "llamacpp",
    "llamacpp",
    """[[models]]
id = "conformance"
path = "$gguf"
context_length = 2048
max_sequences = 2
max_queue = 0
""",
    frozenset({"embeddings", *ALL_GENERATION}),
    backing=lambda _: _values(gguf=str(default_model_path())),
    unavailable=lambda: _missing(default_model_path, "run `make model`"),
    slots=2,
    tokenizes=True,
)


@contextlib.contextmanager
def standin_upstream(home: Path) -> Iterator[Backing]:
    """The OpenAI-compatible stand-in, with slow tokens (20 ms) and long answers (1000)."""
    del home
    with run_standin(token_ms=20, tokens=LONG_TOKENS, model=MODEL) as standin:
        yield Backing({"upstream": standin.v1})


OPENAI = EngineCase(
    "openai",
    "openai",
    """[[models]]
id = "conformance"
engine = "openai"
upstream_url = "$upstream"
max_concurrency = 1
max_queue = 0
""",
    frozenset({"embeddings", *ALL_GENERATION}),
    backing=standin_upstream,
)


@contextlib.contextmanager
def engine_directories(home: Path) -> Iterator[Backing]:
    """A model (or engine) directory and a tokenizer directory for an engine stand-in."""
    for name in ("model", "tokenizer"):
        (home / name).mkdir(parents=True, exist_ok=True)
    yield Backing({"model": str(home / "model"), "tokenizer": str(home / "tokenizer")})


def supervised_standin(engine: str, command: list[str], keys: str = "") -> EngineCase:
    """A supervised engine (the appliance runs it) whose executable is a stand-in
    (`tests/engine_standins`) taking the real flags, with slow tokens and long answers."""
    listed = ", ".join(f'"{part}"' for part in [sys.executable, "-m", *command])
    return EngineCase(
        f"{engine}-standin",
        engine,
        f"""[[models]]
id = "conformance"
engine = "{engine}"
path = "$model"
command = [{listed}]
max_concurrency = 1
max_queue = 0
env = {{ PALISADE_STANDIN_TOKENS = "{LONG_TOKENS}", PALISADE_STANDIN_TOKEN_MS = "20" }}
{keys}""",
        ALL_GENERATION,
        backing=engine_directories,
    )


VLLM_STANDIN = supervised_standin("vllm", ["tests.engine_standins.vllm_standin", "serve"])
TRTLLM_STANDIN = supervised_standin(
    "tensorrt_llm", ["tests.engine_standins.trtllm_standin"], 'tokenizer = "$tokenizer"'
)


def onnx_cuda_unavailable() -> str | None:
    try:
        import onnxruntime  # noqa: PLC0415 - optional: only this case needs it
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "onnxruntime's CUDAExecutionProvider is not available (no CUDA GPU/build here)"
    return None


@contextlib.contextmanager
def plus_one_graph(home: Path) -> Iterator[Backing]:
    """y = x + 1 over float32 [batch, 4], written as an .onnx file."""
    import onnx  # noqa: PLC0415 - optional: only this case needs it
    from onnx import TensorProto, helper  # noqa: PLC0415

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "plus_one", [x], [y])
    graph.initializer.append(one)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    home.mkdir(parents=True, exist_ok=True)
    path = home / "plus_one.onnx"
    onnx.save(model, str(path))
    yield Backing({"graph": str(path)})


ONNX_CUDA = EngineCase(
    "onnx-cuda",
    "onnx",
    """[[models]]
id = "conformance"
engine = "onnx"
path = "$graph"
device_class = "gpu"
providers = ["CUDAExecutionProvider"]
max_queue = 0
""",
    frozenset({"predict"}),
    backing=plus_one_graph,
    unavailable=onnx_cuda_unavailable,
    generates=False,
)


def vllm_home() -> Path:
    return Path(os.environ.get("PALISADE_HOME", REPO / "var"))


def vllm_unavailable() -> str | None:
    venv = vllm_home() / "vllm-venv" / "bin" / "python"
    if not venv.is_file():
        return f"the vLLM lane's venv {venv.parent.parent} is not present (`make vllm-lane`)"
    model = vllm_home() / "models" / "smollm2-135m-instruct-hf"
    return None if model.is_dir() else f"{model} is not present (`make vllm-lane`)"


def vllm_runs_in_its_lane() -> str | None:
    """Real vLLM takes minutes and gigabytes: `make vllm-lane` runs it, `make test` only
    when asked to (PALISADE_CONFORMANCE_VLLM=1)."""
    if os.environ.get("PALISADE_CONFORMANCE_VLLM") == "1":
        return None
    return "real vLLM runs in `make vllm-lane`; PALISADE_CONFORMANCE_VLLM=1 runs it here too"


VLLM_REAL = EngineCase(
    "vllm-real",
    "vllm",
    """[[models]]
id = "conformance"
engine = "vllm"
path = "$model"
command = ["$python", "-m", "vllm.entrypoints.openai.api_server"]
dtype = "bfloat16"
enforce_eager = true
max_model_len = 2048
device_class = "cpu"
accelerator = "cpu"
max_concurrency = 1
max_queue = 0
env = { VLLM_CPU_KVCACHE_SPACE = "1" }
""",
    ALL_GENERATION,
    backing=lambda _: _values(
        model=str(vllm_home() / "models" / "smollm2-135m-instruct-hf"),
        python=str(vllm_home() / "vllm-venv" / "bin" / "python"),
    ),
    unavailable=lambda: vllm_unavailable() or vllm_runs_in_its_lane(),
    ready_timeout=600.0,
)


def gpu_engine_unavailable(executable: str, variable: str, what: str) -> str | None:
    """A GPU engine's lane runs where its executable, an NVIDIA GPU and the directory it
    serves (named by `variable`) are all present."""
    if shutil.which(executable) is None:
        return f"`{executable}` is not on PATH (install it on a GPU machine)"
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU here (`nvidia-smi` is not on PATH)"
    folder = os.environ.get(variable)
    if not folder or not Path(folder).is_dir():
        return f"set {variable} to {what}"
    return None


# Real vLLM on a GPU (`vllm serve`), on the Hugging Face folder in PALISADE_VLLM_MODEL.
VLLM_GPU = EngineCase(
    "vllm-gpu",
    "vllm",
    """[[models]]
id = "conformance"
engine = "vllm"
path = "$model"
device_class = "gpu"
max_concurrency = 1
max_queue = 0
extra_args = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
""",
    ALL_GENERATION,
    backing=lambda _: _values(model=os.environ.get("PALISADE_VLLM_MODEL", "")),
    unavailable=lambda: gpu_engine_unavailable(
        "vllm", "PALISADE_VLLM_MODEL", "a Hugging Face model folder"
    ),
    ready_timeout=900.0,
)

# Real TensorRT-LLM (`trtllm-serve`) on the prebuilt engine in PALISADE_TRTLLM_ENGINE,
# with the tokenizer folder in PALISADE_TRTLLM_TOKENIZER.
TRTLLM_GPU = EngineCase(
    "tensorrt_llm-gpu",
    "tensorrt_llm",
    """[[models]]
id = "conformance"
engine = "tensorrt_llm"
path = "$engine"
tokenizer = "$tokenizer"
max_concurrency = 1
max_queue = 0
""",
    ALL_GENERATION,
    backing=lambda _: _values(
        engine=os.environ.get("PALISADE_TRTLLM_ENGINE", ""),
        tokenizer=os.environ.get("PALISADE_TRTLLM_TOKENIZER", ""),
    ),
    unavailable=lambda: gpu_engine_unavailable(
        "trtllm-serve", "PALISADE_TRTLLM_ENGINE", "a prebuilt TensorRT-LLM engine directory"
    ),
    ready_timeout=900.0,
)


# The cases `make test` runs (the optional ones skip with their reason when absent).
CASES: list[EngineCase] = [
    SCRIPTED,
    SCRIPTED_BARE,
    LLAMACPP,
    OPENAI,
    VLLM_STANDIN,
    TRTLLM_STANDIN,
    ONNX_CUDA,
    VLLM_REAL,
    VLLM_GPU,
    TRTLLM_GPU,
]


def _values(**values: str) -> AbstractContextManager[Backing]:
    return contextlib.nullcontext(Backing(values))


def _missing(path: Callable[[], Path], fix: str) -> str | None:
    try:
        path()
    except FileNotFoundError as exc:
        return f"{exc} ({fix})"
    return None


# --- helpers --------------------------------------------------------------------------------


def chat(served: Served, **fields: Any) -> Any:
    fields.setdefault("max_tokens", 16)
    return served.client.chat.completions.create(
        model=MODEL, messages=fields.pop("messages", HELLO), **fields
    )


def refusal(call: Callable[[], object], status: int = 400) -> dict[str, Any]:
    """The OpenAI-shaped error body of a refused call (which must be refused)."""
    with pytest.raises(openai.APIStatusError) as refused:
        call()
    assert refused.value.status_code == status, refused.value.response.text
    error: dict[str, Any] = refused.value.response.json()["error"]
    assert {"message", "type", "code", "param"} <= set(error)
    return error


def assert_unsupported(call: Callable[[], object], code: str = "unsupported_parameter") -> None:
    error = refusal(call)
    assert error["code"] == code, error
    assert MODEL in error["message"], error  # names the model, never the engine class


def needs_generation(served: Served) -> None:
    if not served.case.generates:
        pytest.skip(f"{served.case.name} does not generate text")


def long_stream(served: Served) -> Any:
    """A stream that keeps going (end-of-text ignored) until the client leaves."""
    return chat(served, stream=True, max_tokens=LONG_TOKENS, extra_body={"ignore_eos": True})


def first_text(stream: Any) -> str:
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                return str(choice.delta.content)
    raise AssertionError("the stream ended before any text")


def wait_idle(served: Served) -> None:
    wait_for(
        lambda: (
            served.metric("palisade_running_generations") == 0
            and served.metric("palisade_queue_depth") == 0
        ),
        timeout=30,
    )


# --- the checks -----------------------------------------------------------------------------


def check_model_card(served: Served) -> None:
    cards = httpx.get(f"{served.appliance.v1}/models", timeout=10).json()["data"]
    card = next(card for card in cards if card["id"] == MODEL)
    assert card.get("engine") == served.case.engine, card
    assert set(card.get("capabilities", ())) == served.case.capabilities, card


def check_chat(served: Served) -> None:
    if not served.case.generates:
        assert_unsupported(lambda: chat(served))
        return
    reply = chat(served)
    choice = reply.choices[0]
    assert choice.message.content, reply
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 16


def check_completion(served: Served) -> None:
    def complete() -> Any:
        return served.client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=16
        )

    if not served.case.generates:
        assert_unsupported(complete)
        return
    reply = complete()
    assert reply.choices[0].text, reply
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 16


def check_stream_with_usage(served: Served) -> None:
    needs_generation(served)
    text, usages, reasons = "", [], []
    for chunk in chat(served, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    assert text
    assert len(reasons) == 1
    assert reasons[0] in ("stop", "length")
    assert len(usages) == 1  # one usage chunk, at the end
    assert usages[0].prompt_tokens > 0
    assert 0 < usages[0].completion_tokens <= 16


def check_max_tokens(served: Served) -> None:
    needs_generation(served)
    reply = chat(served, max_tokens=3, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3


def check_stop(served: Served) -> None:
    needs_generation(served)
    ignore_eos = {"ignore_eos": True}
    first = chat(served, max_tokens=12, temperature=0, extra_body=ignore_eos)
    text = first.choices[0].message.content or ""
    words = text.split()
    assert len(words) >= 4, text
    stop = " " + words[2]
    expected = text[: text.find(stop)]
    second = chat(served, max_tokens=12, temperature=0, stop=[stop], extra_body=ignore_eos)
    assert second.choices[0].message.content == expected
    assert second.choices[0].finish_reason == "stop"


def check_client_leaves_mid_stream(served: Served) -> None:
    needs_generation(served)
    before = served.metric("palisade_generations_total", reason="cancelled")
    stream = long_stream(served)
    assert first_text(stream)
    stream.close()
    wait_for(
        lambda: served.metric("palisade_generations_total", reason="cancelled") > before,
        timeout=30,
    )
    wait_idle(served)


def check_queue_full_is_503_with_retry_after(served: Served) -> None:
    needs_generation(served)
    with contextlib.ExitStack() as streams:
        for _ in range(served.case.slots):  # every slot taken, and no queue
            assert first_text(streams.enter_context(long_stream(served)))
        with pytest.raises(openai.APIStatusError) as refused:
            chat(served, max_tokens=4)
        response = refused.value.response
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "queue_full"
        assert int(response.headers["retry-after"]) >= 1
    wait_idle(served)


def check_n(served: Served) -> None:
    if "n" not in served.case.capabilities:
        assert_unsupported(lambda: chat(served, n=2))
        return
    reply = chat(served, n=2, max_tokens=8)
    assert sorted(choice.index for choice in reply.choices) == [0, 1]
    assert all(choice.message.content for choice in reply.choices), reply


def check_logprobs(served: Served) -> None:
    if "logprobs" not in served.case.capabilities:
        assert_unsupported(lambda: chat(served, logprobs=True))
        return
    reply = chat(served, logprobs=True, top_logprobs=2, max_tokens=8)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None, reply
    assert logprobs.content, reply
    for entry in logprobs.content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 2


def check_tools(served: Served) -> None:
    if "tools" not in served.case.capabilities:
        assert_unsupported(lambda: chat(served, tools=[WEATHER]))
        return
    # "required": a small model may well answer in text when it may choose ("auto").
    # Greedy: a sampled 135M model may ramble inside a string until max_tokens cuts it.
    reply = chat(served, tools=[WEATHER], tool_choice="required", max_tokens=64, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", reply
    calls = choice.message.tool_calls or []
    assert [call.function.name for call in calls] == ["get_weather"]
    assert isinstance(json.loads(calls[0].function.arguments), dict)


def check_streamed_tool_call(served: Served) -> None:
    if "tools" not in served.case.capabilities:
        pytest.skip(f"{served.case.name} serves no tools")
    name, arguments, reasons = "", "", []
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = chat(
        served, tools=[WEATHER], tool_choice=named, max_tokens=64, temperature=0, stream=True
    )
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                name += (call.function.name or "") if call.function else ""
                arguments += (call.function.arguments or "") if call.function else ""
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    assert name == "get_weather"
    assert isinstance(json.loads(arguments), dict)
    assert reasons == ["tool_calls"]


def check_structured_output(served: Served) -> None:
    if "structured_output" not in served.case.capabilities:
        assert_unsupported(lambda: chat(served, response_format=ANSWER_SCHEMA))
        return
    reply = chat(served, response_format=ANSWER_SCHEMA, max_tokens=64, temperature=0)
    answer = json.loads(reply.choices[0].message.content or "")
    assert isinstance(answer["answer"], str)


def complete(served: Served, **fields: Any) -> Any:
    fields.setdefault("max_tokens", 4)
    return served.client.completions.create(
        model=MODEL, prompt=fields.pop("prompt", "Once upon a time"), **fields
    )


def check_logit_bias(served: Served) -> None:
    needs_generation(served)
    if "logit_bias" not in served.case.capabilities:
        assert_unsupported(lambda: chat(served, logit_bias={"1": 5}))
        return
    reply = chat(served, logit_bias={"1": 0}, max_tokens=4)  # a bias that changes nothing
    assert reply.choices[0].message.content, reply
    error = refusal(lambda: chat(served, logit_bias={"1": 101}))
    assert (error["code"], error["param"]) == ("invalid_value", "logit_bias.1"), error
    if served.case.tokenizes:  # else the server behind checks its own vocabulary
        outside = refusal(lambda: chat(served, logit_bias={"1000000000": 1}))
        assert outside["param"] == "logit_bias.1000000000", outside
        assert "outside this model's vocabulary" in outside["message"]


def check_echo(served: Served) -> None:
    needs_generation(served)
    if "echo" not in served.case.capabilities:
        assert_unsupported(lambda: complete(served, echo=True))
        return
    reply = complete(served, echo=True)
    assert reply.choices[0].text.startswith("Once upon a time"), reply
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 4  # the echo is not generated


def check_several_prompts(served: Served) -> None:
    needs_generation(served)
    prompts = ["Once upon a time", "The sea was"]
    if "several_prompts" not in served.case.capabilities:
        assert_unsupported(lambda: complete(served, prompt=prompts))
        return
    reply = complete(served, prompt=prompts)
    assert sorted(choice.index for choice in reply.choices) == [0, 1]
    assert all(choice.text for choice in reply.choices), reply
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 8


def check_embeddings(served: Served) -> None:
    def embed() -> Any:
        return served.client.embeddings.create(model=MODEL, input=["the sea", "a ship"])

    if "embeddings" not in served.case.capabilities:
        assert_unsupported(embed, "embeddings_disabled")  # the code embeddings always had
        return
    reply = embed()
    vectors = [item.embedding for item in reply.data]
    assert len(vectors) == 2
    assert len(vectors[0]) == len(vectors[1]) > 0


def check_predict(served: Served) -> None:
    if "predict" not in served.case.capabilities:
        pytest.skip(f"{served.case.name} serves no predictions")
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    url = f"{served.appliance.url}/api/v1/models/{MODEL}/predict"
    reply = httpx.post(url, json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    (output,) = reply.json()["outputs"]
    assert output["name"] == "y"
    assert [float(value) for value in _flat(output["data"])] == [2.0, 3.0, 4.0, 5.0]


def _flat(data: Any) -> list[Any]:
    return [item for part in data for item in _flat(part)] if isinstance(data, list) else [data]


CHECKS: list[Callable[[Served], None]] = [
    check_model_card,
    check_chat,
    check_completion,
    check_stream_with_usage,
    check_max_tokens,
    check_stop,
    check_client_leaves_mid_stream,
    check_queue_full_is_503_with_retry_after,
    check_n,
    check_logprobs,
    check_tools,
    check_streamed_tool_call,
    check_structured_output,
    check_logit_bias,
    check_echo,
    check_several_prompts,
    check_embeddings,
    check_predict,
]
