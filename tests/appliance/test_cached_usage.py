"""Cached prompt tokens in usage, usage records, cost and reports.

One real appliance process with tenancy on, asked with a tenant key through the `openai`
SDK: a scripted model whose answers report cached prompt tokens (`cached_tokens`), one that
reports none, and the `openai` engine in front of the stand-in upstream reporting its own
`prompt_tokens_details.cached_tokens`, as vLLM and OpenAI do. All three have a cached-input
price. The appliance runs on each policy store (SQLite, PostgreSQL). The migration of a
SQLite policy database made before usage rows counted cached tokens runs in-process.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import CompletionUsage

from federation import Pricing, TenancyStore
from tests.federation.tenants import BACKENDS, Admin, admin_of, database_toml, policy_database
from tests.standin import RunningStandin, run_standin
from tests.support import Appliance, run_appliance, run_palisade, wait_for

CACHED = "scripted-cached"  # every answer reports CACHED_TOKENS of its prompt as cached
UNCACHED = "scripted-plain"  # reports none
UPSTREAM = "upstream"  # the openai engine; the stand-in reports UPSTREAM_CACHED
CACHED_TOKENS = 4
UPSTREAM_CACHED = 2
ORG = "acme"
PRICING = Pricing(input_per_million=2.0, output_per_million=4.0, cached_input_per_million=0.5)
PROMPT = "please tell me about the weather in Oslo today"  # 9 words: 9 scripted tokens


def _model(model_id: str, **fields: object) -> str:
    lines = [f'id = "{model_id}"']
    lines += [f"{name} = {json.dumps(value)}" for name, value in fields.items()]
    lines += [
        f"pricing.input_per_million = {PRICING.input_per_million}",
        f"pricing.output_per_million = {PRICING.output_per_million}",
        f"pricing.cached_input_per_million = {PRICING.cached_input_per_million}",
    ]
    return "[[models]]\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def standin() -> Iterator[RunningStandin]:
    with run_standin(tokens=3) as running:
        running.control(cached_tokens=UPSTREAM_CACHED)
        yield running


@pytest.fixture(scope="module", params=BACKENDS)
def appliance(
    standin: RunningStandin,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Appliance]:
    database = policy_database(request, request.param)
    home: Path = tmp_path_factory.mktemp(f"cached-usage-{request.param}")
    config = 'node_id = "cached-1"\nregion = "eu-west"\n' + database_toml(database)
    config += "\n" + "\n".join(
        [
            _model(CACHED, engine="scripted", cached_tokens=CACHED_TOKENS, replies=["a b c"]),
            _model(UNCACHED, engine="scripted", replies=["a b c"]),
            _model(
                UPSTREAM,
                engine="openai",
                upstream_url=standin.v1,
                upstream_model="standin-model",
            ),
        ]
    )
    with run_appliance(home, config) as running:
        yield running


@pytest.fixture(scope="module")
def admin(appliance: Appliance) -> Admin:
    wait_for((appliance.home / "admin.key").is_file, timeout=10)
    admin = admin_of(appliance)
    admin.create_org(ORG, ["eu-west"])
    return admin


@pytest.fixture(scope="module")
def client(appliance: Appliance, admin: Admin) -> Iterator[openai.OpenAI]:
    key = admin.member(ORG, "org_admin", "owner@acme.test").key
    with openai.OpenAI(base_url=appliance.v1, api_key=key, max_retries=0, timeout=30) as made:
        yield made


def cached_of(usage: CompletionUsage | None) -> int:
    assert usage is not None
    assert usage.prompt_tokens_details is not None, usage
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    return cached


def chat(client: openai.OpenAI, model: str) -> tuple[str, CompletionUsage, CompletionUsage]:
    """One whole answer and one streamed answer: the whole one's id, both usages."""
    messages: Any = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert whole.usage is not None
    assert chunks[-1].usage is not None
    return whole.id, whole.usage, chunks[-1].usage


def records(admin: Admin, ids: set[str]) -> dict[str, dict[str, Any]]:
    """The org's usage records of the requests `ids`, once they are all there."""

    def found() -> dict[str, dict[str, Any]] | None:
        data = admin.ok("GET", "/admin/v1/usage/records", org=ORG)["data"]
        mine = {r["request_id"]: r for r in data if r["request_id"] in ids}
        return mine if len(mine) == len(ids) else None

    return wait_for(found, timeout=15)


# --- usage in answers ------------------------------------------------------------------------


def test_chat_answers_report_the_cached_prompt_tokens(client: openai.OpenAI) -> None:
    _, whole, streamed = chat(client, CACHED)
    assert whole.prompt_tokens == 9
    assert cached_of(whole) == CACHED_TOKENS
    assert streamed == whole


def test_completions_report_the_cached_prompt_tokens(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=CACHED, prompt=PROMPT, max_tokens=8)
    assert cached_of(whole.usage) == CACHED_TOKENS
    chunks = list(
        client.completions.create(
            model=CACHED,
            prompt=PROMPT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage == whole.usage
    assert cached_of(chunks[-1].usage) == CACHED_TOKENS


def test_a_cached_count_is_at_most_the_prompt(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=CACHED, messages=[{"role": "user", "content": "hi there"}], max_tokens=2
    )
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, cached_of(answer.usage)) == (2, 2)


def test_an_engine_without_a_cache_hit_reports_zero(client: openai.OpenAI) -> None:
    _, whole, streamed = chat(client, UNCACHED)
    assert cached_of(whole) == cached_of(streamed) == 0


def test_the_upstreams_cached_tokens_pass_through(
    client: openai.OpenAI, standin: RunningStandin
) -> None:
    _, whole, streamed = chat(client, UPSTREAM)
    assert whole.prompt_tokens == 9  # the stand-in counts words
    assert cached_of(whole) == cached_of(streamed) == UPSTREAM_CACHED
    completion = client.completions.create(model=UPSTREAM, prompt=PROMPT, max_tokens=3)
    assert cached_of(completion.usage) == UPSTREAM_CACHED


# --- records, cost and reports ---------------------------------------------------------------


def test_usage_records_carry_the_cached_tokens_at_the_cached_price(
    client: openai.OpenAI, admin: Admin
) -> None:
    answers = {model: chat(client, model) for model in (CACHED, UNCACHED, UPSTREAM)}
    found = records(admin, {answer[0] for answer in answers.values()})
    for model, (answer_id, usage, _) in answers.items():
        record = found[answer_id]
        assert record["model"] == model
        assert record["input_tokens"] == usage.prompt_tokens
        assert record["cached_tokens"] == cached_of(usage)
        expected = PRICING.cost(
            usage.prompt_tokens, usage.completion_tokens, cached=cached_of(usage)
        )
        assert record["cost"] == pytest.approx(expected)
    # The cached price made the difference: same counts, cheaper with cached tokens.
    cached, plain = found[answers[CACHED][0]], found[answers[UNCACHED][0]]
    assert (cached["input_tokens"], cached["output_tokens"]) == (
        plain["input_tokens"],
        plain["output_tokens"],
    )
    assert cached["cost"] < plain["cost"]


def test_the_model_card_shows_the_cached_price(client: openai.OpenAI) -> None:
    card = client.models.retrieve(CACHED).model_dump()
    assert card["pricing"]["cached_input_per_million"] == PRICING.cached_input_per_million


def test_usage_reports_sum_the_cached_tokens(
    appliance: Appliance, client: openai.OpenAI, admin: Admin
) -> None:
    chat(client, CACHED)  # at least one cached answer, whichever tests ran before
    report = admin.ok("GET", "/admin/v1/usage", by="model", org=ORG)
    by_model = {row["group"]: row for row in report["rows"]}
    all_records = admin.ok("GET", "/admin/v1/usage/records", org=ORG)["data"]
    for model, row in by_model.items():
        mine = [r for r in all_records if r["model"] == model]
        assert row["cached_tokens"] == sum(r["cached_tokens"] for r in mine)
    assert by_model[CACHED]["cached_tokens"] >= CACHED_TOKENS
    assert by_model[UNCACHED]["cached_tokens"] == 0
    assert report["total"]["cached_tokens"] == sum(r["cached_tokens"] for r in all_records)

    env = {"PALISADE_HOME": str(appliance.home), "PALISADE_URL": appliance.url}
    result = run_palisade("usage", "report", "--by", "model", "--org", ORG, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header[2:4] == ["input_tokens", "cached_tokens"]
    cells = {line.split()[0]: line.split() for line in lines[1:]}
    assert cells[CACHED][3] == str(by_model[CACHED]["cached_tokens"])
    assert cells["total"][3] == str(report["total"]["cached_tokens"])


# --- an older policy database ----------------------------------------------------------------

_OLD_USAGE = """CREATE TABLE usage (
    id INTEGER PRIMARY KEY, at TEXT NOT NULL, org TEXT NOT NULL, user_id TEXT NOT NULL,
    key_id TEXT, model TEXT NOT NULL, region TEXT NOT NULL, node TEXT NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, latency_ms REAL NOT NULL,
    status TEXT NOT NULL, cost REAL NOT NULL, request_id TEXT)"""


def test_a_database_from_before_cached_tokens_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "policy.db"
    with sqlite3.connect(path) as db:
        db.execute(_OLD_USAGE)
        db.execute(
            "INSERT INTO usage VALUES (1, '2026-01-02T00:00:00Z', 'acme', 'u1', NULL, 'm', "
            "'eu-west', 'n1', 10, 5, 1.0, 'ok', 0.5, 'chatcmpl-old')"
        )

    async def read() -> tuple[list[Any], Any]:
        store = await TenancyStore.open(path)
        try:
            old = await store.usage_records("acme")
            report = await store.usage_report("model", "acme", None, None)
        finally:
            await store.close()
        return old, report

    old, report = asyncio.run(read())
    assert [(r.request_id, r.input_tokens, r.cached_tokens) for r in old] == [
        ("chatcmpl-old", 10, 0)
    ]
    assert (report.total.input_tokens, report.total.cached_tokens) == (10, 0)
    asyncio.run(read())  # opening it again migrates nothing twice
