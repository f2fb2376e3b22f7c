"""`palisade appliance serve --demo` (what `make run` starts) prints a curl line that works."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.support import model_toml, run_appliance

_CURL = re.compile(r"^\s*(curl -s .*Authorization: Bearer pal-sk-.*)$", re.MULTILINE)


def test_demo_prints_a_working_curl_and_reuses_its_key(tmp_path: Path) -> None:
    with run_appliance(tmp_path, model_toml(), "--demo") as appliance:
        match = _CURL.search(appliance.log_text())
        assert match is not None, appliance.log_text()
        result = subprocess.run(
            shlex.split(match[1]), capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0
        assert '"object":"chat.completion"' in result.stdout
        first_key = (tmp_path / "demo.key").read_text().strip()
    with run_appliance(tmp_path, model_toml(), "--demo") as again:
        assert first_key in again.log_text()
        assert "Created the system administrator" not in again.log_text()


def test_demo_needs_keys(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="--demo makes a demo org and key; it needs keys"),
        run_appliance(tmp_path, model_toml(), "--demo", "--no-auth", ready_timeout=30),
    ):
        pass
