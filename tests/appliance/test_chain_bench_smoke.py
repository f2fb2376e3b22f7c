"""The chain benchmark still runs end to end (figures are not judged here).

It sits here rather than in tests/bench/, which pytest skips (`--ignore=tests/bench`).
Tiny settings and `--no-litellm`, so it never installs LiteLLM; it still starts the whole
chain (router, appliance joined with the lab secret, stand-in): ~15 s, more on a busy
machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO


@pytest.mark.slow
def test_chain_benchmark_runs_through_the_appliance_and_meters_once(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "tests.bench", "--only", "chain", "--no-litellm",
            "--repeats", "1", "--requests", "20", "--warmup-requests", "5",
            "--saturation-seconds", "0.3", "--workers", "4", "--quiet-wait", "0",
            "--out", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "router added p50 over the appliance, c=1" in result.stdout
    report = json.loads((tmp_path / "chain.json").read_text())
    assert report["benchmark"] == "chain"
    summary = report["summary"]
    targets = ["standin", "appliance", "router"]
    assert summary["targets_measured"] == targets
    c1 = summary["concurrency_1"]
    for target in targets:
        assert c1[target]["requests_per_repeat"] == 20
        assert c1[target]["errors"] == 0
        assert 0 < c1[target]["p50_ms"] <= c1[target]["p99_ms"]
        assert summary["saturation"][target]["achieved_per_s"] > 0
        assert summary["saturation"][target]["errors"] == 0
    assert c1["appliance"]["base"] == "standin"
    assert c1["router"]["base"] == "appliance"
    assert isinstance(c1["router"]["added_p50_ms"], float)
    assert isinstance(summary["chain_over_standin"]["added_p50_ms"], float)
    # The appliance did the work of its own target: its CPU per request is measured.
    appliance = summary["processes"]["saturation"]["appliance"]
    assert appliance["cpu_ms_per_request"]["appliance"] > 0
    assert appliance["busy_cores"]["appliance"] > 0
    # Tenancy is on: each server metered every request sent to it with its tenant key
    # (+1: the path check), and the appliance did not meter the router-vouched ones again.
    setup = report["setup"]
    for server in ("appliance", "router"):
        assert setup["usage_metered"][server] == setup["requests_sent"][server] + 1
    assert not [w for w in report["warnings"] if "usage report" in w]
