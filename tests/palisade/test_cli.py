"""The `palisade` console script and `python -m palisade`."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from palisade.__main__ import GROUPS, build_app
from tests.support import REPO, run_palisade


def help_screen(*args: str) -> str:
    """`palisade <args> --help` rendered in this process, from the tree `palisade` builds for
    these arguments (an interpreter per screen costs more than the screens; the tests below
    run the real command)."""
    app = build_app(args[0] if args else None, args[1] if len(args) > 1 else None)
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    return result.output


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
    help_screen(*args)


def test_console_script_is_installed() -> None:
    script = shutil.which("palisade", path=str(REPO / ".venv" / "bin")) or shutil.which("palisade")
    assert script is not None
    result = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    for group in GROUPS:
        assert f"\u2502 {group} " in result.stdout, group  # a row of the Commands panel


def test_serve_help_lists_the_override_flags() -> None:
    result = run_palisade("appliance", "serve", "--help")
    for flag in ("--config", "--host", "--port", "--region", "--node-id"):
        assert flag in result.stdout


# Runs `palisade <args>` in one interpreter, then prints which heavy packages it imported.
_LOADED = """
import sys
from palisade.__main__ import main
sys.argv = ["palisade", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print(sorted({name.split(".")[0] for name in sys.modules} & {"appliance", "images", "router"}))
"""


@pytest.mark.parametrize(
    ("args", "loaded"),
    [
        (["key", "list", "--help"], []),
        (["fleet", "token", "--help"], ["router"]),  # not the image tools' rollout commands
    ],
)
def test_a_command_imports_only_its_groups_package(args: list[str], loaded: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _LOADED, *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert "Usage:" in result.stdout, result.stderr
    assert result.stdout.splitlines()[-1] == repr(loaded)
