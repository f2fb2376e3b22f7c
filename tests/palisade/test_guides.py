"""The README and the guides name what exists: make targets, config files that load, and
error codes the servers answer with."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from appliance import load_appliance_config
from router import load_router_config

REPO = Path(__file__).resolve().parents[2]
# `make help` prints the targets whose rule carries a `## ` comment.
_HELP_TARGET = re.compile(r"^([a-z][a-z-]*):.*## ", re.M)
_TOML_BLOCK = re.compile(r"^```toml\n(.*?)^```", re.M | re.S)
_PACKAGES = (
    "appliance",
    "compliance",
    "federation",
    "images",
    "palisade",
    "provisioning",
    "router",
)


def _help_targets() -> set[str]:
    return set(_HELP_TARGET.findall((REPO / "Makefile").read_text()))


def test_the_readme_names_every_make_target_and_only_real_ones() -> None:
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"`make ([a-z][a-z-]*)`", readme))
    targets = _help_targets()
    assert {"run", "test", "bench", "image-test"} <= targets, "Makefile targets not found"
    assert not named - targets, f"README.md names targets the Makefile lacks: {named - targets}"
    assert not targets - named, f"add to README.md's make targets: {targets - named}"


def _operations_examples() -> list[str]:
    return _TOML_BLOCK.findall((REPO / "docs" / "operations.md").read_text())


@pytest.mark.parametrize("kind", ["appliance", "router"])
def test_the_example_config_files_of_the_operations_guide_load(kind: str, tmp_path: Path) -> None:
    """Each example `appliance.toml` / `router.toml` is a file the server accepts: no key
    misspelt, renamed or removed since (the `…` placeholder of a digest made concrete)."""
    marker = "[[models]]" if kind == "appliance" else "router_id ="
    examples = [block for block in _operations_examples() if marker in block]
    assert len(examples) == 1, f"one example {kind}.toml expected in docs/operations.md"
    path = tmp_path / f"{kind}.toml"
    path.write_text(examples[0].replace('sha256 = "…"', f'sha256 = "{"0" * 64}"'))
    if kind == "appliance":
        config = load_appliance_config(path)
        assert {model.id for model in config.models} >= {"smollm2-135m-instruct", "iris-mlp"}
    else:
        assert load_router_config(path).router_id == "router-eu"


def _strings_in_the_code() -> set[str]:
    found: set[str] = set()
    for package in _PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.add(node.value)
    return found


def test_every_error_code_of_the_api_guide_is_one_the_code_answers_with() -> None:
    """A code renamed or dropped in the code fails here until docs/api.md follows."""
    guide = (REPO / "docs" / "api.md").read_text()
    errors = guide[guide.index("\n## Errors") :]
    first_cells = [row.split("|")[1] for row in errors.splitlines() if row.startswith("| `")]
    codes = {code for cell in first_cells for code in re.findall(r"`([a-z_]+)`", cell)}
    assert {"invalid_api_key", "no_backend_in_region", "budget_exceeded"} <= codes
    assert not codes - _strings_in_the_code(), (
        f"docs/api.md documents {codes - _strings_in_the_code()}"
    )
