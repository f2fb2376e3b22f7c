"""The multi-turn benchmark still runs end to end (figures are not judged here).

It sits here rather than in tests/bench/, which pytest skips (`--ignore=tests/bench`).
The end-to-end case runs only the appliance, 2 conversations of 2 turns, so it never
builds llama-server nor installs llama-cpp-python's server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import multiturn
from tests.bench.__main__ import multiturn_settings, parse_args
from tests.bench.batching import Stream
from tests.bench.conversations import SYSTEM_PROMPT, user_message
from tests.support import REPO


def test_the_workload_is_deterministic_and_every_conversation_parts_after_the_system_prompt() -> (
    None
):
    openings = {user_message(conversation, 0) for conversation in range(48)}
    assert len(openings) == 48
    assert user_message(7, 3) == user_message(7, 3)
    lengths = {
        len(user_message(conversation, turn)) for conversation in range(16) for turn in range(6)
    }
    assert max(lengths) > 3 * min(lengths)  # varied lengths, not one size
    assert 2_500 < len(SYSTEM_PROMPT) < 4_000  # about 500 tokens of English


def _stream(
    ttft_s: float, usage: dict[str, object] | None, timings: dict[str, int] | None
) -> Stream:
    return Stream(0.0, ttft_s, ttft_s + 1.0, 64, "usage", "answer", usage, timings)


def test_cached_tokens_are_read_from_usage_and_else_from_llama_server_timings() -> None:
    openai = _stream(
        0.1, {"prompt_tokens": 600, "prompt_tokens_details": {"cached_tokens": 512}}, None
    )
    assert multiturn.cached_tokens(openai) == (512, "usage.prompt_tokens_details")
    assert multiturn.prompt_tokens(openai) == 600
    llama = _stream(0.1, {"prompt_tokens": 600}, {"cache_n": 590, "prompt_n": 10})
    assert multiturn.cached_tokens(llama) == (590, "timings.cache_n")
    silent = _stream(0.1, None, None)
    assert multiturn.cached_tokens(silent) == (None, None)
    assert multiturn.prompt_tokens(silent) is None


def test_ratios_and_goals_compare_each_turn_with_llama_server() -> None:
    def run(ttfts: list[float]) -> multiturn.Run:
        turns = [
            multiturn.Turn(0, index + 1, _stream(ttft, {"prompt_tokens": 100}, None))
            for index, ttft in enumerate(ttfts)
        ]
        return multiturn.Run(1, 10.0, turns)

    ours = multiturn.summarize_run(run([1.0, 0.1, 0.2]), 3)
    theirs = multiturn.summarize_run(run([1.0, 0.4, 0.3]), 3)
    assert ours["aggregate_tok_s"] == pytest.approx(3 * 64 / 10.0)
    found = multiturn.ratios({"appliance": ours, "llama-server": theirs})
    turns = found["llama-server"]["turns"]
    assert turns["2"]["ttft_p50_ms"] == pytest.approx(0.25)
    assert turns["3"]["ttft_p50_ms"] == pytest.approx(2 / 3)
    ttft, tokens = multiturn.judge(16, found)
    assert ttft["value"] == pytest.approx(2 / 3)  # the worst of turns 2-3
    assert ttft["met"] is False
    assert tokens["value"] == pytest.approx(1.0)
    assert tokens["met"] is False


def test_options_choose_targets_and_the_skip_flags_apply() -> None:
    args = ["--only", "multiturn", "--conversations", "48,16", "--turns", "3"]
    settings = multiturn_settings(parse_args([*args, "--skip-llamacpp-server"]))
    assert settings.conversations == (16, 48)
    assert settings.turns == 3
    assert settings.targets == ("appliance", "llama-server")
    chosen = parse_args(["--multiturn-targets", "llama-server,appliance"])
    assert multiturn_settings(chosen).targets == ("appliance", "llama-server")
    with pytest.raises(SystemExit):
        parse_args(["--multiturn-targets", "appliance,vllm"])


def test_multiturn_benchmark_runs_and_writes_its_report(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.bench", "--only", "multiturn"]
    command += ["--conversations", "2", "--turns", "2", "--multiturn-targets", "appliance"]
    command += ["--quiet-wait", "0", "--out", str(tmp_path)]
    # A session of its own, so a timeout stops the appliance it started as well.
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            output, _ = process.communicate(timeout=20)
            pytest.fail("the multi-turn benchmark took over 240 s:\n" + output)
    assert process.returncode == 0, output
    assert "Multi-turn benchmark" in output
    report = json.loads((tmp_path / "multiturn.json").read_text())
    assert report["benchmark"] == "multiturn"
    assert report["setup"]["conversations"] == [2]
    assert 450 <= report["setup"]["system_prompt_tokens"] <= 600
    row = report["summary"]["results"]["2"]["appliance"]
    assert (row["requests"], row["ok"], row["errors"]) == (4, 4, 0)
    assert row["aggregate_tok_s"] > 0
    first, second = row["turns"]["1"], row["turns"]["2"]
    assert first["ttft_p50_ms"] > 0
    assert second["ttft_p99_ms"] >= second["ttft_p50_ms"] > 0
    # Turn 2 resends turn 1's prompt and answer, which the appliance's cache holds.
    assert second["prompt_tokens_mean"] > first["prompt_tokens_mean"] + 10
    assert second["cached_from"] == ["usage.prompt_tokens_details"]
    assert second["cached_tokens_mean"] >= first["prompt_tokens_mean"]
    assert report["summary"]["ratios"]["2"] == {}  # no peer measured
