"""The scale-out benchmark still runs end to end (figures are not judged here): a private
PostgreSQL cluster, a router on SQLite, three on PostgreSQL, two HAProxies, tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def test_scaleout_benchmark_runs_and_writes_its_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "tests.bench", "--only", "scaleout",
            "--repeats", "1", "--requests", "40", "--warmup-requests", "10",
            "--saturation-seconds", "0.2", "--open-seconds", "0.2", "--workers", "4",
            "--quiet-wait", "0",
            "--out", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "router CPU per request, 3 routers / 1" in result.stdout
    report = json.loads((tmp_path / "scaleout.json").read_text())
    summary = report["summary"]
    assert set(summary["saturation"]) == {
        "direct", "router_sqlite", "router_pg", "haproxy_1", "haproxy_3",
    }  # fmt: skip
    for target in ("router_sqlite", "router_pg", "haproxy_1", "haproxy_3"):
        row = summary["saturation"][target]
        assert row["ok"] > 0, (target, row)
        assert row["router_cpu_ms_per_request"] is not None, (target, row)
    assert summary["concurrency_1"]["router_pg"]["added_p50_ms"] is not None
    assert summary["ratios"]["three_vs_one_cpu_per_request"] is not None
    assert set(summary["fixed_rate"]) == {"haproxy_1_third", "haproxy_1", "haproxy_3"}
    for row in summary["fixed_rate"].values():
        assert len(row["rounds"]) == 3, row
        assert row["ok"] > 0, row
    assert summary["ratios"]["three_vs_one_cpu_per_request_at_equal_router_load"] is not None
