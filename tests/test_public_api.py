"""Each package's public API is its curated `__all__`; nobody reaches into another's _private."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.support import REPO

PACKAGES = ["federation", "compliance", "appliance", "router", "provisioning", "images", "palisade"]
# Imports point downward only (DESIGN.md): a package may import those listed for it.
ALLOWED = {
    "federation": set(),
    "compliance": {"federation"},
    "appliance": {"federation", "compliance"},
    "router": {"federation", "compliance"},
    "provisioning": {"federation", "compliance"},
    "images": {"federation", "compliance", "appliance", "router", "provisioning"},
    "palisade": {"federation", "compliance", "appliance", "router", "provisioning", "images"},
}


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_exist_and_are_public(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    for symbol in exported:
        assert hasattr(module, symbol), f"{name}.__all__ names missing {symbol}"
        assert not symbol.startswith("_")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_downward_and_respect_private_modules(package: str) -> None:
    for path in (REPO / package).rglob("*.py"):
        for imported in _imports(path):
            top = imported.split(".")[0]
            if top not in ALLOWED or top == package:
                continue
            assert top in ALLOWED[package], f"{path}: {package} may not import {top}"
            assert "_private" not in imported, f"{path}: reaches into {imported}"
