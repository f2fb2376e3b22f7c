"""promtool and amtool accept the shipped rules and the generated configs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from router._private.monitoring import RULES, Monitoring, write_configs

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("amtool") is None,
    reason="promtool/amtool are absent: run `make system-deps` (Debian's prometheus, "
    "prometheus-alertmanager)",
)


def _check(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_checks_the_shipped_rules() -> None:
    out = _check("promtool", "check", "rules", str(RULES))
    assert "SUCCESS: 10 rules found" in out


def test_promtool_and_amtool_check_the_generated_configs(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    (tmp_path / "sd.key").write_text("pal-sk-x")
    setup = Monitoring(
        router_url="https://127.0.0.1:8300",
        ca_file=tmp_path / "ca.pem",
        credentials_file=tmp_path / "sd.key",
        webhook_url="http://127.0.0.1:9095/",
        alertmanager_address="127.0.0.1:9093",
    )
    directory = write_configs(tmp_path / "monitoring", setup)
    out = _check("promtool", "check", "config", str(directory / "prometheus.yml"))
    assert "SUCCESS: 10 rules found" in out
    _check("amtool", "check-config", str(directory / "alertmanager.yml"))
