"""Each package's public API is its curated `__all__`; nobody reaches into another's _private."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.support import REPO

PACKAGES = ["federation", "compliance", "appliance", "router", "provisioning", "images", "palisade"]
# Imports point downward only (docs/architecture.md): a package imports those listed for it.
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


def test_appliance_exports_both_engines_and_the_prompt_seam() -> None:
    appliance = importlib.import_module("appliance")
    federation = importlib.import_module("federation")
    engine_api = {"Engine", "Prompt", "Generation", "Finish", "SamplingParams", "EngineLoad"}
    engines = {"LlamaCppEngine", "OpenAIUpstreamEngine"}
    upstream_errors = {
        "UpstreamError",
        "UpstreamRejectedError",
        "UpstreamTimeoutError",
        "UpstreamUnavailableError",
    }
    assert engine_api | engines | upstream_errors <= set(appliance.__all__)
    assert issubclass(appliance.UpstreamUnavailableError, federation.ServiceUnavailableError)
    assert issubclass(appliance.UpstreamTimeoutError, appliance.UpstreamError)
    assert issubclass(appliance.UpstreamRejectedError, appliance.ApplianceError)


def test_router_exports_its_error_tree_and_fleet_model() -> None:
    router = importlib.import_module("router")
    federation = importlib.import_module("federation")
    assert issubclass(router.NoBackendError, federation.ServiceUnavailableError)
    assert issubclass(router.RegionHeaderError, federation.PermissionDeniedError)
    assert issubclass(router.BackendUnavailableError, router.RouterError)
    assert router.NoBackendError.default_code == "no_backend_in_region"
    assert {"Fleet", "RouterConfig", "create_router_app", "fleet_cli", "router_cli"} <= set(
        router.__all__
    )


def test_federation_exports_the_admission_journal_and_leases() -> None:
    federation = importlib.import_module("federation")
    journal = {"Journal", "LeaseBook", "boot_id", "journal_epoch"}
    assert journal | {"INTERRUPTED", "REQUEST_ID_HEADER"} <= set(federation.__all__)
    assert federation.REQUEST_ID_HEADER == "x-request-id"
