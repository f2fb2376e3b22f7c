"""Every way out of an admitted request settles it exactly once, at the router and on an
appliance: the reservation comes back and one usage record holds the right counts. The
router's store is SQLite, then PostgreSQL (budgets admitted against its slices there).

A real router and real appliances: three front stand-in upstreams (whose `/control`
injects errors and latency), one runs the default llama.cpp model. Each test uses its own
org, so its budget and usage records are its own.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from appliance import DEFAULT_MODEL_ID
from router._private.postgres import PostgresCluster
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, llama_toml, running_fleet, upstream_toml
from tests.e2e.routers import passing, shared_store
from tests.federation.tenants import BACKENDS, Admin, admin_of
from tests.support import Server, wait_for

PROMPT = "one two three"  # the stand-in counts 3 prompt tokens
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
# What an upstream appliance reports for MESSAGES before the upstream has counted them:
# its bound, UTF-8 bytes plus 8 per message (`upstream._MESSAGE_OVERHEAD`).
PROMPT_BOUND = len(PROMPT.encode()) + 8
LLAMA_MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Count from one to one hundred, one number per line."}
]


@pytest.fixture(scope="module", params=BACKENDS)
def fleet(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Fleet]:
    """The same fleet with the router's store on SQLite and on PostgreSQL (its password in a
    passfile named by PGPASSFILE, which the router inherits)."""
    root = tmp_path_factory.mktemp(f"metering-{request.param}")
    with contextlib.ExitStack() as stack:
        router_args: tuple[str, ...] = ()
        if request.param == "postgresql":
            cluster: PostgresCluster = request.getfixturevalue("postgres")
            store = shared_store(cluster, root, f"metering_{next(_databases)}")
            stack.enter_context(passing(store))
            router_args = ("--database", store.url)
        running = stack.enter_context(running_fleet(root, *router_args))
        steady = running.standin("steady", tokens=8)
        narrow = running.standin("narrow", tokens=40, token_ms=100)
        doomed = running.standin("doomed", tokens=400, token_ms=50)
        running.start_member("eu-1", "eu-west", upstream_toml(steady, "rdu"))
        # One request at a time, none waiting: a second one meets a full queue.
        running.start_member(
            "no-1", "eu-north", upstream_toml(narrow, "gpu", max_concurrency=1, max_queue=0)
        )
        running.start_member("us-1", "us-east", upstream_toml(doomed, "gpu"))
        running.start_member("cpu-1", "eu-central", llama_toml(device_class="cpu"))
        running.wait_joined("eu-1", "no-1", "us-1", "cpu-1", timeout=180)
        yield running


_databases = itertools.count()


_OPEN: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    """Every client a test made is closed when it ends (no socket left to the collector)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


@dataclass
class Tenant:
    """An org of its own, its org_admin's key, and the books the router keeps for it."""

    admin: Admin
    name: str
    key: str
    base_url: str

    def client(self, **options: Any) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.base_url, api_key=self.key, max_retries=0, **options)
        _OPEN.append(client)
        return client

    def budget(self) -> dict[str, Any]:
        budget: dict[str, Any] = self.admin.ok("GET", f"/admin/v1/orgs/{self.name}/budget")
        return budget

    def records(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.admin.ok("GET", "/admin/v1/usage/records", org=self.name)[
            "data"
        ]
        return data

    def settled(self, count: int = 1) -> list[dict[str, Any]]:
        """Once nothing is reserved any more: the org's records, exactly `count` of them."""
        wait_for(lambda: self.budget()["reserved_tokens"] == 0, timeout=30)
        wait_for(lambda: len(self.records()) >= count, timeout=30)
        records = self.records()
        assert len(records) == count, records
        budget = self.budget()
        assert budget["reserved_tokens"] == 0
        assert budget["used_tokens"] == sum(r["input_tokens"] + r["output_tokens"] for r in records)
        return records


def tenant(
    fleet: Fleet, name: str, regions: list[str], budget: int | None = None, *, at: str = ""
) -> Tenant:
    """A new org in `regions`, managed at the router (or, with `at`, at that appliance)."""
    admin = fleet.admin if not at else admin_of(fleet.members[at])
    admin.create_org(name, regions, budget=budget)
    member = admin.member(name, "org_admin", f"owner@{name}.test")
    url = fleet.router.v1 if not at else fleet.members[at].v1
    return Tenant(admin, name, member.key, url)


def only(records: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(records) == 1, records
    return records[0]


def drain(
    stream: Iterable[ChatCompletionChunk], each: Callable[[list[str]], None] | None = None
) -> tuple[list[str], openai.APIError | None]:
    """The texts read from `stream` until it ends, and the error that ended it, if any;
    `each` sees the texts so far after every chunk."""
    texts: list[str] = []
    try:
        for chunk in stream:
            texts.extend(c.delta.content for c in chunk.choices if c.delta.content)
            if each is not None:
                each(texts)
    except openai.APIError as exc:
        return texts, exc
    return texts, None


def errors_logged(server: Server) -> list[str]:
    return [line for line in server.output if line.startswith("ERROR") or "Traceback" in line]


# --- completed requests ----------------------------------------------------------------


def test_completed_requests_settle_their_real_counts(fleet: Fleet) -> None:
    acme = tenant(fleet, "done", ["eu-west"])
    client = acme.client()
    reply = client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES)
    assert reply.usage is not None
    streamed = list(
        client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, stream=True)
    )
    assert streamed[-1].choices[0].finish_reason == "stop"
    records = acme.settled(count=2)
    assert [(r["input_tokens"], r["output_tokens"], r["status"]) for r in records] == [
        (3, 8, "ok"),
        (3, 8, "ok"),
    ]


def test_embeddings_through_the_router_settle_their_prompt_tokens(fleet: Fleet) -> None:
    acme = tenant(fleet, "embed", ["eu-west"])
    reply = acme.client().embeddings.create(
        model=UPSTREAM_MODEL, input=["alpha beta gamma", "delta epsilon"]
    )
    assert reply.usage.prompt_tokens == 5
    record = only(acme.settled())
    assert (record["input_tokens"], record["output_tokens"], record["status"]) == (5, 0, "ok")


# --- failures on the node's side -----------------------------------------------------------


def test_a_node_error_before_the_first_byte_releases_the_reservation(fleet: Fleet) -> None:
    acme = tenant(fleet, "early", ["eu-west"])
    steady = fleet.standins["steady"]
    steady.control(fail_status=500, fail_code="overheated")
    try:
        client = acme.client()
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES)
        assert failed.value.status_code == 502
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, stream=True)
        assert failed.value.status_code == 502  # an upstream node answers before its 200
    finally:
        steady.control(fail_status=None, fail_code=None)
    records = acme.settled(count=2)
    assert {(r["input_tokens"], r["output_tokens"], r["status"]) for r in records} == {
        (0, 0, "http_502")
    }


def test_a_node_error_mid_stream_bills_what_was_streamed(fleet: Fleet) -> None:
    acme = tenant(fleet, "midway", ["eu-west"])
    steady = fleet.standins["steady"]
    steady.control(fail_after_tokens=3)
    try:
        stream = acme.client().chat.completions.create(
            model=UPSTREAM_MODEL, messages=MESSAGES, stream=True
        )
        texts, error = drain(stream)
    finally:
        steady.control(fail_after_tokens=None)
    assert error is not None
    assert "".join(texts) == " tok0 tok1 tok2"
    record = only(acme.settled())
    assert record["status"] == "error"
    # The node's error event carries no usage: its prompt bound and the text events relayed.
    assert (record["input_tokens"], record["output_tokens"]) == (PROMPT_BOUND, 3)


def test_a_node_killed_mid_stream_bills_what_was_streamed(fleet: Fleet) -> None:
    acme = tenant(fleet, "killed", ["us-east"])
    stream = acme.client().chat.completions.create(
        model=UPSTREAM_MODEL, messages=MESSAGES, stream=True
    )

    def kill_at_third(texts: list[str]) -> None:
        if len(texts) == 3:
            fleet.members["us-1"].process.send_signal(signal.SIGKILL)

    texts, error = drain(stream, kill_at_third)
    assert error is not None
    assert error.code == "backend_failed"
    assert len(texts) >= 3
    record = only(acme.settled())
    assert record["status"] == "backend_failed"
    assert record["input_tokens"] == PROMPT_BOUND
    assert 3 <= record["output_tokens"] < 400


def test_a_full_queue_releases_the_reservation(fleet: Fleet) -> None:
    acme = tenant(fleet, "queued", ["eu-north"])
    client = acme.client()
    holder = client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, stream=True)
    next(iter(holder))  # the node's one upstream slot is now taken
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES)
    assert (refused.value.status_code, refused.value.code) == (503, "queue_full")
    list(holder)
    records = acme.settled(count=2)
    assert sorted((r["status"], r["input_tokens"], r["output_tokens"]) for r in records) == [
        ("http_503", 0, 0),
        ("ok", 3, 40),
    ]


def test_no_node_in_the_org_regions_releases_the_reservation(fleet: Fleet) -> None:
    acme = tenant(fleet, "stranded", ["ap-south"])  # the model is served, never there
    with pytest.raises(openai.APIStatusError) as refused:
        acme.client().chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES)
    assert (refused.value.status_code, refused.value.code) == (503, "no_backend_in_region")
    record = only(acme.settled())
    assert (record["status"], record["input_tokens"], record["output_tokens"]) == (
        "no_backend_in_region",
        0,
        0,
    )


# --- the client's side ------------------------------------------------------------------------


def test_a_body_the_router_cannot_forward_is_a_400_and_takes_nothing(fleet: Fleet) -> None:
    acme = tenant(fleet, "garbled", ["eu-west"], budget=100_000)
    head = b'{"model": "%s", "stream": true, "messages": [{"role": "user", "content": "hi"}]'
    unreadable = ((b', "zz": 1e99999}', "invalid_value"), (b', "zz": "\xff\xfe"}', "invalid_json"))
    for extra, code in unreadable:
        reply = httpx.post(
            f"{acme.base_url}/chat/completions",
            content=head % UPSTREAM_MODEL.encode() + extra,
            headers={"Authorization": f"Bearer {acme.key}", "Content-Type": "application/json"},
            timeout=30,
        )
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == code
    assert acme.budget()["reserved_tokens"] == 0
    assert acme.records() == []  # refused before admission: nothing to settle


def test_a_client_gone_mid_body_is_a_499_not_an_error(fleet: Fleet) -> None:
    acme = tenant(fleet, "halfway", ["eu-west"])
    router = fleet.router
    gone_before = router.metric("palisade_router_requests_total", endpoint="chat", status="499")
    url = httpx.URL(router.url)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\n"
        f"Authorization: Bearer {acme.key}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    assert url.port is not None
    with socket.create_connection((url.host, url.port), timeout=10) as client:
        client.sendall(head.encode() + b'{"model": "')  # and hangs up, 990 bytes short
    wait_for(
        lambda: (
            router.metric("palisade_router_requests_total", endpoint="chat", status="499")
            > gone_before
        ),
        timeout=10,
    )
    assert acme.records() == []  # never admitted
    assert errors_logged(router) == []


def test_a_client_gone_before_the_first_byte_is_settled_once(fleet: Fleet) -> None:
    acme = tenant(fleet, "impatient", ["eu-west"])
    steady = fleet.standins["steady"]
    # The node answers after the client has given up, and is still generating when the
    # router sees that nobody is listening any more.
    steady.control(ttft_ms=1500, tokens=40, token_ms=100)
    try:
        with pytest.raises(openai.APITimeoutError):
            acme.client(timeout=0.5).chat.completions.create(
                model=UPSTREAM_MODEL, messages=MESSAGES, stream=True
            )
        record = only(acme.settled())
    finally:
        steady.control(ttft_ms=0, tokens=8, token_ms=0)
    assert record["status"] == "cancelled"
    assert record["input_tokens"] == PROMPT_BOUND  # the node took the prompt in
    assert record["output_tokens"] <= 2


def test_a_client_gone_before_a_non_streaming_answer_is_billed_the_answer(fleet: Fleet) -> None:
    acme = tenant(fleet, "hungup", ["eu-west"])
    steady = fleet.standins["steady"]
    router = fleet.router
    gone_before = router.metric("palisade_router_requests_total", endpoint="chat", status="499")
    steady.control(ttft_ms=1500)
    try:
        with pytest.raises(openai.APITimeoutError):
            acme.client(timeout=0.5).chat.completions.create(
                model=UPSTREAM_MODEL, messages=MESSAGES
            )
        record = only(acme.settled())
    finally:
        steady.control(ttft_ms=0)
    # The node answered in full after the client had gone: that work is billed, so hanging
    # up just before the answer never makes a request free.
    assert (record["status"], record["input_tokens"], record["output_tokens"]) == ("ok", 3, 8)
    wait_for(
        lambda: (
            router.metric("palisade_router_requests_total", endpoint="chat", status="499")
            > gone_before
        ),
        timeout=10,
    )


def test_a_client_gone_mid_stream_is_billed_its_prompt_and_what_it_read(fleet: Fleet) -> None:
    budget = 30_000
    acme = tenant(fleet, "leaver", ["eu-west"], budget=budget)
    steady = fleet.standins["steady"]
    router = fleet.router
    gone_before = router.metric("palisade_router_requests_total", endpoint="chat", status="499")
    cancelled_before = steady.stats()["streams_cancelled"]
    steady.control(tokens=200, token_ms=50)
    try:
        stream = acme.client().chat.completions.create(
            model=UPSTREAM_MODEL, messages=MESSAGES, stream=True
        )
        received = 0
        for chunk in stream:
            received += sum(1 for c in chunk.choices if c.delta.content)
            if received == 4:
                break
        stream.close()
        record = only(acme.settled())
        # The router let go of the node, which let go of its upstream: generation stopped.
        wait_for(lambda: steady.stats()["streams_cancelled"] > cancelled_before, timeout=10)
    finally:
        steady.control(tokens=8, token_ms=0)
    assert record["status"] == "cancelled"
    assert record["input_tokens"] == PROMPT_BOUND
    assert 4 <= record["output_tokens"] < 200
    wait_for(
        lambda: (
            router.metric("palisade_router_requests_total", endpoint="chat", status="499")
            > gone_before
        ),
        timeout=10,
    )
    assert errors_logged(router) == []
    # Nothing stays reserved: a request that needs the whole rest of the budget still fits.
    left = budget - acme.budget()["used_tokens"]
    body = _body_needing(left)
    reply = httpx.post(
        f"{acme.base_url}/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {acme.key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text


def _body_needing(tokens: int) -> bytes:
    """A chat body the router admits at exactly `tokens` (its length plus max_tokens)."""
    template = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": %d}'
    for digits in range(1, 10):
        max_tokens = tokens - len(template % (UPSTREAM_MODEL, 0)) - (digits - 1)
        body = (template % (UPSTREAM_MODEL, max_tokens)).encode()
        if len(body) + max_tokens == tokens:
            return body
    raise AssertionError(f"no body needs exactly {tokens} tokens")


# --- a local model: exact prompt counts, through the router and on the appliance ----------------


def _leave_after(client: openai.OpenAI, chunks: int) -> None:
    # `ignore_eos`: a sampled answer may end after a few tokens, before the client leaves.
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_ID,
        messages=LLAMA_MESSAGES,
        stream=True,
        max_tokens=200,
        extra_body={"ignore_eos": True},
    )
    received = 0
    for chunk in stream:
        received += sum(1 for c in chunk.choices if c.delta.content)
        if received == chunks:
            break
    stream.close()


def _prompt_tokens(client: openai.OpenAI) -> int:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=LLAMA_MESSAGES, max_tokens=1
    )
    assert reply.usage is not None
    return reply.usage.prompt_tokens


def test_a_stream_cut_short_through_the_router_bills_the_exact_prompt(fleet: Fleet) -> None:
    acme = tenant(fleet, "routed", ["eu-central"])
    client = acme.client(timeout=120)
    prompt = _prompt_tokens(client)
    _leave_after(client, 3)
    cut = next(r for r in acme.settled(count=2) if r["status"] == "cancelled")
    assert cut["input_tokens"] == prompt  # the node's count, from X-Palisade-Prompt-Tokens
    assert 3 <= cut["output_tokens"] < 200


def test_a_stream_cut_short_on_the_appliance_bills_the_prompt_it_read(fleet: Fleet) -> None:
    appliance = fleet.members["cpu-1"]
    acme = tenant(fleet, "local", ["eu-central"], at="cpu-1")
    client = acme.client(timeout=120)
    prompt = _prompt_tokens(client)
    endpoint = "/v1/chat/completions"
    gone_before = appliance.metric("palisade_requests_total", endpoint=endpoint, status="499")
    _leave_after(client, 3)
    cut = next(r for r in acme.settled(count=2) if r["status"] == "cancelled")
    assert cut["input_tokens"] == prompt
    assert 3 <= cut["output_tokens"] < 200
    wait_for(
        lambda: (
            appliance.metric("palisade_requests_total", endpoint=endpoint, status="499")
            > gone_before
        ),
        timeout=10,
    )
    assert errors_logged(appliance) == []


def test_no_exit_was_logged_as_an_error(fleet: Fleet) -> None:
    """Clients leaving, nodes failing and bodies refused are all expected: no ERROR lines."""
    for server in (fleet.router, *fleet.members.values()):
        assert errors_logged(server) == []
