"""The engine benchmark still runs end to end (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def test_engine_benchmark_runs_and_writes_its_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench",
            "--only",
            "engine",
            "--repeats",
            "1",
            "--warmups",
            "0",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "TTFT p50 (ms)" in result.stdout
    report = json.loads((tmp_path / "engine.json").read_text())
    tokens = report["summary"]["tokens"]
    assert tokens["completion"]["raw"] == tokens["completion"]["appliance"]
    assert tokens["same_text"] is True
