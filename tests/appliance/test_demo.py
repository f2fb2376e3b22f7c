"""`palisade appliance serve --demo` (what `make run` starts) prints a curl line that works."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support import model_toml, run_appliance

# Not on a terminal, so the key itself is not printed: the curl line reads the key file.
_CURL = re.compile(r"^\s*(curl -s .*Authorization: Bearer \$\(cat .*demo\.key\).*)$", re.MULTILINE)


def small_model() -> str:
    """The printed curl sets no max_tokens: a short context bounds the answer it waits for."""
    return model_toml(context_length=256, max_sequences=2)


def test_demo_prints_a_working_curl_and_reuses_its_key(tmp_path: Path) -> None:
    with run_appliance(tmp_path, small_model(), "--demo") as appliance:
        match = _CURL.search(appliance.log_text())
        assert match is not None, appliance.log_text()
        result = subprocess.run(
            ["bash", "-c", match[1]], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0
        assert '"object":"chat.completion"' in result.stdout
        first_key = (tmp_path / "demo.key").read_text().strip()
        admin_key = (tmp_path / "admin.key").read_text().strip()
        # Its output may end up in a journal or a log file: no secret in it.
        assert first_key not in appliance.log_text()
        assert admin_key not in appliance.log_text()
        assert f"Its API key is in {tmp_path / 'admin.key'}" in appliance.log_text()
    with run_appliance(tmp_path, small_model(), "--demo") as again:
        assert _CURL.search(again.log_text()) is not None
        assert (tmp_path / "demo.key").read_text().strip() == first_key
        assert "Created the system administrator" not in again.log_text()


def test_demo_needs_keys(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="--demo makes a demo org and key; it needs keys"),
        run_appliance(tmp_path, small_model(), "--demo", "--no-auth", ready_timeout=30),
    ):
        pass
