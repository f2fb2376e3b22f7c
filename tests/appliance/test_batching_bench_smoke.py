"""The batching benchmark still runs end to end (figures are not judged here).

It sits here rather than in tests/bench/, which pytest skips (`--ignore=tests/bench`).
Only the raw, appliance and constrained-mix targets, at 1 and 2 streams for one round, so
it never builds llama-server nor installs llama-cpp-python's server and takes a few
seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import batching
from tests.bench.__main__ import batching_settings, parse_args
from tests.support import REPO


def test_batching_benchmark_runs_and_writes_its_report(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.bench", "--only", "batching", "--streams", "1,2"]
    command += ["--rounds", "1", "--skip-llama-server", "--skip-llamacpp-server"]
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
            output, _ = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            output, _ = process.communicate(timeout=20)
            pytest.fail("the batching benchmark took over 90 s:\n" + output)
    assert process.returncode == 0, output
    assert "Batching benchmark" in output
    assert "appliance 1 stream decode / raw in-process decode" in output
    report = json.loads((tmp_path / "batching.json").read_text())
    assert report["benchmark"] == "batching"
    assert report["machine"]["cpu_count"] >= 1
    assert report["setup"]["streams"] == [1, 2]
    assert report["setup"]["rounds"] == 1
    assert report["skipped"] == {
        "llama-server": "--skip-llama-server",
        "llamacpp-server": "--skip-llamacpp-server",
        "llamacpp-server-threads": "--skip-llamacpp-server",
    }
    assert report["setup"]["order"].startswith("interleaved")
    summary = report["summary"]
    assert summary["targets_measured"] == ["raw", "appliance", batching.GRAMMAR_TARGET]
    # The constrained mix: at 2 streams one of them sampled under a JSON-schema grammar.
    assert set(summary["grammar_vs_free"]) == {"1", "2"}
    assert summary["grammar_vs_free"]["2"] > 0
    assert summary["results"][batching.GRAMMAR_TARGET]["2"]["errors"] == 0
    raw = summary["raw"]
    assert raw["aggregate_tok_s"] > 0
    assert raw["decode_tok_s"] > 0
    assert raw["ttft_p50_ms"] > 0
    assert raw["completion_tokens"]["min"] > 0
    appliance = summary["results"]["appliance"]
    assert set(appliance) == {"1", "2"}
    for streams, row in appliance.items():
        assert row["requests"] == int(streams)
        assert row["ok"] == int(streams)
        assert row["errors"] == 0
        assert row["aggregate_tok_s"] > 0
        assert len(row["aggregate_tok_s_rounds"]) == 1
        assert row["ttft_p50_ms"] > 0
        assert row["ttft_p99_ms"] >= row["ttft_p50_ms"]
        assert row["completion_tokens"]["min"] > 0
        assert row["tokens_from"] == ["usage"]
    assert summary["ratios"]["appliance_1_vs_raw"] > 0
    assert summary["ratios"]["appliance_vs_llama_server_16"] is None
    judged = {row["name"]: row for row in summary["targets"]}
    assert judged["appliance 1 stream decode / raw in-process decode"]["met"] in {True, False}
    assert judged["appliance / llama-server, 16 streams"]["met"] is None
    assert judged["appliance / llamacpp-server-threads, 16 streams"]["met"] is None


def test_baseline_options_choose_the_targets_and_ratios_compare_the_same_rounds() -> None:
    args = ["--only", "batching", "--baseline", "HEAD", "--targets", "appliance,baseline"]
    settings = batching_settings(parse_args(args))
    assert (settings.baseline, settings.raw, settings.llama_server) == ("HEAD", False, False)
    assert not settings.llamacpp_server
    assert not settings.grammar
    assert batching.resolve_revision("HEAD") == batching.resolve_revision("HEAD^{commit}")
    with pytest.raises(ValueError, match="not a commit"):
        batching.resolve_revision("no-such-revision")
    row = {"aggregate_tok_s": 99.0, "aggregate_tok_s_rounds": [90.0, 99.0], "ttft_p50_ms": 51.0}
    base = {"aggregate_tok_s": 100.0, "aggregate_tok_s_rounds": [100.0, 90.0], "ttft_p50_ms": 50.0}
    found = batching.baseline_ratios({"appliance": {"16": row}, "old": {"16": base}}, "old")
    assert found["16"]["aggregate_tok_s"] == pytest.approx(0.99)
    assert found["16"]["aggregate_tok_s_paired_median"] == pytest.approx((0.9 + 1.1) / 2)
    assert found["16"]["ttft_p50_ms"] == pytest.approx(1.02)
    verdicts = [row["met"] for row in batching.judge_baseline(found, "old")]
    assert verdicts == [True, True]  # 0.99 >= 0.98 and 1.02 <= 1 / 0.98
