"""Model lifecycle on a real appliance process: hot swap under load (llama.cpp), a reload
to a corrupt file, adding and removing a model at runtime, and SIGHUP re-reading the config.

One appliance for the module. Its model `chat` runs on llama.cpp; the two "versions" are
the default GGUF and the same weights with 64 padding bytes appended (llama.cpp ignores
them): two files, two SHA-256 digests, two versions.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.federation.tenants import Admin, Member, admin_of
from tests.support import Appliance, default_model_path, run_appliance, run_palisade, wait_for

STREAMS = 8
VERSION_HEADER = "x-palisade-model-version"


@dataclass(frozen=True)
class Versions:
    v1: Path
    v2: Path
    corrupt: Path

    @staticmethod
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Answer:
    id: str
    started: float
    ended: float
    version: str | None
    finish_reason: str | None


def chat_toml(path: Path, extra: str = "") -> str:
    return (
        'region = "eu-west"\n'
        f'[[models]]\nid = "chat"\npath = "{path}"\ncontext_length = 512\n'
        "max_sequences = 8\n" + extra
    )


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    folder = tmp_path_factory.mktemp("weights")
    v1, v2, corrupt = folder / "v1.gguf", folder / "v2.gguf", folder / "corrupt.gguf"
    shutil.copyfile(default_model_path(), v1)
    shutil.copyfile(v1, v2)
    with v2.open("ab") as padded:
        padded.write(b"\0" * 64)
    with v1.open("rb") as source:
        corrupt.write_bytes(source.read(4096))  # a GGUF header, then nothing: truncated
    return Versions(v1, v2, corrupt)


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory, versions: Versions) -> Iterator[Appliance]:
    home = tmp_path_factory.mktemp("lifecycle")
    with run_appliance(home, chat_toml(versions.v1), ready_timeout=120) as running:
        yield running


@pytest.fixture(scope="module")
def admin(appliance: Appliance) -> Admin:
    return admin_of(appliance)


@pytest.fixture(scope="module")
def user(admin: Admin) -> Member:
    admin.create_org("lab", ["eu-west"])
    return admin.member("lab", "org_user", "ada@lab.example")


def client(appliance: Appliance, user: Member) -> openai.OpenAI:
    # No retries: a request that fails must show as a failure.
    return openai.OpenAI(base_url=appliance.v1, api_key=user.key, max_retries=0, timeout=120)


def palisade(appliance: Appliance, *args: str) -> tuple[int, str, str]:
    result = run_palisade(
        "models",
        *args,
        "--url",
        appliance.url,
        env={"PALISADE_HOME": str(appliance.home)},
        unset=("PALISADE_API_KEY", "PALISADE_URL"),
        timeout=300,
    )
    return result.returncode, result.stdout, result.stderr


def card(appliance: Appliance, user: Member, model: str) -> dict[str, object] | None:
    listing = httpx.get(
        f"{appliance.v1}/models", headers={"Authorization": f"Bearer {user.key}"}, timeout=10
    ).json()
    return next((entry for entry in listing["data"] if entry["id"] == model), None)


def stream_once(chat: openai.OpenAI, model: str = "chat", max_tokens: int = 8) -> Answer:
    started = time.monotonic()
    raw = chat.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "Count slowly from one to twenty."}],
        max_tokens=max_tokens,
        stream=True,
    )
    ids, reasons = set(), []
    for chunk in raw.parse():
        ids.add(chunk.id)
        reasons += [choice.finish_reason for choice in chunk.choices if choice.finish_reason]
    (answer_id,) = ids
    version = raw.headers.get(VERSION_HEADER)
    return Answer(answer_id, started, time.monotonic(), version, reasons[-1] if reasons else None)


def refusal(admin: Admin, method: str, path: str, body: object = None) -> tuple[int, str]:
    response = admin.call(method, path, body)
    return response.status_code, response.json()["error"]["code"]


def audited_versions(admin: Admin) -> dict[str, str | None]:
    entries = admin.ok("GET", "/admin/v1/audit/export", org="lab")["export"]["entries"]
    rows = [json.loads(entry["entry"]) for entry in entries]
    return {row["id"]: row.get("model_version") for row in rows if row.get("status") == "ok"}


@pytest.mark.slow  # 8 llama.cpp streams and a second load of the model (~5 s when idle)
def test_hot_swap_under_load_fails_no_request(
    appliance: Appliance, admin: Admin, user: Member, versions: Versions
) -> None:
    v1, v2 = Versions.digest(versions.v1), Versions.digest(versions.v2)
    before = card(appliance, user, "chat")
    assert before is not None
    assert (before["version"], before["sha256"], before["engine"]) == (v1[:12], v1, "llamacpp")

    chat = client(appliance, user)
    answers: list[list[Answer]] = [[] for _ in range(STREAMS)]
    failures: list[str] = []
    stop = threading.Event()

    def load(stream: int) -> None:
        while not stop.is_set():
            try:
                answers[stream].append(stream_once(chat))
            except Exception as exc:  # noqa: BLE001 - any failure is what the test counts
                failures.append(repr(exc))

    workers = [threading.Thread(target=load, args=(stream,)) for stream in range(STREAMS)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: any(answers), timeout=120)  # warm: all 8 streams are under way
        swap_started = time.monotonic()
        code, out, err = palisade(appliance, "reload", "chat", "--path", str(versions.v2))
        swap_done = time.monotonic()
        assert code == 0, err
        assert f"Serving chat version {v2[:12]} (sha256 {v2}" in out
        # Every stream has finished a request it started on the new version.
        wait_for(
            lambda: all(any(a.started > swap_done for a in mine) for mine in answers),
            timeout=180,
        )
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)

    assert failures == []
    done = [answer for mine in answers for answer in mine]
    assert all(answer.finish_reason in ("stop", "length") for answer in done)
    after = [answer for answer in done if answer.started > swap_done]

    # Which version served each answer: its receipt header and its audit row.
    def all_audited() -> dict[str, str | None] | None:
        rows = audited_versions(admin)
        return rows if all(answer.id in rows for answer in done) else None

    audited = wait_for(all_audited, interval=0.5)
    assert {audited[a.id] for a in after} == {v2[:12]}
    assert {audited[a.id] for a in done if a.ended < swap_started} == {v1[:12]}
    order: dict[str | None, int] = {v1[:12]: 1, v2[:12]: 2}
    for mine in answers:  # each stream: v1 answers, then v2 answers, nothing else
        ranks = [order.get(audited[answer.id], 0) for answer in mine]
        assert ranks == sorted(ranks)
        assert 0 not in ranks
    # The old version had requests in flight when it was replaced: they drained on it.
    drained = re.search(
        rf"model chat version {v1[:12]} draining \((\d+) requests in flight\)", appliance.log_text()
    )
    assert drained is not None
    assert int(drained[1]) >= 1
    assert {a.version for a in after} == {v2[:12]}
    assert {a.version for a in done if a.ended < swap_started} == {v1[:12]}
    now = card(appliance, user, "chat")
    assert now is not None
    assert (now["version"], now["sha256"]) == (v2[:12], v2)

    def held() -> list[tuple[str, str, str]]:
        entries = admin.ok("GET", "/admin/v1/models")["data"]
        return [(entry["id"], entry["state"], entry["version"]) for entry in entries]

    wait_for(lambda: held() == [("chat", "serving", v2[:12])])  # the old version unloaded
    overlay = json.loads((appliance.home / "models.overlay.json").read_text())
    assert [(m["id"], m["path"]) for m in overlay["models"]] == [("chat", str(versions.v2))]


def test_a_reload_to_a_corrupt_file_fails_cleanly(
    appliance: Appliance, admin: Admin, user: Member, versions: Versions
) -> None:
    serving = card(appliance, user, "chat")
    assert serving is not None
    code, _, err = palisade(appliance, "reload", "chat", "--path", str(versions.corrupt))
    assert code == 1
    assert err.startswith("error: ")
    assert "(model_load_failed)" in err
    mismatch = admin.call("POST", "/admin/v1/models/chat/reload", {"sha256": "f" * 64})
    assert mismatch.status_code == 422
    error = mismatch.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "model_digest_mismatch",
        "sha256",
        "invalid_request_error",
    )
    assert serving["sha256"] in error["message"]
    still = card(appliance, user, "chat")
    assert still is not None
    assert (still["version"], still["sha256"]) == (serving["version"], serving["sha256"])
    answer = stream_once(client(appliance, user), max_tokens=4)
    assert answer.finish_reason in ("stop", "length")
    refused = [
        event
        for event in admin.ok("GET", "/admin/v1/audit")["data"]
        if event["event"] == "model_change_refused"
    ]
    assert [event["payload"]["code"] for event in refused][-2:] == [
        "model_load_failed",
        "model_digest_mismatch",
    ]


def test_add_and_remove_a_model_at_runtime(
    appliance: Appliance, admin: Admin, user: Member
) -> None:
    config = {"id": "echo", "engine": "scripted", "replies": ["hello from echo"]}
    code, out, err = palisade(appliance, "add", "--config-json", json.dumps(config))
    assert code == 0, err
    assert out.startswith("Serving echo version - (sha256 -, engine scripted, serving)")
    reply = client(appliance, user).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "hello from echo"
    assert card(appliance, user, "echo") is not None
    code, out, _ = palisade(appliance, "status")
    assert code == 0
    assert out.splitlines()[0].split() == ["id", "engine", "state", "version", "in_flight", "path"]
    assert ["echo", "scripted", "serving", "-", "0", "-"] in [
        line.split() for line in out.splitlines()
    ]

    assert refusal(admin, "POST", "/admin/v1/models", config) == (409, "model_exists")
    bad = {"id": "x", "colour": 1}
    assert refusal(admin, "POST", "/admin/v1/models", bad) == (400, "invalid_model_config")
    assert refusal(admin, "POST", "/admin/v1/models/nope/reload", {}) == (404, "model_not_found")

    code, out, err = palisade(appliance, "remove", "echo")
    assert code == 0, err
    assert out.startswith("Removed echo")
    assert card(appliance, user, "echo") is None
    with pytest.raises(openai.NotFoundError) as gone:
        client(appliance, user).chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}]
        )
    assert gone.value.code == "model_not_found"
    assert refusal(admin, "DELETE", "/admin/v1/models/chat") == (409, "last_model")
    assert refusal(admin.as_member(user), "GET", "/admin/v1/models") == (403, "permission_denied")

    overlay = json.loads((appliance.home / "models.overlay.json").read_text())
    assert "echo" in overlay["removed"]
    assert "echo" not in [model["id"] for model in overlay["models"]]
    events = [event["event"] for event in admin.ok("GET", "/admin/v1/audit")["data"]]
    assert {"model_added", "model_removed", "model_reloaded"} <= set(events)


def test_sighup_rereads_the_config(appliance: Appliance, user: Member, versions: Versions) -> None:
    config = appliance.home / "appliance.toml"
    hup = '[[models]]\nengine = "scripted"\nid = "hup"\nreplies = ["from the config"]\n'
    config.write_text(chat_toml(versions.v1, hup))
    appliance.process.send_signal(signal.SIGHUP)
    wait_for(lambda: card(appliance, user, "hup"), timeout=30)
    reply = client(appliance, user).chat.completions.create(
        model="hup", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "from the config"
    # `chat` is the overlay's (reloaded to v2 at runtime): the config's v1 does not undo it.
    chat = card(appliance, user, "chat")
    assert chat is not None
    assert chat["sha256"] == Versions.digest(versions.v2)

    config.write_text("this is = not [toml")
    appliance.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: config not re-read" in appliance.log_text(), timeout=30)
    assert card(appliance, user, "hup") is not None

    config.write_text(chat_toml(versions.v1))
    appliance.process.send_signal(signal.SIGHUP)
    wait_for(lambda: card(appliance, user, "hup") is None, timeout=30)
    assert appliance.process.poll() is None


def test_a_restart_serves_what_runtime_changes_made(
    appliance: Appliance, user: Member, versions: Versions
) -> None:
    appliance.stop()  # the overlay, not the process, carries the changes over
    config = (appliance.home / "appliance.toml").read_text()
    with run_appliance(appliance.home, config, ready_timeout=120) as restarted:
        chat = card(restarted, user, "chat")
        assert chat is not None
        assert chat["sha256"] == Versions.digest(versions.v2)  # the config still says v1
        assert card(restarted, user, "echo") is None
