"""Supervised engines (vLLM, TensorRT-LLM): the appliance runs the engine's server itself.

Policy and command lines are tested in-process; supervision with one real appliance per
engine, running the engine stand-ins (`tests/engine_standins`: real processes taking the
real flags and speaking the real OpenAI protocol): start-up waits for health, a SIGKILLed
engine is restarted with back-off while the appliance stays up, streams in flight end with
an error frame, and the engine ends with the appliance (SIGTERM: the appliance stops it;
SIGKILL: the kernel does), checked by PID.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import openai
import pytest

from appliance._private.config import load_appliance_config
from appliance._private.engines.base import EngineContext
from appliance._private.engines.supervised.engine import relabel
from appliance._private.engines.supervised.process import (
    EngineProcess,
    LineLog,
    RestartPolicy,
    line_level,
)
from appliance._private.engines.tensorrt_llm.config import TensorRTLLMModel
from appliance._private.engines.tensorrt_llm.engine import trtllm_command
from appliance._private.engines.vllm.config import VllmModel
from appliance._private.engines.vllm.engine import _SHUTDOWN_NOISE as VLLM_SHUTDOWN_NOISE
from appliance._private.engines.vllm.engine import VllmEngine, vllm_command
from appliance._private.errors import ModelLoadError
from appliance._private.metrics import merge_expositions
from federation import ConfigError
from tests.support import Server, model_toml, start_server, wait_for

MODEL_DIR = Path("/models/m")

# --- the restart policy -------------------------------------------------------------------


def test_restart_backoff_doubles_to_thirty_seconds() -> None:
    policy = RestartPolicy()
    delays = [policy.after_exit(None, now=0.0) for _ in range(7)]
    assert delays == [1, 2, 4, 8, 16, 30, 30]


def test_restart_backoff_resets_after_a_minute_healthy() -> None:
    policy = RestartPolicy()
    assert [policy.after_exit(5.0, now=0.0) for _ in range(3)] == [1, 2, 4]
    assert policy.after_exit(59.9, now=0.0) == 8  # not yet a minute: still backing off
    assert policy.after_exit(60.0, now=0.0) == 1  # a healthy minute forgives the past
    assert policy.after_exit(None, now=0.0) == 2


def test_retry_after_is_the_rest_of_the_backoff_plus_a_startup() -> None:
    policy = RestartPolicy()
    policy.healthy(startup_s=2.5)
    policy.after_exit(None, now=100.0)  # restarts at 101
    policy.after_exit(None, now=100.0)  # then again, 2 s after this exit: at 102
    assert policy.retry_after(now=100.0) == 5  # ceil(2 + 2.5)
    assert policy.retry_after(now=101.9) == 3  # ceil(0.1 + 2.5)
    assert policy.retry_after(now=500.0) == 3  # starting now: about one start-up
    policy.healthy(startup_s=400.0)
    assert policy.retry_after(now=500.0) == 60  # never more than a minute


# --- command lines --------------------------------------------------------------------------


def _vllm(**keys: object) -> VllmModel:
    return msgspec.convert({"engine": "vllm", "id": "m", "path": str(MODEL_DIR)} | keys, VllmModel)


def test_vllm_serve_command() -> None:
    config = _vllm(
        served_model_name="llama",
        dtype="float16",
        tensor_parallel_size=2,
        gpu_memory_utilization=0.85,
        max_model_len=4096,
        enforce_eager=True,
        extra_args=["--max-num-seqs", "8"],
    )
    assert vllm_command(config, MODEL_DIR, 41234) == [
        *("vllm", "serve", "/models/m", "--host", "127.0.0.1", "--port", "41234"),
        *("--served-model-name", "llama", "--dtype", "float16", "--tensor-parallel-size", "2"),
        *("--gpu-memory-utilization", "0.85", "--max-model-len", "4096", "--enforce-eager"),
        *("--max-num-seqs", "8"),
    ]


def test_vllm_entry_point_command_names_the_model_with_a_flag() -> None:
    """The CPU lane's form: `python -m vllm.entrypoints.openai.api_server --model <path>`;
    unset keys take vLLM's defaults (no GPU memory flag) and context_length."""
    config = _vllm(
        command=["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"],
        dtype="bfloat16",
        enforce_eager=True,
        context_length=2048,
        accelerator="cpu",
    )
    command = vllm_command(config, MODEL_DIR, 9000)
    assert command[:5] == [*config.command, "--model", "/models/m"]
    assert "--gpu-memory-utilization" not in command
    assert command[command.index("--max-model-len") + 1] == "2048"
    assert command[command.index("--served-model-name") + 1] == "m"


def test_trtllm_serve_command() -> None:
    config = msgspec.convert(
        {
            "engine": "tensorrt_llm",
            "id": "t",
            "path": "/engines/llama",
            "max_batch_size": 8,
            "max_num_tokens": 4096,
            "kv_cache_free_gpu_memory_fraction": 0.5,
        },
        TensorRTLLMModel,
    )
    tokenizer = Path("/tok")
    assert trtllm_command(config, Path("/engines/llama"), 8123, tokenizer) == [
        *("trtllm-serve", "/engines/llama", "--tokenizer", "/tok"),
        *("--host", "127.0.0.1", "--port", "8123", "--backend", "trt"),
        *("--max_batch_size", "8", "--max_num_tokens", "4096", "--tp_size", "1"),
        *("--kv_cache_free_gpu_memory_fraction", "0.5"),
    ]


@pytest.mark.parametrize(
    ("engine", "flag", "fix"),
    [
        ("vllm", "--port=8000", "chooses the engine's address, port and key"),
        ("vllm", "--api-key", "chooses the engine's address, port and key"),
        ("vllm", "-tp", "tensor_parallel_size"),
        ("tensorrt_llm", "--tp_size", "tp_size"),
    ],
)
def test_extra_args_may_not_set_what_the_appliance_sets(
    tmp_path: Path, engine: str, flag: str, fix: str
) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(
        f'[[models]]\nengine = "{engine}"\nid = "m"\npath = "/m"\nextra_args = ["{flag}", "2"]\n'
    )
    with pytest.raises(ConfigError, match=re.escape(fix)):
        load_appliance_config(config)


def _context(home: Path, path: Path) -> EngineContext:
    return EngineContext(home=home, path=path, on_finish=lambda *_: None)


def test_engine_refusing_its_flags_fails_the_load_with_its_words(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.engine_standins.vllm_standin", "serve"]
    config = _vllm(command=command, extra_args=["--no-such-flag"], path=str(tmp_path))
    engine = VllmEngine(config, _context(tmp_path, tmp_path))
    with pytest.raises(ModelLoadError, match="exited before it was healthy") as failed:
        engine.load()
    assert "unrecognized arguments: --no-such-flag" in str(failed.value)
    assert not engine.ready


def test_engine_metrics_are_its_process_and_its_own_series(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.engine_standins.vllm_standin", "serve"]
    engine = VllmEngine(_vllm(command=command, path=str(tmp_path)), _context(tmp_path, tmp_path))
    engine.load()
    try:
        text = engine.metrics_text() or ""
        assert 'palisade_engine_up{model="m"} 1\n' in text
        assert 'palisade_engine_restarts_total{model="m"} 0\n' in text
        assert f'palisade_engine_process_pid{{model="m"}} {engine.process.pid}\n' in text
        assert 'vllm:num_requests_running{model_name="m",model="m"} 0\n' in text
    finally:
        engine.close()
    assert not engine.ready
    after = engine.metrics_text() or ""
    assert 'palisade_engine_up{model="m"} 0\n' in after
    assert "vllm:" not in after  # a stopped engine's own gauges are not reported


def test_hung_engine_is_stopped_and_restarted(tmp_path: Path) -> None:
    """An engine that stops answering /health (here: SIGSTOP) is killed and started again."""
    command = [sys.executable, "-m", "tests.engine_standins.vllm_standin", "serve", str(tmp_path)]
    engine = EngineProcess(
        "hung",
        lambda port: [*command, "--port", str(port)],
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        startup_timeout_s=60,
        stop_timeout_s=1,
        liveness_every_s=0.2,
        liveness_failures=2,
    )
    engine.start()
    try:
        hung = engine.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        wait_for(lambda: engine.restarts == 1 and engine.ready, timeout=30)
        assert engine.pid != hung
        assert not alive(hung)
    finally:
        engine.close()


def test_missing_engine_executable_fails_the_load(tmp_path: Path) -> None:
    config = _vllm(command=[str(tmp_path / "no-vllm"), "serve"], path=str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"could not be started .*set `command`"):
        VllmEngine(config, _context(tmp_path, tmp_path)).load()


# --- log lines and metrics ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "level"),
    [
        ("INFO 12-01 10:00:00 [api_server.py:1] vLLM API server", logging.INFO),
        ("(APIServer pid=12) WARNING 12-01 10:00:00 [x.py:1] slow", logging.WARNING),
        ("(EngineCore_DP0 pid=13) ERROR 12-01 10:00:00 [core.py:1] boom", logging.ERROR),
        ("[12/01/2026-10:00:00] [TRT-LLM] [W] no kv cache reuse", logging.WARNING),
        ("INFO:     Application startup complete.", logging.INFO),
        ('  File "x.py", line 1, in <module>', logging.INFO),
    ],
)
def test_engine_log_lines_keep_their_level(line: str, level: int) -> None:
    assert line_level(line) == level


def test_engine_log_lines_lose_secrets_and_shutdown_noise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = LineLog(logging.getLogger("palisade.engine.t"), ("hf_s3cret",), VLLM_SHUTDOWN_NOISE)
    dead = "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."
    with caplog.at_level(logging.INFO, logger="palisade.engine.t"):
        lines.write("ERROR 12-01 token=hf_s3cret refused\n", stopping=False)
        lines.write(f"ERROR 12-01 {dead}", stopping=False)
        lines.write(f"ERROR 12-01 {dead}", stopping=True)
    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.ERROR, logging.ERROR, logging.INFO]
    assert "hf_s3cret" not in caplog.text
    assert "token=*** refused" in caplog.text


def test_engine_metrics_are_labelled_with_the_model() -> None:
    text = (
        "# HELP vllm:num_requests_running Running.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="llama"} 3.0\n'
        "vllm:cache_hits_total 7\n"
        'odd{model="inner",le="+Inf"} 1 1700000000\n'
        "garbage line\n"
    )
    assert relabel(text, 'a"b').splitlines() == [
        "# HELP vllm:num_requests_running Running.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{model_name="llama",model="a\\"b"} 3.0',
        'vllm:cache_hits_total{model="a\\"b"} 7',
        'odd{engine_model="inner",le="+Inf",model="a\\"b"} 1 1700000000',
    ]


# --- supervision, with real processes -------------------------------------------------------


@dataclass(frozen=True)
class EngineKind:
    engine: str
    model: str
    command: tuple[str, ...]  # after the Python interpreter
    keys: dict[str, object]
    # How the appliance ends in the last test: SIGTERM (it stops its engine) or SIGKILL
    # (the kernel does: PR_SET_PDEATHSIG).
    end: signal.Signals


ENGINE_KINDS = [
    EngineKind(
        "vllm",
        "sup-vllm",
        ("-m", "tests.engine_standins.vllm_standin", "serve"),
        {"dtype": "bfloat16", "enforce_eager": True, "env.PALISADE_STANDIN_ENGINE_CORE": "1"},
        signal.SIGTERM,
    ),
    EngineKind(
        "tensorrt_llm",
        "sup-trt",
        ("-m", "tests.engine_standins.trtllm_standin"),
        {"max_batch_size": 8, "max_num_tokens": 4096},
        signal.SIGKILL,
    ),
]
# Slow streams (20 ms a token) that a test can kill mid-way; normal requests are short.
_STANDIN_ENV = {
    "env.PALISADE_STANDIN_LOAD_S": "0.2",
    "env.PALISADE_STANDIN_TOKENS": "400",
    "env.PALISADE_STANDIN_TOKEN_MS": "20",
}


def engine_toml(kind: EngineKind, tmp: Path) -> str:
    """The `[[models]]` entry that runs this kind's stand-in (a real executable)."""
    (tmp / "model").mkdir(exist_ok=True)
    keys = dict(kind.keys)
    if kind.engine == "tensorrt_llm":
        (tmp / "tokenizer").mkdir(exist_ok=True)
        keys["tokenizer"] = str(tmp / "tokenizer")
    listed = ", ".join(f'"{part}"' for part in (sys.executable, *kind.command))
    entry = model_toml(
        engine=kind.engine,
        id=kind.model,
        path=str(tmp / "model"),
        startup_timeout_s=60,
        stop_timeout_s=10,
        **keys,
        **_STANDIN_ENV,
    )
    return entry + f"command = [{listed}]\n"


@pytest.fixture(scope="module", params=ENGINE_KINDS, ids=lambda kind: kind.engine)
def supervised(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[EngineKind, Server]]:
    """An appliance whose model is a supervised stand-in, returned as soon as it listens
    (its engine still starting)."""
    kind: EngineKind = request.param
    home = tmp_path_factory.mktemp(f"supervised-{kind.engine}")
    config = 'node_id = "edge-sup"\nregion = "eu-west"\n' + engine_toml(kind, home)
    (home / "appliance.toml").write_text(config)
    appliance = start_server(
        "appliance", home, "--no-auth", "--config", str(home / "appliance.toml")
    )
    try:
        yield kind, appliance
    finally:
        appliance.stop()


def engine_pids(appliance: Server, model: str) -> list[int]:
    """The PIDs of the engine processes started so far, from the appliance's log."""
    pattern = re.compile(rf"started engine {re.escape(model)}: pid (\d+)")
    return [int(found) for found in pattern.findall(appliance.log_text())]


def engine_group(appliance: Server, model: str) -> list[int]:
    """The newest engine process and the others in its group (the vLLM stand-in's engine
    core), from the appliance's log."""
    cores = re.findall(r"EngineCore_DP0 pid=(\d+)", appliance.log_text())
    return [engine_pids(appliance, model)[-1], *(int(core) for core in cores[-1:])]


def chat(appliance: Server, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{appliance.v1}/chat/completions", json=body, timeout=30)


def assert_not_ready_503(reply: httpx.Response) -> None:
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "model_not_ready"
    assert int(reply.headers["Retry-After"]) >= 1


def alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting for a reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_startup_waits_for_the_engine_health(supervised: tuple[EngineKind, Server]) -> None:
    kind, appliance = supervised
    assert_not_ready_503(chat(appliance, kind.model))  # the engine is still "loading"
    appliance.wait_ready(60)
    reply = chat(appliance, kind.model)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == " tok0 tok1 tok2 tok3"
    assert len(engine_pids(appliance, kind.model)) == 1
    if kind.engine == "vllm":  # its private port wants the key only the appliance has
        port = re.search(r"on 127\.0\.0\.1:(\d+)", appliance.log_text())
        assert port is not None
        private = httpx.get(f"http://127.0.0.1:{port[1]}/v1/models", timeout=10)
        assert private.status_code == 401


def test_appliance_metrics_carry_the_engine_series(supervised: tuple[EngineKind, Server]) -> None:
    kind, appliance = supervised
    appliance.wait_ready(60)
    text = httpx.get(f"{appliance.url}/metrics", timeout=10).text
    label = f'{{model="{kind.model}"}}'
    assert f"palisade_engine_up{label} 1" in text
    assert f"palisade_engine_process_pid{label} {engine_pids(appliance, kind.model)[-1]}" in text
    assert text.count("# TYPE palisade_engine_up ") == 1
    assert "palisade_requests_total" in text  # the appliance's own registry comes first


def test_engine_expositions_merge_into_one_family_each() -> None:
    first = '# HELP up Up.\n# TYPE up gauge\nup{model="a"} 1\n# TYPE vllm:r gauge\nvllm:r 2\n'
    second = '# HELP up Up.\n# TYPE up gauge\nup{model="b"} 0\n'
    merged = merge_expositions([first, second])
    assert merged == (
        '# HELP up Up.\n# TYPE up gauge\nup{model="a"} 1\nup{model="b"} 0\n'
        "# TYPE vllm:r gauge\nvllm:r 2\n"
    )


def test_killed_engine_breaks_streams_and_restarts(supervised: tuple[EngineKind, Server]) -> None:
    kind, appliance = supervised
    appliance.wait_ready(60)
    [pid] = engine_pids(appliance, kind.model)
    group = engine_group(appliance, kind.model)
    client = openai.OpenAI(base_url=appliance.v1, api_key="unused", max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model=kind.model, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    received: list[object] = []

    def read_killing_the_engine() -> None:
        for chunk in stream:
            received.append(chunk)
            if len(received) == 2:
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(openai.APIError, match=r"engine"):  # the stream's error frame
        read_killing_the_engine()
    assert 2 <= len(received) < 400

    wait_for(lambda: httpx.get(f"{appliance.url}/readyz").status_code == 503, timeout=10)
    assert_not_ready_503(chat(appliance, kind.model))  # restarting: come back later
    appliance.wait_ready(60)
    assert chat(appliance, kind.model).status_code == 200
    assert appliance.process.poll() is None  # the appliance stayed up throughout
    old, new = engine_pids(appliance, kind.model)
    assert old == pid
    assert new != pid
    assert not any(map(alive, group))  # its engine core too: no orphan survives a crash
    assert "restarts in 1 s" in appliance.log_text()


def test_engine_ends_with_the_appliance(supervised: tuple[EngineKind, Server]) -> None:
    """SIGTERM: the appliance stops its engine. SIGKILL leaves it no time to: the kernel
    does (PR_SET_PDEATHSIG). Either way no engine process outlives it (checked by PID)."""
    kind, appliance = supervised
    appliance.wait_ready(60)
    group = engine_group(appliance, kind.model)
    pid = group[0]
    assert all(map(alive, group))
    appliance.process.send_signal(kind.end)
    assert appliance.process.wait(timeout=30) in (0, -kind.end)
    wait_for(lambda: not any(map(alive, group)), timeout=10)  # no orphan left behind
    stopped_by_appliance = f"stopping engine {kind.model} (pid {pid})" in appliance.log_text()
    assert stopped_by_appliance == (kind.end == signal.SIGTERM)
    if kind.engine == "vllm":  # its shutdown complaint is not a failure
        [line] = [line for line in appliance.output if "EngineDeadError" in line]
        assert "INFO" in line.split("palisade.engine")[0], line
