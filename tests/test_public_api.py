"""Each package's public API is its curated `__all__`; nobody reaches into another's _private."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import typer.main

from appliance import ENGINES, ModelConfigBase, models_cli
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
    engine_api |= {"Capabilities", "ChoiceDelta", "RequestFeatures", "Node"}
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


# --- shared vocabularies are spelled out once (federation/_private/vocabulary.py) ---------

VOCABULARY_FILE = REPO / "federation" / "_private" / "vocabulary.py"


def _vocabularies() -> dict[str, frozenset[str]]:
    federation = importlib.import_module("federation")
    return {
        "device classes": frozenset(federation.DEVICE_CLASSES),
        "logging modes": frozenset(federation.LOGGING_MODES),
        "user roles": frozenset(federation.USER_ROLES),
        "fleet roles": frozenset(federation.FLEET_ROLES),
    }


def _source_files(*, with_tests: bool) -> list[Path]:
    roots = PACKAGES + (["tests"] if with_tests else [])
    files = [path for root in roots for path in (REPO / root).rglob("*.py")]
    return [path for path in files if path != VOCABULARY_FILE]


def _string_sets(tree: ast.AST) -> list[tuple[int, frozenset[str]]]:
    """Every `Literal[...]`, tuple, list and set display made only of two or more strings."""
    found = []
    literal_args = set()
    for node in ast.walk(tree):  # breadth first: a Literal before the tuple of its arguments
        if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("Literal"):
            literal_args.add(id(node.slice))
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        elif isinstance(node, ast.Tuple | ast.List | ast.Set) and id(node) not in literal_args:
            items = node.elts
        else:
            continue
        strings = [
            i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)
        ]
        if len(strings) == len(items) >= 2:
            found.append((node.lineno, frozenset(strings)))
    return found


def test_no_module_spells_out_a_shared_vocabulary_again() -> None:
    vocabularies = _vocabularies()
    repeated = [
        f"{path.relative_to(REPO)}:{line} spells out {name} {sorted(strings)}"
        for path in _source_files(with_tests=False)
        for line, strings in _string_sets(ast.parse(path.read_text()))
        for name, words in vocabularies.items()
        if strings <= words
    ]
    assert not repeated, "import them from federation instead:\n" + "\n".join(repeated)


def test_the_scan_finds_a_vocabulary_spelled_out_again() -> None:
    source = 'Mode = Literal["full", "zero"]\nROLES = ("node", "router")\nOTHER = ["a", "b"]\n'
    assert [line for line, _ in _string_sets(ast.parse(source))] == [1, 2, 3]
    vocabularies = _vocabularies()
    assert _string_sets(ast.parse(source))[0][1] <= vocabularies["logging modes"]
    assert _string_sets(ast.parse(source))[1][1] <= vocabularies["fleet roles"]


def test_receipt_header_names_appear_only_in_the_vocabulary() -> None:
    federation = importlib.import_module("federation")
    names = {federation.REGION_HEADER.lower(), federation.NODE_HEADER.lower()}
    names.add(federation.DEVICE_HEADER.lower())
    spelled = [
        f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}"
        for path in _source_files(with_tests=False)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.lower() in names
    ]
    assert not spelled, "use federation.receipt_headers:\n" + "\n".join(spelled)
    assert federation.receipt_headers("eu", "n1", "gpu/cuda:0") == {
        "X-Palisade-Region": "eu",
        "X-Palisade-Node": "n1",
        "X-Palisade-Device": "gpu/cuda:0",
    }
    assert federation.device_label("cpu", None) == "cpu"
    assert federation.device_label("cpu", "cpu") == "cpu"
    assert federation.device_label("gpu", "CUDAExecutionProvider") == "gpu/CUDAExecutionProvider"


# --- the docs stand alone: links resolve inside the repository ------------------------------

_MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"#{1,6} (.+)")
_EXTERNAL = ("http://", "https://", "mailto:")


def _doc_files() -> list[Path]:
    return [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchors(doc: Path) -> set[str]:
    """The fragment of each heading outside code blocks, as GitHub makes them."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := _HEADING.match(line)):
            slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
            count = seen[slug] = seen.get(slug, -1) + 1
            found.add(f"{slug}-{count}" if count else slug)
    return found


def _resolves(doc: Path, target: str, root: Path) -> bool:
    """Whether a link in `doc` names a file under `root` (and a heading in it, if any)."""
    path, _, fragment = target.partition("#")
    resolved = (doc.parent / path).resolve() if path else doc
    if not resolved.is_relative_to(root) or not resolved.exists():
        return False
    return not fragment or resolved.suffix != ".md" or fragment in _anchors(resolved)


def _broken_links(doc: Path, root: Path = REPO) -> list[str]:
    """Links to a file that is not in the repository, or to a heading that is not there."""
    links = _MARKDOWN_LINK.findall(doc.read_text())
    return [t for t in links if not t.startswith(_EXTERNAL) and not _resolves(doc, t, root)]


def test_docs_link_only_to_files_in_the_repository() -> None:
    assert len(_doc_files()) > 2, "docs/*.md not found"
    for doc in _doc_files():
        text = doc.read_text()
        assert not _broken_links(doc), f"{doc.name} links to {_broken_links(doc)}"
        outside = [p for p in re.findall(r"(?:\.\./)+[\w.-]+", text) if _outside(doc, p)]
        assert not outside, f"{doc.name} refers to {outside}, outside the repository"


def _outside(doc: Path, relative: str) -> bool:
    """Whether a `../` path in `doc` leaves the repository or names nothing in it."""
    resolved = (doc.parent / relative).resolve()
    return not resolved.is_relative_to(REPO) or not resolved.exists()


def test_the_link_check_catches_missing_files_headings_and_paths_outside(tmp_path: Path) -> None:
    fake = tmp_path / "fake.md"
    fake.write_text(
        "# Top (`a.py`)\n```\n# not a heading\n```\n[ok](https://example.com) [top](#top-apy) "
        "[missing](nowhere.md) [outside](/etc/passwd) [gone](#not-a-heading) "
        "[arch](../README.md)\n"
    )
    broken = ["nowhere.md", "/etc/passwd", "#not-a-heading", "../README.md"]
    assert _broken_links(fake, root=tmp_path) == broken
    guide = REPO / "docs" / "guide.md"
    assert not _outside(guide, "../README.md")
    assert _outside(guide, "../elsewhere")
    assert _outside(REPO / "README.md", "../README.md")
    architecture = REPO / "docs" / "architecture.md"
    assert {"engines", "model-lifecycle", "decisions"} <= _anchors(architecture)


# --- the engine seam: adding an engine is its directory and one registry line ---------------

ENGINES_DIR = REPO / "appliance" / "_private" / "engines"
ENGINES_PACKAGE = "appliance._private.engines"
# Re-exported for users of the package (the engines' classes are part of the public API).
ENGINE_EXPORTERS = {REPO / "appliance" / "__init__.py"}


def _engine_directories() -> set[str]:
    return {path.parent.name for path in ENGINES_DIR.glob("*/__init__.py")}


def _imported_modules(path: Path, tree: ast.AST) -> list[tuple[int, str]]:
    """Every module `tree` imports (relative imports resolved; `from p import m` as p.m)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found += [(node.lineno, base)]
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _engine_imports(path: Path, tree: ast.AST, engines: set[str]) -> list[str]:
    """Imports of an engine's own modules (`engines.<engine>...`) by `path`."""
    prefixes = tuple(f"{ENGINES_PACKAGE}.{engine}" for engine in engines)
    found: dict[int, str] = {}  # one per import statement
    for line, module in _imported_modules(path, tree):
        if module in prefixes or module.startswith(tuple(p + "." for p in prefixes)):
            found.setdefault(line, f"{path.relative_to(REPO)}:{line} imports {module}")
    return list(found.values())


def _tag_comparisons(path: Path, tree: ast.AST, tags: set[str]) -> list[str]:
    """Comparisons (==, !=, in, match cases) of something against an engine's tag."""

    def tag_in(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in tags
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return any(tag_in(item) for item in node.elts)
        return False

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(map(tag_in, [node.left, *node.comparators])):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.MatchValue) and tag_in(node.value):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: case {ast.unparse(node)}")
    return found


def _outside_engines() -> list[Path]:
    files = [*_source_files(with_tests=False), VOCABULARY_FILE]
    return [path for path in files if not path.is_relative_to(ENGINES_DIR)]


def test_only_the_registry_imports_an_engine() -> None:
    engines = _engine_directories()
    assert {"llamacpp", "upstream", "scripted"} <= engines
    reached = [
        found
        for path in _outside_engines()
        if path not in ENGINE_EXPORTERS
        for found in _engine_imports(path, ast.parse(path.read_text()), engines)
    ]
    assert not reached, "go through engines.registry (create_engine):\n" + "\n".join(reached)


def test_no_module_outside_the_engines_compares_against_an_engine_tag() -> None:
    registry = importlib.import_module(f"{ENGINES_PACKAGE}.registry")
    tags = set(registry.ENGINES)
    assert {"llamacpp", "openai", "scripted"} <= tags
    compared = [
        found
        for path in _outside_engines()
        for found in _tag_comparisons(path, ast.parse(path.read_text()), tags)
    ]
    assert not compared, "ask the engine's Capabilities instead:\n" + "\n".join(compared)


def test_the_engine_scans_find_imports_and_tag_comparisons() -> None:
    path = REPO / "appliance" / "_private" / "example.py"
    source = (
        "from appliance._private.engines.llamacpp.engine import LlamaCppEngine\n"
        "from .engines import scripted\n"
        "from appliance._private.engines import registry\n"
        "if config.engine == 'openai': pass\n"
        "if engine in ('vllm', 'onnx'): pass\n"
        "match tag:\n    case 'llamacpp': pass\n"
        "if kind == 'chat': pass\n"
    )
    tree = ast.parse(source)
    imports = _engine_imports(path, tree, {"llamacpp", "scripted", "upstream"})
    assert [line.split(":")[1].split()[0] for line in imports] == ["1", "2"]
    compared = _tag_comparisons(path, tree, {"openai", "vllm", "onnx", "llamacpp"})
    assert [line.split(":")[1] for line in compared] == ["4", "5", "7"]


def _raises_queue_full(tree: ast.AST) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("QueueFullError")
    ]


def test_only_the_admission_queue_answers_queue_full() -> None:
    """One Retry-After rule for every engine: `queue_full` comes from `AdmissionQueue`."""
    admission = ENGINES_DIR / "admission.py"
    elsewhere = [
        f"{path.relative_to(REPO)}:{line}"
        for path in _source_files(with_tests=False)
        if path != admission
        for line in _raises_queue_full(ast.parse(path.read_text()))
    ]
    assert _raises_queue_full(ast.parse(admission.read_text())), "the scan finds nothing"
    assert not elsewhere, "admit through engines.admission.AdmissionQueue:\n" + "\n".join(elsewhere)


ENGINES_DOC = REPO / "docs" / "engines.md"
COMMON_KEYS_HEADING = "## Keys every model has"


def _doc_section(text: str, marker: str) -> str:
    """The `## ` section of docs/engines.md whose heading contains `marker`."""
    sections = re.split(r"^(?=## )", text, flags=re.MULTILINE)
    found = [section for section in sections if marker in section.partition("\n")[0]]
    assert len(found) == 1, f"docs/engines.md has {len(found)} sections headed {marker!r}"
    return found[0]


def _undocumented_keys(text: str) -> list[str]:
    """Config keys of registered engines missing from their tables in docs/engines.md."""
    common = set(ModelConfigBase.__struct_fields__)
    missing = [
        f"(every model) {key}"
        for key in sorted(common)
        if f"| `{key}` |" not in _doc_section(text, COMMON_KEYS_HEADING)
    ]
    for tag, entry in ENGINES.items():
        section = _doc_section(text, f'`engine = "{tag}"`')
        own = [key for key in entry.config.__struct_fields__ if key not in common]
        missing += [f"{tag}: {key}" for key in own if f"| `{key}` |" not in section]
    return missing


def test_every_engine_config_key_is_in_the_engines_doc() -> None:
    """Each engine's section of docs/engines.md has a table row for each of its config
    keys (and the keys every model has, their own table): the tables follow the code."""
    missing = _undocumented_keys(ENGINES_DOC.read_text())
    assert not missing, f"add a table row to docs/engines.md for each of: {missing}"


def test_the_engines_doc_check_finds_a_missing_key() -> None:
    text = ENGINES_DOC.read_text().replace("| `upstream_timeout_s` |", "| upstream timeout |")
    assert _undocumented_keys(text) == ["openai: upstream_timeout_s"]


def test_every_models_command_is_in_the_engines_doc() -> None:
    commands = sorted(typer.main.get_command(models_cli).commands)  # type: ignore[attr-defined]
    text = ENGINES_DOC.read_text()
    assert {"add", "pull", "reload", "remove", "status"} <= set(commands)
    assert [c for c in commands if f"palisade models {c}" not in text] == []
