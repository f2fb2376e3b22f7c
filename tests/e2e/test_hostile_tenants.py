"""Hostile tenants against a two-region fleet (issue 11): every way one tenant could crash a
node, slip past metering or escape a limit is answered with the right error, while a
second tenant (another org, its own key) streams on the same node unharmed and no process
dies.

One fleet for the module, every process real: a router, a llama.cpp appliance with the
default model in eu-west and one in us-east (one thread each), and an appliance in eu-west
fronting a slow stand-in upstream (long, cheap streams), all started under umask 022.
After each test every process still runs with the PID it had before it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from appliance import DEFAULT_MODEL_ID
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, llama_toml, running_fleet, upstream_toml
from tests.federation.tenants import Admin
from tests.standin import RunningStandin
from tests.support import Server, wait_for

MODEL = DEFAULT_MODEL_ID
EU, US, STANDIN = "eu-llama", "us-llama", "eu-standin"
REGION = {EU: "eu-west", US: "us-east", STANDIN: "eu-west"}
REGIONS = ["eu-west", "us-east"]
STANDIN_TOKENS = 150  # at 20 ms a token: a three-second stream
STORY = "Write a long story about a lighthouse keeper and a storm."
VICTIM_TOKENS = 200
SLOW_CONNECTIONS = 40


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str


@dataclass
class Hostile:
    """The module's fleet, its tenants, and what the second tenant expects on each node."""

    fleet: Fleet
    configs: dict[str, str]
    mallory: str  # a hostile org_admin, allowed in both regions
    victim: str  # the second tenant: another org, its own key
    solo: dict[str, Answer] = field(default_factory=dict)
    minted: list[str] = field(default_factory=list)

    @property
    def router(self) -> Server:
        return self.fleet.router

    @property
    def admin(self) -> Admin:
        return self.fleet.admin

    def org_key(self, org: str, regions: list[str], budget: int | None = None) -> str:
        self.admin.create_org(org, regions, budget)
        key = self.admin.member(org, "org_admin", f"owner@{org}.test").key
        self.minted.append(key)
        return key

    def client(self, key: str, region: str | None = None) -> openai.OpenAI:
        headers = {"X-Palisade-Regions": region} if region is not None else None
        return openai.OpenAI(
            base_url=self.router.v1, api_key=key, max_retries=0, timeout=120,
            default_headers=headers,
        )  # fmt: skip

    def post(
        self, path: str, key: str, body: bytes | dict[str, Any], region: str | None = None
    ) -> httpx.Response:
        """A raw request through the router (bodies the SDK would never send)."""
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        if region is not None:
            headers["X-Palisade-Regions"] = region
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.router.url}{path}", content=content, headers=headers, timeout=120)

    def servers(self) -> dict[str, Server]:
        return {"router": self.router, **self.fleet.members}

    def pids(self) -> dict[str, int | None]:
        """Each process's PID, None for one that has exited."""
        return {
            name: server.process.pid if server.process.poll() is None else None
            for name, server in self.servers().items()
        }

    def revive(self) -> None:
        """Restart a member an earlier test killed, so that one failure does not cascade."""
        dead = [n for n, member in self.fleet.members.items() if member.process.poll() is not None]
        with umask(0o022):
            for node in dead:
                self.fleet.start_member(node, REGION[node], self.configs[node])
        if dead:
            self.fleet.wait_joined(*dead)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


class TenantStream(threading.Thread):
    """One streamed chat completion through the router, read as raw SSE in a thread."""

    def __init__(self, router: Server, key: str, body: dict[str, Any], region: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{router.url}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {key}", "X-Palisade-Regions": region}
        self.body = body | {"stream": True}
        self.text = ""
        self.finish_reason: str | None = None
        self.done = False
        self.error: str | None = None
        self.node: str | None = None
        self.chunks = 0
        self.last_at = 0.0

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", self.url, json=self.body, headers=self.headers, timeout=120
            ) as response:
                self.node = response.headers.get("x-palisade-node")
                if response.status_code != 200:
                    self.error = f"HTTP {response.status_code}: {response.read()!r}"
                    return
                for line in response.iter_lines():
                    self._take(line)
        except httpx.HTTPError as exc:
            self.error = repr(exc)

    def _take(self, line: str) -> None:
        if not line.startswith("data: "):
            return
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            self.done = True
            return
        event = json.loads(payload)
        if "error" in event:
            self.error = str(event["error"])
            return
        for choice in event.get("choices", []):
            self.text += choice["delta"].get("content") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.chunks += 1
        self.last_at = time.monotonic()

    def answer(self) -> Answer:
        assert self.error is None, self.error
        assert self.done, "the stream ended without data: [DONE]"
        assert self.finish_reason is not None
        return Answer(self.text, self.finish_reason)


def victim_body(node: str) -> dict[str, Any]:
    if node == STANDIN:
        return {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "Go on."}]}
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": STORY}],
        "max_tokens": VICTIM_TOKENS,
        "temperature": 0,
    }


def streams_alone(hostile: Hostile, *nodes: str) -> dict[str, Answer]:
    """The victim's answer on each node, with nothing else running there."""
    streams = {
        node: TenantStream(hostile.router, hostile.victim, victim_body(node), REGION[node])
        for node in nodes
    }
    for stream in streams.values():
        stream.start()
    for node, stream in streams.items():
        stream.join(timeout=300)
        assert stream.node == node
    return {node: stream.answer() for node, stream in streams.items()}


@contextlib.contextmanager
def second_tenant(hostile: Hostile, *nodes: str) -> Iterator[None]:
    """The victim's long stream on each of `nodes`, running while the body of the `with`
    does its worst; afterwards each must have outlived the body and ended exactly as it does
    alone."""
    streams = {
        node: TenantStream(hostile.router, hostile.victim, victim_body(node), REGION[node])
        for node in nodes
    }
    for stream in streams.values():
        stream.start()
    try:
        wait_for(
            lambda: all(s.chunks >= 3 or not s.is_alive() for s in streams.values()), timeout=120
        )
        yield
        hostile_done = time.monotonic()
    finally:
        for stream in streams.values():
            stream.join(timeout=300)
    for node, stream in streams.items():
        assert not stream.is_alive()
        assert stream.node == node
        assert stream.answer() == hostile.solo[node]
        assert stream.last_at > hostile_done, f"the stream on {node} ended too early to tell"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    with umask(0o022), running_fleet(root) as fleet:
        standin: RunningStandin = fleet.standin("slow", token_ms=20, tokens=STANDIN_TOKENS)
        configs = {
            EU: llama_toml(threads=1),
            US: llama_toml(threads=1),
            STANDIN: upstream_toml(standin, "gpu"),
        }
        for node, config in configs.items():
            fleet.start_member(node, REGION[node], config)
        fleet.wait_joined(*configs)
        state = Hostile(fleet, configs, mallory="", victim="")
        state.mallory = state.org_key("mallory", REGIONS)
        state.victim = state.org_key("victim", REGIONS)
        state.solo = streams_alone(state, EU, US)
        state.solo[STANDIN] = Answer("".join(f" tok{i}" for i in range(STANDIN_TOKENS)), "stop")
        assert state.solo[EU] == state.solo[US]
        assert state.solo[EU].finish_reason == "length"  # long enough to overlap every test
        yield state


@pytest.fixture(autouse=True)
def nothing_dies(hostile: Hostile) -> Iterator[None]:
    hostile.revive()
    before = hostile.pids()
    assert None not in before.values()
    yield
    assert hostile.pids() == before, "a process died"
    for name, server in hostile.servers().items():
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200, name


# --- helpers --------------------------------------------------------------------------------


def total(server: Server, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    found = 0.0
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        have = set(label_text.rstrip("}").split(",")) if label_text else set()
        if metric == name and {f'{k}="{v}"' for k, v in labels.items()} <= have:
            found += float(value)
    return found


def refusal(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The OpenAI-shaped error of a refused request."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["code"], str), error
    assert error["code"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def usage_records(hostile: Hostile, org: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = hostile.admin.ok("GET", "/admin/v1/usage/records", org=org)["data"]
    return rows


def budget(hostile: Hostile, org: str) -> dict[str, Any]:
    found: dict[str, Any] = hostile.admin.ok("GET", f"/admin/v1/orgs/{org}/budget")
    return found


def chat_statuses(router: Server) -> dict[str, float]:
    """The router's count of chat completions by final status."""
    statuses = ("200", "400", "499", "500", "502", "503")
    name = "palisade_router_requests_total"
    return {status: total(router, name, endpoint="chat", status=status) for status in statuses}


def error_lines(server: Server, since: int) -> list[str]:
    return [line for line in server.output[since:] if line.startswith("ERROR")]


# --- one request must not crash a node, nor be replayed onto the next ------------------------


def test_an_out_of_vocabulary_embedding_is_refused_once_and_never_replayed(
    hostile: Hostile,
) -> None:
    router = hostile.router
    llamas = [hostile.fleet.members[node] for node in (EU, US)]
    embeddings = "/v1/embeddings"
    seen_before = sum(total(m, "palisade_requests_total", endpoint=embeddings) for m in llamas)
    retries_before = total(router, "palisade_router_retries_total")
    client = hostile.client(hostile.mallory)  # both regions: a retry could go to either
    with second_tenant(hostile, EU, US), pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input=[[999999]])
    assert refused.value.code == "invalid_value"
    assert refused.value.param == "input[0][0]"
    assert "`input[0][0]` is 999999, outside" in refused.value.message
    seen = sum(total(m, "palisade_requests_total", endpoint=embeddings) for m in llamas)
    assert seen - seen_before == 1  # one node answered; the other region was never asked
    assert total(router, "palisade_router_retries_total") == retries_before


@pytest.mark.parametrize("prompt", [[999999], [-5]], ids=["huge", "negative"])
def test_out_of_range_completion_prompts_end_no_one_elses_stream(
    hostile: Hostile, prompt: list[int]
) -> None:
    client = hostile.client(hostile.mallory, REGION[EU])
    with second_tenant(hostile, EU):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, stream=stream)
            assert refused.value.code == "invalid_value"
            assert refused.value.param == "prompt[0]"
            assert f"`prompt[0]` is {prompt[0]}, outside" in refused.value.message


@pytest.mark.parametrize(
    ("value", "param"),
    [([[1, 2, 3, 4]], "input[0][0]"), ([[0]], "input[0][0]"), ("", "input"), ([[]], "input[0]")],
    ids=["control-tokens", "endoftext", "empty-string", "empty-ids"],
)
def test_special_and_empty_embedding_inputs_are_400_not_500(
    hostile: Hostile, value: object, param: str
) -> None:
    with second_tenant(hostile, EU):
        body = {"model": MODEL, "input": value}
        error = refusal(hostile.post("/v1/embeddings", hostile.mallory, body, "eu-west"), 400)
    assert (error["code"], error["param"]) == ("invalid_value", param)
    assert f"`{param}` is" in error["message"]


# --- metering: every route, every exit ---------------------------------------------------


def test_embeddings_through_the_router_are_metered_and_a_budget_stops_them(
    hostile: Hostile,
) -> None:
    allowance = 600  # some twenty requests of about twenty tokens, each reserving ~140
    key = hostile.org_key("embedder", ["eu-west"], budget=allowance)
    client = hostile.client(key)
    text = "The keeper climbed the stairs of the lighthouse as the storm came in from the sea."
    served: list[int] = []
    with pytest.raises(openai.RateLimitError) as stopped:  # noqa: PT012 - until the budget ends
        for _ in range(60):
            reply = client.embeddings.create(model=MODEL, input=text)
            served.append(reply.usage.prompt_tokens)
    assert stopped.value.code == "budget_exceeded"
    assert 0 < len(served) < 60
    assert min(served) > 10

    def recorded() -> list[int] | None:
        rows = usage_records(hostile, "embedder")
        return [row["input_tokens"] for row in rows] if len(rows) >= len(served) else None

    assert sorted(wait_for(recorded, timeout=20)) == sorted(served)
    assert budget(hostile, "embedder")["used_tokens"] == sum(served) <= allowance


def test_a_stream_whose_client_hangs_up_is_billed_its_prompt_and_what_it_produced(
    hostile: Hostile,
) -> None:
    key = hostile.org_key("quitter", ["eu-west"])
    client = hostile.client(key)
    messages: list[Any] = [{"role": "user", "content": STORY}]
    measured = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1, temperature=0
    )
    assert measured.usage is not None
    prompt_tokens = measured.usage.prompt_tokens
    received = 0
    with second_tenant(hostile, EU):
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=VICTIM_TOKENS, temperature=0, stream=True
        )
        for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received == 5:
                break
        stream.close()

    def cancelled() -> dict[str, Any] | None:
        rows = [r for r in usage_records(hostile, "quitter") if r["status"] != "ok"]
        return rows[0] if rows else None

    record = wait_for(cancelled, timeout=30)
    assert record["status"] == "cancelled"
    assert record["input_tokens"] == prompt_tokens
    assert 5 <= record["output_tokens"] < VICTIM_TOKENS


UNENCODABLE = {
    "infinite-number": b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
    b'"stream": true, "zz": 1e99999}',
    "not-utf-8": b'{"model": "%s", "messages": [{"role": "user", "content": "hi \xff\xfe"}], '
    b'"stream": true}',
}


@pytest.mark.parametrize("kind", sorted(UNENCODABLE))
def test_a_stream_the_router_cannot_re_encode_is_400_and_holds_no_budget(
    hostile: Hostile, kind: str
) -> None:
    org = f"lockout-{kind}"
    # Room for one such request without max_tokens (it reserves the body plus a whole
    # context window), and no more: a leaked reservation would lock the org out.
    allowance = 2200
    key = hostile.org_key(org, ["eu-west"], budget=allowance)
    body = UNENCODABLE[kind] % MODEL.encode()
    with second_tenant(hostile, EU):
        for _ in range(3):
            refusal(hostile.post("/v1/chat/completions", key, body), 400)

    def released() -> dict[str, Any] | None:
        found = budget(hostile, org)
        return found if found["reserved_tokens"] == 0 else None

    assert wait_for(released, timeout=20)["used_tokens"] == 0
    hi = [{"role": "user", "content": "Say hi."}]  # at temperature 0, a short answer
    ask = {"model": MODEL, "messages": hi, "max_tokens": 2000, "temperature": 0}
    assert len(json.dumps(ask)) + 2000 > 0.9 * allowance  # nearly the whole budget at once
    served = hostile.post("/v1/chat/completions", key, ask)
    assert served.status_code == 200, served.text


# --- limits ---------------------------------------------------------------------------------


def test_a_rate_limited_user_cannot_make_a_wider_key(hostile: Hostile) -> None:
    admin = hostile.admin
    admin.create_org("limited", ["eu-west"])
    user = admin.member("limited", "org_user", "user@limited.test")
    hostile.minted.append(user.key)
    admin.ok("PUT", f"/admin/v1/keys/{user.key_id}/limits", {"requests_per_minute": 1})
    me = admin.as_member(user)
    wider = me.call(
        "POST", "/admin/v1/keys", {"name": "wide", "limits": {"requests_per_minute": 1000000}}
    )
    error = refusal(wider, 403, "limit_escalation")
    assert error["param"] == "limits.requests_per_minute"
    unlimited = me.call("POST", "/admin/v1/keys", {"name": "no-limits"})
    assert unlimited.status_code == 201, unlimited.text
    inherited = unlimited.json()
    hostile.minted.append(inherited["key"])
    assert inherited["info"]["limits"]["requests_per_minute"] == 1
    client = hostile.client(inherited["key"])
    hello: list[Any] = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model=UPSTREAM_MODEL, messages=hello, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=UPSTREAM_MODEL, messages=hello, max_tokens=2)
    assert limited.value.code == "rate_limit_exceeded"


# --- connections and bodies -------------------------------------------------------------------


def test_slow_header_connections_leave_healthz_answering_within_a_second(
    hostile: Hostile,
) -> None:
    targets = [hostile.router, hostile.fleet.members[EU]]
    with contextlib.ExitStack() as stack:
        for server in targets:
            address = urlsplit(server.url)
            for _ in range(SLOW_CONNECTIONS):
                slow = stack.enter_context(
                    socket.create_connection((address.hostname, address.port), timeout=10)
                )
                slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Stalling: ")
        for server in targets:
            started = time.monotonic()
            answered = httpx.get(f"{server.url}/healthz", timeout=5)
            assert answered.status_code == 200
            assert time.monotonic() - started < 1.0, server.url


def test_deeply_nested_json_is_400_at_the_router_and_at_the_appliance(
    hostile: Hostile,
) -> None:
    depth = 50_000
    nested = b'{"model": "%s", "messages": ' % MODEL.encode() + b"[" * depth + b"]" * depth + b"}"
    error = refusal(hostile.post("/v1/chat/completions", hostile.mallory, nested), 400)
    assert error["code"] == "invalid_json"
    member = hostile.fleet.members[EU]
    local = Admin(member.url, (member.home / "admin.key").read_text().strip())
    local.create_org("local", ["eu-west"])
    local_key = local.member("local", "org_user", "local@local.test").key
    hostile.minted.append(local_key)
    direct = httpx.post(
        f"{member.url}/v1/chat/completions",
        content=nested,
        headers={"Authorization": f"Bearer {local_key}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert refusal(direct, 400)["code"] == "invalid_json"


# --- files and secrets ------------------------------------------------------------------------


def test_state_is_private_under_umask_022(hostile: Hostile) -> None:
    checked = 0
    for server in hostile.servers().values():
        assert stat.S_IMODE(server.home.stat().st_mode) == 0o700, server.home
        for path in server.home.rglob("*"):
            mode = stat.S_IMODE(path.lstat().st_mode)
            if path.is_dir():
                assert mode == 0o700, path
            elif path.suffix != ".toml":  # the configs this test wrote itself
                assert mode == 0o600, path
                checked += 1
    assert checked >= 4 * 4  # policy, audit, content databases with their journals, keys


def test_no_key_appears_in_any_output_or_state_file(hostile: Hostile) -> None:
    homes = [server.home for server in hostile.servers().values()]
    keys = [(home / "admin.key").read_text().strip() for home in homes]
    keys += [hostile.mallory, hostile.victim, *hostile.minted]
    assert all(key.startswith("pal-sk-") for key in keys)
    outputs = {name: server.log_text() for name, server in hostile.servers().items()}
    for home in homes:
        for path in home.rglob("*"):
            if path.is_file() and path.suffix != ".key":
                outputs[str(path)] = path.read_bytes().decode("utf-8", "replace")
    leaks = [(where, key[:12]) for where, text in outputs.items() for key in keys if key in text]
    assert leaks == []


# --- disconnects ------------------------------------------------------------------------------


def hang_up_before_the_answer(hostile: Hostile) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(  # the stand-in takes three seconds to answer
            f"{hostile.router.url}/v1/chat/completions",
            json={"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {hostile.mallory}"},
            timeout=httpx.Timeout(10, read=0.5),
        )


def hang_up_mid_stream(hostile: Hostile) -> None:
    stream = hostile.client(hostile.mallory).chat.completions.create(
        model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    for seen, _ in enumerate(stream):
        if seen == 3:
            break
    stream.close()


@pytest.mark.parametrize("hang_up", [hang_up_before_the_answer, hang_up_mid_stream])
def test_a_client_that_hangs_up_is_a_499_and_no_error_line(
    hostile: Hostile, hang_up: Callable[[Hostile], None]
) -> None:
    router, member = hostile.router, hostile.fleet.members[STANDIN]
    before = chat_statuses(router)
    router_mark, member_mark = len(router.output), len(member.output)
    with second_tenant(hostile, STANDIN):
        hang_up(hostile)

    def counted() -> dict[str, float] | None:
        now = chat_statuses(router)
        added = {status: now[status] - before.get(status, 0) for status in now}
        return added if sum(added.values()) >= 2 else None

    added = wait_for(counted, timeout=20)  # the second tenant's 200 and the hang-up
    assert {status: n for status, n in added.items() if n} == {"200": 1, "499": 1}
    assert error_lines(router, router_mark) == []
    assert error_lines(member, member_mark) == []


# --- benchmark clients ------------------------------------------------------------------------


def test_health_alias_answers_everywhere(hostile: Hostile) -> None:
    for name, server in hostile.servers().items():
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200, name


def test_continuous_usage_stats_put_usage_in_every_chunk(hostile: Hostile) -> None:
    client = hostile.client(hostile.mallory, REGION[EU])
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": STORY}],
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    chunks = list(stream)
    assert len(chunks) >= 12
    usages = [chunk.usage for chunk in chunks]
    assert all(usage is not None for usage in usages), usages
    completion = [usage.completion_tokens for usage in usages if usage is not None]
    assert completion == sorted(completion)
    assert completion[-1] == 12


def test_ignore_eos_generates_exactly_max_tokens(hostile: Hostile) -> None:
    client = hostile.client(hostile.mallory, REGION[EU])
    ask: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 48,
        "temperature": 0,
    }
    natural = client.chat.completions.create(**ask)
    assert natural.choices[0].finish_reason == "stop"  # this prompt ends on its own...
    assert natural.usage is not None
    assert natural.usage.completion_tokens < 48
    forced = client.chat.completions.create(**ask, extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length"  # ... unless told to ignore EOS
    assert forced.usage is not None
    assert forced.usage.completion_tokens == 48
