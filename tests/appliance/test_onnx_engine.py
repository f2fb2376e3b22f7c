"""The `onnx` engine: real ONNX graphs, built here with the `onnx` helper API, served by
ONNX Runtime on `POST /api/v1/models/{id}/predict` and checked against NumPy computations
of the same graphs.

One real appliance process serves the default llama.cpp chat model beside two ONNX models
(an MLP classifier and an embedding model), with keys on, so predictions go through the
same admission, usage and audit as chat. Provider choice and load failures are checked in
process; the CUDA lane runs only where onnxruntime has a CUDA provider.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime
import openai
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from appliance import DEFAULT_MODEL_ID, load_appliance_config
from appliance._private.engines.base import EngineContext, EngineLoad, Prompt, SamplingParams
from appliance._private.engines.onnx.config import OnnxModel
from appliance._private.engines.onnx.engine import OnnxEngine, choose_providers
from appliance._private.errors import ModelLoadError, QueueFullError, UnsupportedParameterError
from federation import ConfigError
from tests.federation.tenants import Member, admin_of
from tests.support import Appliance, model_toml, run_appliance, wait_for, write_config

MLP, EMBEDDER = "iris-mlp", "tiny-embedder"
MAX_ELEMENTS = 4096
PER_REQUEST = 0.002
RNG = np.random.default_rng(14)
# The MLP: 4 features → 8 hidden (ReLU) → 3 class probabilities (softmax).
W1, B1 = RNG.standard_normal((4, 8)).astype(np.float32), RNG.standard_normal(8).astype(np.float32)
W2, B2 = RNG.standard_normal((8, 3)).astype(np.float32), RNG.standard_normal(3).astype(np.float32)
# The embedder: word + token-type embeddings (as BERT's), mean over tokens, L2-normalised.
WORDS = RNG.standard_normal((50, 6)).astype(np.float32)
TOKEN_TYPES = RNG.standard_normal((2, 6)).astype(np.float32)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime releases since 1.14 read
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_graph() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["hidden_mm"]),
        helper.make_node("Add", ["hidden_mm", "B1"], ["hidden_pre"]),
        helper.make_node("Relu", ["hidden_pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "W2"], ["logits_mm"]),
        helper.make_node("Add", ["logits_mm", "B2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    weights = {"W1": W1, "B1": B1, "W2": W2, "B2": B2}
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
        ],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    return _model(graph)


def embedder_graph() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gather", ["words", "ids"], ["word_vectors"]),
        helper.make_node("Gather", ["token_types", "token_type_ids"], ["type_vectors"]),
        helper.make_node("Add", ["word_vectors", "type_vectors"], ["vectors"]),
        helper.make_node("ReduceMean", ["vectors"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("ReduceL2", ["mean"], ["norm"], axes=[-1], keepdims=1),
        helper.make_node("Div", ["mean", "norm"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embedder",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 6])],
        [
            numpy_helper.from_array(WORDS, "words"),
            numpy_helper.from_array(TOKEN_TYPES, "token_types"),
        ],
    )
    return _model(graph)


def mlp_numpy(x: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
    logits = np.maximum(x @ W1 + B1, 0) @ W2 + B2
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return {"probabilities": exp / exp.sum(axis=-1, keepdims=True), "logits": logits}


def embedder_numpy(ids: NDArray[np.int64], types: NDArray[np.int64]) -> NDArray[np.float32]:
    mean = (WORDS[ids] + TOKEN_TYPES[types]).mean(axis=1)
    normalised: NDArray[np.float32] = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    return normalised


def tensor(name: str, array: NDArray[Any], datatype: str) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.tolist()}


def output(answer: dict[str, Any], name: str) -> NDArray[Any]:
    found = next(item for item in answer["outputs"] if item["name"] == name)
    return np.array(found["data"]).reshape(found["shape"])


# --- in process: provider choice, load failures -------------------------------------------


def test_providers_are_tensorrt_then_cuda_then_cpu_by_availability() -> None:
    everything = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers("m", None, everything) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers("m", None, ["AzureExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert choose_providers("m", ["CPUExecutionProvider"], everything) == ["CPUExecutionProvider"]
    with pytest.raises(ModelLoadError, match=r"CUDAExecutionProvider.*has only CPUExecution"):
        choose_providers("m", ["CUDAExecutionProvider"], ["CPUExecutionProvider"])


def _engine(path: Path, **config: Any) -> OnnxEngine:
    model = OnnxModel(id="graph", path=str(path), **config)
    return OnnxEngine(model, EngineContext(home=path.parent, path=path, on_finish=_unused))


def _unused(*_: object) -> None:
    raise AssertionError("an ONNX engine never finishes generations")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x00\x01 not a protobuf at all", "cannot load `graph`"),
        (mlp_graph().SerializeToString()[:200], "cannot load `graph`"),  # truncated
    ],
)
def test_a_corrupt_or_non_onnx_file_fails_load_clearly(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    engine = _engine(path)
    with pytest.raises(ModelLoadError, match=expected) as failure:
        engine.load()
    assert str(path) in str(failure.value)
    assert not engine.ready
    missing = _engine(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match="was not found"):
        missing.load()


def test_predictions_run_off_the_loop_behind_the_admission_queue(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_graph(), path)
    engine = _engine(path, max_concurrency=1, max_queue=0)
    engine.load()
    x = RNG.standard_normal((3, 4)).astype(np.float32)

    async def two_at_once() -> dict[str, NDArray[Any]]:
        first = asyncio.ensure_future(engine.predict({"x": x}))
        await asyncio.sleep(0)  # the first is admitted and waits for its pool thread
        assert engine.load_now().running == 1
        with pytest.raises(QueueFullError) as refused:
            await engine.predict({"x": x})
        assert (refused.value.retry_after or 0) >= 1
        return await first

    try:
        result = asyncio.run(two_at_once())
        np.testing.assert_allclose(result["probabilities"], mlp_numpy(x)["probabilities"], 1e-5)
        assert engine.load_now() == EngineLoad(running=0, waiting=0, slots=1)
        with pytest.raises(UnsupportedParameterError, match="/api/v1/models/graph/predict"):
            engine.submit(Prompt(1, text="hi"), SamplingParams(max_tokens=1))
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ('engine = "onnx"\n', "missing required key `models[0].path` (the .onnx file"),
        ('engine = "onnx"\npath = "m.onnx"\nproviders = ["Cuda"]\n', "models[0].providers[0]"),
        ('engine = "onnx"\npath = "m.onnx"\nthreads = 2\n', "it is a key of engine = 'llamacpp'"),
        ('engine = "onnx"\npath = "m.onnx"\nmax_concurrency = 0\n', "models[0].max_concurrency"),
    ],
)
def test_bad_onnx_config_names_the_key(tmp_path: Path, model: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_appliance_config(Path(write_config(tmp_path, f'[[models]]\nid = "m"\n{model}')[1]))
    assert message in str(caught.value)


def test_cuda_lane_matches_numpy(tmp_path: Path) -> None:
    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        pytest.skip(
            "ONNX CUDA lane: this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu on a CUDA machine"
        )
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_graph(), path)
    engine = _engine(path, providers=["CUDAExecutionProvider"])
    engine.load()
    try:
        assert engine.capabilities.accelerator == "CUDAExecutionProvider"
        x = RNG.standard_normal((5, 4)).astype(np.float32)
        result = asyncio.run(engine.predict({"x": x}))
        np.testing.assert_allclose(result["probabilities"], mlp_numpy(x)["probabilities"], 1e-4)
    finally:
        engine.close()


# --- one appliance: llama.cpp chat beside two ONNX models ---------------------------------


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    home = tmp_path_factory.mktemp("onnx-home")
    onnx.save(mlp_graph(), home / "mlp.onnx")
    onnx.save(embedder_graph(), home / "embedder.onnx")
    config = "\n".join(
        [
            'node_id = "edge-onnx-1"',
            'region = "eu-west"',
            model_toml(),
            model_toml(
                id=MLP,
                engine="onnx",
                path="mlp.onnx",
                max_elements=MAX_ELEMENTS,
                max_concurrency=2,
                **{"pricing.per_request": PER_REQUEST},
            ),
            model_toml(id=EMBEDDER, engine="onnx", path="embedder.onnx"),
        ]
    )
    with run_appliance(home, config) as running:
        yield running


@pytest.fixture(scope="module")
def member(appliance: Appliance) -> Member:
    admin = admin_of(appliance)
    admin.create_org("lab", ["eu-west"])
    return admin.member("lab", "org_user", "ada@lab.example")


@pytest.fixture(scope="module")
def http(appliance: Appliance, member: Member) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {member.key}"}
    with httpx.Client(base_url=appliance.url, headers=headers, timeout=60) as client:
        yield client


def predict(http: httpx.Client, model: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(f"/api/v1/models/{model}/predict", json=body)


def test_the_mlp_classifier_matches_numpy(http: httpx.Client) -> None:
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    response = predict(http, MLP, {"inputs": [tensor("x", x, "FP32")], "id": "mine-1"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == MLP
    assert answer["id"].startswith("pred-")
    assert answer["request_id"] == "mine-1"
    assert answer["model_version"]
    expected = mlp_numpy(x)
    assert [item["name"] for item in answer["outputs"]] == ["probabilities", "logits"]
    for item in answer["outputs"]:
        assert (item["shape"], item["datatype"]) == ([5, 3], "FP32")
        np.testing.assert_allclose(output(answer, item["name"]), expected[item["name"]], 1e-5)
    np.testing.assert_allclose(output(answer, "probabilities").sum(axis=1), 1.0, 1e-5)
    # The same batch sent flat, one output asked for (KServe's object form).
    flat = {"name": "x", "shape": [5, 4], "datatype": "FP32", "data": x.ravel().tolist()}
    again = predict(http, MLP, {"inputs": [flat], "outputs": [{"name": "logits"}]}).json()
    assert [item["name"] for item in again["outputs"]] == ["logits"]
    np.testing.assert_allclose(output(again, "logits"), expected["logits"], 1e-5)


def test_the_embedding_model_matches_numpy(http: httpx.Client) -> None:
    ids = RNG.integers(0, len(WORDS), (3, 7))
    types = RNG.integers(0, 2, (3, 7))
    body = {
        "inputs": [tensor("ids", ids, "INT64"), tensor("token_type_ids", types, "INT64")],
        "outputs": ["embedding"],
    }
    response = predict(http, EMBEDDER, body)
    assert response.status_code == 200, response.text
    embedding = output(response.json(), "embedding")
    assert embedding.shape == (3, 6)
    np.testing.assert_allclose(embedding, embedder_numpy(ids, types), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, 1e-5)


X_2x4 = {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}
IDS = {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [[1, 2, 3]]}
TYPES = {"name": "token_type_ids", "shape": [1, 3], "datatype": "INT64", "data": [0, 1, 0]}
BAD_REQUESTS = {
    "unknown input": (MLP, [X_2x4 | {"name": "features"}], "unknown_input", "`x` FP32 [batch, 4]"),
    "missing input": (EMBEDDER, [IDS], "missing_input", "`token_type_ids` INT64 [batch, tokens]"),
    "wrong width": (MLP, [X_2x4 | {"shape": [2, 5]}], "shape_mismatch", "[batch, 4]; got [2, 5]"),
    "wrong rank": (MLP, [X_2x4 | {"shape": [8]}], "shape_mismatch", "has shape [batch, 4]"),
    "tokens differ": (
        EMBEDDER,
        [IDS, TYPES | {"shape": [1, 2], "data": [0, 1]}],
        "shape_mismatch",
        "`tokens` is 3 in `ids` but 2 in `token_type_ids`",
    ),
    "wrong dtype": (MLP, [X_2x4 | {"datatype": "INT64"}], "dtype_mismatch", "is FP32; got INT64"),
    "ragged": (
        MLP,
        [X_2x4 | {"data": [[1, 2, 3, 4], [1, 2, 3]]}],
        "invalid_tensor",
        "ragged",
    ),
    "short data": (MLP, [X_2x4 | {"data": [1.0] * 7}], "invalid_tensor", "holds 7 values"),
    "not numbers": (MLP, [X_2x4 | {"data": ["1"] * 8}], "invalid_tensor", "numbers only"),
    "fractions as ids": (
        EMBEDDER,
        [IDS | {"data": [1.5, 2, 3]}, TYPES],
        "invalid_tensor",
        "integers only",
    ),
    "too many elements": (
        MLP,
        [X_2x4 | {"shape": [MAX_ELEMENTS, 4]}],
        "invalid_tensor",
        f"more than {MAX_ELEMENTS} elements",
    ),
    "id out of the table": (
        EMBEDDER,
        [IDS | {"data": [1, 2, 999]}, TYPES],
        "invalid_tensor",
        "refused the inputs",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_inputs_that_do_not_fit_the_graph_are_400(http: httpx.Client, case: str) -> None:
    model, inputs, code, fragment = BAD_REQUESTS[case]
    response = predict(http, model, {"inputs": inputs})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", code)
    assert fragment in error["message"]


def test_other_refusals_are_openai_shaped(appliance: Appliance, http: httpx.Client) -> None:
    unknown_output = predict(http, MLP, {"inputs": [X_2x4], "outputs": ["scores"]})
    assert unknown_output.json()["error"]["code"] == "unknown_output"
    assert "`probabilities` FP32 [batch, 3]" in unknown_output.json()["error"]["message"]
    misspelt = predict(http, MLP, {"input": [X_2x4]})
    assert misspelt.status_code == 400
    chat_model = predict(http, DEFAULT_MODEL_ID, {"inputs": [X_2x4]})
    assert chat_model.status_code == 400
    assert chat_model.json()["error"]["code"] == "unsupported_parameter"
    absent = predict(http, "no-such-model", {"inputs": [X_2x4]})
    assert absent.json()["error"]["code"] == "model_not_found"
    anonymous = httpx.post(f"{appliance.url}/api/v1/models/{MLP}/predict", json={"inputs": []})
    assert anonymous.status_code == 401


def test_chat_beside_predictions_each_with_its_own_metrics(
    appliance: Appliance, http: httpx.Client, member: Member
) -> None:
    client = openai.OpenAI(base_url=appliance.v1, api_key=member.key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="predict"):
        client.chat.completions.create(model=MLP, messages=[{"role": "user", "content": "hi"}])
    before = appliance.metric("palisade_generations_total", model=MLP, reason="stop")
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert chat.choices[0].message.content
    assert predict(http, MLP, {"inputs": [X_2x4]}).status_code == 200
    assert appliance.metric("palisade_generations_total", model=MLP, reason="stop") == before + 1
    assert appliance.metric("palisade_generations_total", model=DEFAULT_MODEL_ID) >= 1
    assert appliance.metric("palisade_completion_tokens_total", model=DEFAULT_MODEL_ID) >= 1
    assert appliance.metric("palisade_model_ready", model=MLP) == 1
    assert appliance.metric("palisade_model_ready", model=EMBEDDER) == 1
    endpoint = "/api/v1/models/{id}/predict"
    assert appliance.metric("palisade_requests_total", endpoint=endpoint, status="200") >= 1


def test_models_list_and_receipt_name_the_execution_provider(http: httpx.Client) -> None:
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    for model in (MLP, EMBEDDER):
        assert cards[model]["engine"] == "onnx"
        assert cards[model]["accelerator"] == "CPUExecutionProvider"
        assert cards[model]["capabilities"] == ["predict"]
        assert cards[model]["sha256"]
    assert "predict" not in cards[DEFAULT_MODEL_ID]["capabilities"]
    response = predict(http, MLP, {"inputs": [X_2x4]})
    assert response.headers["X-Palisade-Device"] == "cpu/CPUExecutionProvider"
    assert response.headers["X-Palisade-Region"] == "eu-west"


def test_a_prediction_is_metered_and_audited_as_one_request(
    appliance: Appliance, http: httpx.Client
) -> None:
    admin = admin_of(appliance)

    def mlp_usage() -> dict[str, Any]:
        rows = admin.ok("GET", "/admin/v1/usage", org="lab", group_by="model")["rows"]
        return next((row for row in rows if row["group"] == MLP), {"requests": 0, "cost": 0})

    before = mlp_usage()
    ok = predict(http, MLP, {"inputs": [X_2x4]})
    refused = predict(http, MLP, {"inputs": [X_2x4 | {"shape": [2, 5]}]})
    assert (ok.status_code, refused.status_code) == (200, 400)
    after = wait_for(lambda: (usage := mlp_usage())["requests"] > before["requests"] and usage)
    assert after["requests"] == before["requests"] + 1  # a refused input costs nothing
    assert (after["input_tokens"], after["output_tokens"]) == (0, 0)
    assert after["cost"] == pytest.approx(before["cost"] + PER_REQUEST)

    def audit_row() -> dict[str, Any] | None:
        export = admin.ok("GET", "/admin/v1/audit/export", org="lab")["export"]["entries"]
        rows = [json.loads(entry["entry"]) for entry in export]
        return next(
            (row for row in rows if row.get("id") == ok.json()["id"] and row["status"] == "ok"),
            None,
        )

    row = wait_for(audit_row)
    assert (row["model"], row["input_tokens"], row["output_tokens"]) == (MLP, 0, 0)
    assert row["model_version"] == ok.json()["model_version"]
