"""The `palisade` console script and `python -m palisade`."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support import REPO, run_palisade


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["appliance"],
        ["appliance", "serve"],
        ["models"],
        ["models", "fetch-default"],
        ["models", "list"],
    ],
)
def test_every_command_has_help(args: list[str]) -> None:
    result = run_palisade(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_console_script_is_installed() -> None:
    script = shutil.which("palisade", path=str(REPO / ".venv" / "bin")) or shutil.which("palisade")
    assert script is not None
    result = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "appliance" in result.stdout
    assert "models" in result.stdout


def test_serve_help_lists_the_override_flags() -> None:
    result = run_palisade("appliance", "serve", "--help")
    for flag in ("--config", "--host", "--port", "--region", "--node-id"):
        assert flag in result.stdout
