"""The router overhead benchmark still runs end to end (figures are not judged here).

It sits here rather than in tests/bench/, which pytest skips (`--ignore=tests/bench`).
Tiny settings and `--no-litellm`, so it never installs LiteLLM; it still starts both
fleets (plain HTTP, and mTLS with the stand-in enrolled), so it takes half a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def test_router_benchmark_runs_and_writes_its_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench",
            "--only",
            "router",
            "--no-litellm",
            "--repeats",
            "1",
            "--requests",
            "40",
            "--warmup-requests",
            "10",
            "--rates",
            "50",
            "--open-seconds",
            "0.2",
            "--saturation-seconds",
            "0.2",
            "--workers",
            "4",
            "--quiet-wait",
            "0",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Concurrency 1, closed loop" in result.stdout
    assert "router saturation throughput" in result.stdout
    assert "router (mTLS) saturation throughput" in result.stdout
    report = json.loads((tmp_path / "router.json").read_text())
    assert report["benchmark"] == "router"
    assert report["setup"]["litellm_skipped"] == "--no-litellm"
    summary = report["summary"]
    targets = ["direct", "router", "direct_tls", "router_mtls", "router_observed"]
    assert summary["targets_measured"] == targets
    for target in targets:
        c1 = summary["concurrency_1"][target]
        assert c1["requests_per_repeat"] == 40
        assert c1["errors"] == 0
        assert c1["p50_ms"] > 0
        assert c1["p99_ms"] >= c1["p50_ms"]
        open_loop = summary["open_loop"]["50"][target]
        assert open_loop["ok"] > 0
        assert open_loop["p50_ms"] > 0
        assert open_loop["achieved_per_s"] > 0
        saturation = summary["saturation"][target]
        assert saturation["achieved_per_s"] > 0
        assert saturation["p50_ms"] > 0
    for router, base in (("router", "direct"), ("router_mtls", "direct_tls")):
        assert summary["concurrency_1"][router]["base"] == base
        assert isinstance(summary["concurrency_1"][router]["added_p50_ms"], float)
        assert isinstance(summary["open_loop"]["50"][router]["added_p99_ms"], float)
    names = {row["name"] for row in summary["targets"]}
    assert "router added p50 / LiteLLM added p50" in names
    assert summary["ratios"]["router_vs_litellm_added_p50"] is None
    assert summary["ratios"]["router_vs_direct_saturation"] > 0
    assert summary["ratios"]["mtls_vs_plain_saturation"] > 0
    assert isinstance(summary["ratios"]["mtls_vs_plain_added_p50"], float)
    assert set(report["setup"]["heartbeats_sent"]) == {"plain", "mTLS", "observed"}
