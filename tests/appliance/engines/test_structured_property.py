"""The structured-output property: for JSON schemas generated within the supported subset,
every output of the real llama.cpp engine (in process, the default GGUF) validates
against its schema (`jsonschema`, formats checked), at temperature 0 and at 1, and ends
because the grammar was complete ("stop"), not cut off. As a response format, and as a
tool's parameters (a required call, read back through the tool-call reader).

Each example is a batch of schemas generated together and decoded at once (the engine
batches them), so the property covers many schemas in one engine pass. Schemas are
bounded (maxLength, maxItems, no maps or recursion) and `max_tokens` is computed from
each schema's longest document, so "length" can only mean a broken grammar.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import string
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from appliance._private.engines.base import (
    ChoiceDelta,
    EngineContext,
    Finish,
    RequestFeatures,
    SamplingParams,
)
from appliance._private.engines.llamacpp.config import LlamaCppModel
from appliance._private.engines.llamacpp.engine import LlamaCppEngine
from appliance._private.http.rendering import ChoiceAnswer
from tests.conftest import MODEL
from tests.support import default_model_path

pytestmark = pytest.mark.slow

SCHEMAS_PER_BATCH = 8
# Each tool schema makes its own system prompt (no shared prefix to reuse): fewer per batch.
TOOL_SCHEMAS_PER_BATCH = 4
ENVELOPE = 64  # a tool call's `{"tool_calls": [{"name": "record", "arguments": ...}]}`
TEMPERATURES = (0.0, 1.0)
NAMES = ("name", "age", "city", "tags", "ok", "kind", "when", "id", "score", "note", "size")
TEXT = st.text(alphabet=string.ascii_letters + " é-", max_size=5)
SCALARS = st.one_of(TEXT, st.integers(-99, 999), st.booleans(), st.none())

# --- the strategy: schemas within the supported subset, each with a bounded longest document


@st.composite
def strings(draw: st.DrawFn) -> dict[str, Any]:
    most = draw(st.integers(1, 10))
    schema: dict[str, Any] = {"type": "string", "maxLength": most}
    if draw(st.booleans()):
        schema["minLength"] = draw(st.integers(0, min(2, most)))
    if draw(st.booleans()):
        schema["type"] = ["string", "null"]
    return schema


@st.composite
def integers(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    least = draw(st.none() | st.integers(-50, 50))
    if least is not None:
        schema["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = least
    if draw(st.booleans()):
        schema["maximum"] = (least or 0) + draw(st.integers(1, 300))
    return schema


# Patterns, with the length of their longest match.
PATTERNS = {
    r"^[A-Z]{2}-[0-9]{3}$": 6,
    r"^[a-z]{1,5}( [a-z]{1,5})?$": 11,
    r"^\d{1,4}(\.\d{1,2})?$": 7,
    r"^(yes|no|maybe)$": 5,
    r"[^ ]{3}": 3,
}


@st.composite
def numbers(draw: st.DrawFn) -> dict[str, Any]:
    least = draw(st.integers(-5, 5))
    return {"type": "number", "minimum": least, "maximum": least + draw(st.integers(0, 10))}


@st.composite
def literals(draw: st.DrawFn) -> dict[str, Any]:
    values = draw(st.lists(SCALARS, min_size=1, max_size=4, unique_by=json.dumps))
    return {"const": values[0]} if len(values) == 1 and draw(st.booleans()) else {"enum": values}


LEAVES = st.one_of(
    strings(),
    integers(),
    numbers(),
    st.sampled_from(sorted(PATTERNS)).map(lambda pattern: {"type": "string", "pattern": pattern}),
    literals(),
    st.sampled_from(
        [
            {"type": "number"},
            {"type": "boolean"},
            {"type": "null"},
            {"type": "string", "format": "date"},
            {"type": "string", "format": "date-time"},
            {"type": "string", "format": "time"},
            {"type": "string", "format": "uuid"},
            {"type": ["integer", "boolean"]},
        ]
    ),
)


@st.composite
def objects(draw: st.DrawFn, members: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {name: draw(members) for name in names},
        "required": [name for name in names if draw(st.booleans())],
    }
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


@st.composite
def arrays(draw: st.DrawFn, items: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    most = draw(st.integers(0, 3))
    return {
        "type": "array",
        "items": draw(items),
        "minItems": draw(st.integers(0, most)),
        "maxItems": most,
    }


@st.composite
def tagged(draw: st.DrawFn, members: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A discriminated `oneOf`: objects told apart by a required `kind` const."""
    alternatives = []
    for tag in ("a", "b"):
        body = draw(objects(members))
        body["properties"]["kind"] = {"const": tag}
        body["required"] = list(dict.fromkeys(["kind", *body["required"]]))
        alternatives.append(body)
    return {"oneOf": alternatives}


def nested(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        objects(children),
        arrays(children),
        st.lists(children, min_size=2, max_size=2).map(lambda options: {"anyOf": options}),
    )


MEMBERS = st.one_of(LEAVES, nested(LEAVES))


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A top-level object schema, sometimes with its parts in `$defs` behind `$ref`s."""
    schema: dict[str, Any] = draw(st.one_of(objects(MEMBERS), tagged(LEAVES)))
    if "properties" in schema and draw(st.booleans()):
        name = next(iter(schema["properties"]))
        schema["$defs"] = {"Part": schema["properties"][name]}
        schema["properties"][name] = {"$ref": "#/$defs/Part", "description": "the part"}
    return schema


def longest(schema: Any, root: dict[str, Any]) -> int:
    """An upper bound on the characters of any document the grammar allows for `schema`
    (six per string character: a `\\uXXXX` escape or a 4-byte character's tokens)."""
    if "$ref" in schema:
        return longest(root["$defs"][schema["$ref"].rsplit("/", 1)[1]], root)
    if "anyOf" in schema or "oneOf" in schema:
        return max(longest(option, root) for option in schema.get("anyOf") or schema["oneOf"])
    if "const" in schema or "enum" in schema:
        return max(
            len(json.dumps(value, ensure_ascii=False)) * 6
            for value in schema.get("enum", [schema.get("const")])
        )
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return max(_longest_of(kind, schema, root) for kind in kinds)


def _longest_of(kind: str, schema: dict[str, Any], root: dict[str, Any]) -> int:
    if kind == "object":
        members = schema["properties"].items()
        return 4 + sum(len(name) + 8 + longest(member, root) for name, member in members)
    if kind == "array":
        return 4 + int(schema["maxItems"]) * (3 + longest(schema["items"], root))
    if kind == "string" and "pattern" in schema:
        return 2 + 6 * PATTERNS[schema["pattern"]]
    if kind == "string":
        return 40 if "format" in schema else 2 + 6 * int(schema["maxLength"])
    return {"integer": 17, "number": 33, "boolean": 5, "null": 4}[kind]


# --- validation: jsonschema, with the formats it checks only given extra packages -------

FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    return not isinstance(value, str) or bool(datetime.datetime.fromisoformat(value).tzinfo)


@FORMATS.checks("time", raises=ValueError)
def _time(value: object) -> bool:
    return not isinstance(value, str) or bool(datetime.time.fromisoformat(value).tzinfo)


def check(document_text: str, schema: dict[str, Any], where: str) -> None:
    try:
        document = json.loads(document_text)
        jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(document)
    except (ValueError, jsonschema.ValidationError) as error:
        pytest.fail(f"{where}: {error}")


# --- the engine -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    path = default_model_path()
    config = LlamaCppModel(
        id=MODEL,
        path=str(path),
        context_length=1024,
        max_sequences=SCHEMAS_PER_BATCH * len(TEMPERATURES),
        threads=1,  # on a shared machine, two spinning threads run many times slower
    )
    engine = LlamaCppEngine(
        config, EngineContext(home=path.parent, path=path, on_finish=lambda *_: None)
    )
    engine.load()
    yield engine
    engine.close()


def response_format(schema: dict[str, Any]) -> RequestFeatures:
    wrapped = {"name": "answer", "schema": schema, "strict": True}
    return RequestFeatures(response_format={"type": "json_schema", "json_schema": wrapped})


def required_call(schema: dict[str, Any]) -> RequestFeatures:
    tool = {"type": "function", "function": {"name": "record", "parameters": schema}}
    return RequestFeatures(tools=[tool], tool_choice="required")


async def generate(
    engine: LlamaCppEngine, schema: dict[str, Any], features: RequestFeatures, temperature: float
) -> tuple[ChoiceAnswer, Finish]:
    # The grammar, not the prompt, makes the output valid: a short prompt keeps the
    # prefill cheap (a tool's schema is in the system message the tools add anyway).
    messages = [{"role": "user", "content": "Fill in the record, in JSON."}]
    params = SamplingParams(
        max_tokens=longest(schema, schema) + ENVELOPE,
        temperature=temperature,
        seed=7,
        features=features,
    )
    generation = engine.submit(await engine.prepare_chat(messages, features), params)
    answer = ChoiceAnswer()
    async for piece in generation.pieces():
        for item in [piece] if isinstance(piece, str) else piece:
            answer.add(ChoiceDelta(0, item) if isinstance(item, str) else item)
    assert generation.finish is not None
    return answer, generation.finish


def run_batch(
    engine: LlamaCppEngine, jobs: list[tuple[dict[str, Any], RequestFeatures, float]]
) -> list[tuple[ChoiceAnswer, Finish]]:
    async def together() -> list[tuple[ChoiceAnswer, Finish]]:
        return await asyncio.gather(*(generate(engine, *job) for job in jobs))

    return asyncio.run(together())


def batches(
    schemas: st.SearchStrategy[dict[str, Any]], size: int
) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Distinct schemas, decoded together (so even the simplest example is varied)."""
    return st.lists(schemas, min_size=size, max_size=size, unique_by=json.dumps)


BOUNDED = settings(
    max_examples=2,
    deadline=None,
    derandomize=True,  # the same schemas on every run (and no example database)
    database=None,
    phases=[Phase.generate],  # no shrinking: each example is a whole engine pass
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@settings(BOUNDED, max_examples=3)  # cheap: every sequence shares one short prompt
@given(schemas=batches(documents(), SCHEMAS_PER_BATCH))
def test_every_output_under_a_response_format_validates(
    engine: LlamaCppEngine, schemas: list[dict[str, Any]]
) -> None:
    jobs = [(schema, response_format(schema), t) for schema in schemas for t in TEMPERATURES]
    for (schema, _, temperature), (answer, finish) in zip(
        jobs, run_batch(engine, jobs), strict=True
    ):
        where = f"at temperature {temperature}, schema {json.dumps(schema)}: {answer.text!r}"
        assert (answer.reason(finish.reason), finish.reason) == ("stop", "stop"), where
        check(answer.text, schema, where)


@BOUNDED
@given(schemas=batches(objects(MEMBERS), TOOL_SCHEMAS_PER_BATCH))
def test_every_required_call_has_arguments_that_validate(
    engine: LlamaCppEngine, schemas: list[dict[str, Any]]
) -> None:
    jobs = [(schema, required_call(schema), t) for schema in schemas for t in TEMPERATURES]
    for (schema, _, temperature), (answer, finish) in zip(
        jobs, run_batch(engine, jobs), strict=True
    ):
        calls = answer.calls()
        where = f"at temperature {temperature}, schema {json.dumps(schema)}: {calls}"
        assert answer.reason(finish.reason) == "tool_calls", where
        assert [call["function"]["name"] for call in calls] == ["record"], where
        check(calls[0]["function"]["arguments"], schema, where)
